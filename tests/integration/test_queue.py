"""The outbound queue through the real server: submission to an alias with local and remote
targets, per-recipient failures bouncing to the sender's mailbox, and SIGKILL of a real
``serpentmail serve`` with 200 messages queued (each delivered exactly once after restart).

Remote MX hosts are a counting fake SMTP sink on a 127.0.4.x address, found through the
sandbox DNS server on another 127.0.4.x address; nothing leaves 127.0.0.0/8.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import os
import poplib
import re
import signal
import smtplib
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from serpentmail.accounts.db import AccountDB
from serpentmail.config import Config, DNSConfig, Endpoint
from serpentmail.queue.store import QueueStore
from serpentmail.sandbox.dns import running_dns
from tests.helpers import add_user, free_port, maildir_files, make_config, running_server


class SMTPSink:
    """A counting fake MX: answers RCPT from ``rcpt_replies`` (default 250), records each
    (recipient, Message-ID) whose DATA it accepted."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.port = free_port(host)
        self.rcpt_replies: dict[str, str] = {}
        self.accepted: Counter[tuple[str, str]] = Counter()
        self.lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._handle, self.host, self.port))
        self._started.set()
        self.loop.run_forever()
        server.close()

    def __enter__(self) -> SMTPSink:
        self._thread.start()
        self._started.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        def say(line: str) -> None:
            writer.write(line.encode() + b"\r\n")

        say("220 sink.far.test ESMTP")
        rcpts: list[str] = []
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while line := await reader.readline():
                cmd = line.decode("utf-8", "replace").strip()
                verb = cmd.split(" ", 1)[0].upper()
                if verb in ("EHLO", "HELO"):
                    say("250-sink.far.test\r\n250-8BITMIME\r\n250 ENHANCEDSTATUSCODES")
                elif verb == "MAIL":
                    rcpts = []
                    say("250 2.1.0 ok")
                elif verb == "RCPT":
                    m = re.search(r"<([^>]*)>", cmd)
                    addr = m.group(1) if m else ""
                    reply = self.rcpt_replies.get(addr, "250 2.1.5 ok")
                    if reply.startswith("2"):
                        rcpts.append(addr)
                    say(reply)
                elif verb == "DATA":
                    say("354 go ahead")
                    data = b""
                    while (chunk := await reader.readline()) != b".\r\n":
                        if not chunk:
                            return
                        data += chunk
                    m2 = re.search(rb"(?im)^Message-ID:\s*(\S+)", data)
                    mid = m2.group(1).decode() if m2 else "?"
                    with self.lock:
                        for r in rcpts:
                            self.accepted[(r, mid)] += 1
                    say("250 2.0.0 accepted")
                elif verb == "QUIT":
                    say("221 bye")
                    await writer.drain()
                    break
                else:
                    say("250 2.0.0 ok")
                await writer.drain()
        writer.close()


def _wait(cond: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError("timed out waiting for the queue")


def _tls() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


@contextlib.contextmanager
def world(tmp_path: Path, n: int) -> Iterator[tuple[SMTPSink, str]]:
    """DNS (far.test MX → the sink) and the sink, on 127.0.4.(10n+2) and .(10n+3)."""
    dns_host, mx_host = f"127.0.4.{10 * n + 2}", f"127.0.4.{10 * n + 3}"
    zones = {"far.test": {"MX": ["10 mx.far.test"]}, "mx.far.test": {"A": [mx_host]}}
    with running_dns(dns_host, 0, zones) as dns, SMTPSink(mx_host) as sink:
        yield sink, dns.endpoint


def _server_config(tmp_path: Path, n: int, sink: SMTPSink, dns: str) -> Config:
    host, _, port = dns.partition(":")
    cfg = make_config(tmp_path / "data", f"127.0.4.{10 * n + 1}", hostname="mx.home.test")
    return replace(cfg, dns=DNSConfig((Endpoint(host, int(port)),), timeout=2.0),
                   delivery=replace(cfg.delivery, port=sink.port, connect_timeout=5.0))


def _has_remote() -> bool:
    try:
        import serpentmail.delivery.remote  # noqa: F401
    except ModuleNotFoundError:
        return False
    return True


needs_remote = pytest.mark.skipif(not _has_remote(), reason="serpentmail.delivery.remote not available yet")


@needs_remote
def test_submission_to_alias_with_local_and_remote_targets(tmp_path: Path) -> None:
    with world(tmp_path, 1) as (sink, dns):
        cfg = _server_config(tmp_path, 1, sink, dns)
        add_user(cfg, "bill@home.test", "billpw")
        add_user(cfg, "bob@home.test")
        db = AccountDB(cfg.db_path)
        db.add_alias("team@home.test", "bob@home.test")
        db.add_alias("team@home.test", "carol@far.test")
        db.close()
        body = b"From: bill@home.test\r\nTo: team@home.test\r\nSubject: plans\r\nMessage-ID: <t1@home.test>\r\n\r\nhi team\r\n"
        with running_server(cfg) as srv:
            with smtplib.SMTP(*srv.endpoint("submission"), timeout=10) as c:
                c.ehlo("client.test")
                c.starttls(context=_tls())
                c.ehlo("client.test")
                c.login("bill@home.test", "billpw")
                assert c.sendmail("bill@home.test", ["team@home.test"], body) == {}
            _wait(lambda: bool(maildir_files(cfg, "bob@home.test")) and sink.accepted[("carol@far.test", "<t1@home.test>")] == 1)
            _wait(lambda: not list(QueueStore(cfg.data_dir).ids()))
        files = maildir_files(cfg, "bob@home.test")
        assert len(files) == 1
        data = files[0].read_bytes()
        # the local courier adds Return-Path on top of the queued copy (Received + body)
        assert data.startswith(b"Return-Path: <bill@home.test>\r\nReceived: from client.test")
        assert data.endswith(body)
        assert data.count(b"Return-Path:") == 1


@needs_remote
def test_relayed_items_never_get_files_and_their_spools_are_reused(tmp_path: Path) -> None:
    """An item delivered before the journal's next checkpoint is never given its names in
    queue/: its spool files go back, open, to the pools (docs/queue-states.md, "Journaled
    items"): nothing is renamed, recycled or made per message."""
    n = 40
    with world(tmp_path, 8) as (sink, dns):
        cfg = _server_config(tmp_path, 8, sink, dns)
        add_user(cfg, "bill@home.test", "billpw")
        spare = cfg.data_dir / "tmp" / "spare"
        recycled = cfg.data_dir / "tmp" / "recycled"
        with running_server(cfg) as srv, smtplib.SMTP(*srv.endpoint("submission"), timeout=10) as c:
            c.ehlo("client.test")
            c.starttls(context=_tls())
            c.ehlo("client.test")
            c.login("bill@home.test", "billpw")
            seen: set[str] = set()
            for i in range(n):
                body = f"From: bill@home.test\r\nMessage-ID: <r{i}@home.test>\r\n\r\nmessage {i}\r\n".encode()
                assert c.sendmail("bill@home.test", ["carol@far.test"], body) == {}
                _wait(lambda i=i: sink.accepted[("carol@far.test", f"<r{i}@home.test>")] == 1)  # type: ignore[misc]
                seen |= set(os.listdir(spare))
            assert not any(list((cfg.data_dir / "queue" / d).iterdir()) for d in ("data", "env"))
            assert not list(recycled.iterdir())  # nothing was removed to be blanked
            # The 32 spares made at start, and the same files again: not one new file a message.
            assert len(seen) < 32 + n // 2
        assert all(sink.accepted[("carol@far.test", f"<r{i}@home.test>")] == 1 for i in range(n))
        assert sum(sink.accepted.values()) == n


@needs_remote
def test_5xx_recipient_among_2xx_gives_one_bounce_read_over_pop3(tmp_path: Path) -> None:
    with world(tmp_path, 2) as (sink, dns):
        cfg = _server_config(tmp_path, 2, sink, dns)
        add_user(cfg, "bill@home.test", "billpw")
        sink.rcpt_replies["bad@far.test"] = "550 5.1.1 <bad@far.test>: user unknown"
        body = b"From: bill@home.test\r\nSubject: plans\r\nMessage-ID: <t2@home.test>\r\n\r\nhi\r\n"
        with running_server(cfg) as srv:
            with smtplib.SMTP(*srv.endpoint("submission"), timeout=10) as c:
                c.ehlo("client.test")
                c.starttls(context=_tls())
                c.ehlo("client.test")
                c.login("bill@home.test", "billpw")
                c.sendmail("bill@home.test", ["ok1@far.test", "bad@far.test", "ok2@far.test"], body)
            _wait(lambda: bool(maildir_files(cfg, "bill@home.test")))
            _wait(lambda: not list(QueueStore(cfg.data_dir).ids()))
            time.sleep(0.2)  # a second bounce would have arrived by now
            pop = poplib.POP3_SSL(*srv.endpoint("pop3s"), context=_tls(), timeout=10)
            try:
                pop.user("bill@home.test")
                pop.pass_("billpw")
                count, _size = pop.stat()
                assert count == 1  # ONE bounce for the message
                raw = b"\r\n".join(pop.retr(1)[1])
            finally:
                pop.quit()
        assert sink.accepted[("ok1@far.test", "<t2@home.test>")] == 1
        assert sink.accepted[("ok2@far.test", "<t2@home.test>")] == 1
        assert ("bad@far.test", "<t2@home.test>") not in sink.accepted
        assert raw.startswith(b"Return-Path: <>")  # RFC 5321 §4.5.5: sent from the null sender
        msg = email.message_from_bytes(raw)
        assert msg.get_content_type() == "multipart/report"
        assert "MAILER-DAEMON@mx.home.test" in msg["From"]
        text = msg.get_payload()[0].get_payload(decode=True).decode()  # type: ignore[index,union-attr]
        assert "<bad@far.test>: user does not exist" in text
        blocks = msg.get_payload()[1].get_payload()  # type: ignore[index,union-attr]
        assert [b["Final-Recipient"] for b in blocks[1:]] == ["rfc822; bad@far.test"]  # type: ignore[index]
        assert blocks[1]["Status"] == "5.1.1" and blocks[1]["Action"] == "failed"  # type: ignore[index]
        assert blocks[1]["Remote-MTA"] is not None  # type: ignore[index]


def _toml(c: Config, path: Path) -> None:
    lines = [
        f'hostname = "{c.hostname}"',
        f'data_dir = "{c.data_dir}"',
        f'[smtp]\nlisten = ["{c.smtp.listen[0]}"]',
        "[submission]\nlisten = []", "[submissions]\nlisten = []", "[pop3]\nlisten = []", "[pop3s]\nlisten = []",
        f'[dns]\nnameservers = ["{c.dns.nameservers[0]}"]\ntimeout = "2s"',
        f'[delivery]\nport = {c.delivery.port}\nretry_schedule = ["1h"]\nconnect_timeout = "5s"',
        '[log]\nlevel = "warning"',
    ]
    path.write_text("\n".join(lines) + "\n")


@needs_remote
def test_sigkill_with_200_queued_then_each_delivered_exactly_once(tmp_path: Path) -> None:
    n_msgs = 200
    with world(tmp_path, 3) as (sink, dns):
        cfg = _server_config(tmp_path, 3, sink, dns)
        add_user(cfg, "bill@home.test")
        db = AccountDB(cfg.db_path)
        db.add_alias("fwd@home.test", "ok@far.test")
        db.add_alias("fwd@home.test", "later@far.test")
        db.close()
        conf = tmp_path / "mail.toml"
        _toml(cfg, conf)
        # Phase 1: the MX takes ok@ but defers later@, so every item stays queued with one
        # recipient delivered and one pending.
        sink.rcpt_replies["later@far.test"] = "451 4.3.0 come back later"
        cmd = [sys.executable, "-m", "serpentmail", "-c", str(conf), "serve"]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        try:
            host, port = cfg.smtp.listen[0].host, cfg.smtp.listen[0].port
            deadline = time.monotonic() + 30
            while True:
                try:
                    conn = smtplib.SMTP(host, port, timeout=10)
                    break
                except OSError:
                    assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                    assert time.monotonic() < deadline
                    time.sleep(0.1)
            with conn:
                conn.ehlo("client.test")
                for i in range(n_msgs):
                    msg = f"From: a@b.test\r\nSubject: {i}\r\nMessage-ID: <m{i}@b.test>\r\n\r\nbody {i}\r\n"
                    assert conn.sendmail("a@b.test", ["fwd@home.test"], msg.encode()) == {}
            store = QueueStore(cfg.data_dir)

            def all_tried_once() -> bool:
                recs = list(store.scan())
                return len(recs) == n_msgs and all(
                    {r.address: r.state for r in rec.recipients} == {"ok@far.test": "delivered", "later@far.test": "pending"}
                    for rec in recs)

            _wait(all_tried_once, 60)
        finally:
            proc.send_signal(signal.SIGKILL)  # no clean shutdown: the crash
            proc.wait(10)
        assert len({mid for (_r, mid) in sink.accepted}) == n_msgs
        # Phase 2: the MX takes everything; a fresh server retries every pending recipient at
        # start, and never the delivered ones.
        del sink.rcpt_replies["later@far.test"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        try:
            _wait(lambda: not list(store.ids()), 60)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        for i in range(n_msgs):
            mid = f"<m{i}@b.test>"
            assert sink.accepted[("ok@far.test", mid)] == 1, mid
            assert sink.accepted[("later@far.test", mid)] == 1, mid
        assert sum(sink.accepted.values()) == 2 * n_msgs


def _wait_idle_queue(cfg: Config) -> None:
    _wait(lambda: not list(QueueStore(cfg.data_dir).ids()))


@needs_remote
def test_nxdomain_bounces_at_once_and_null_sender_is_never_bounced(tmp_path: Path) -> None:
    with world(tmp_path, 4) as (sink, dns):
        cfg = _server_config(tmp_path, 4, sink, dns)
        add_user(cfg, "bill@home.test", "billpw")
        db = AccountDB(cfg.db_path)
        db.add_alias("fwd@home.test", "gone@nx.test")
        db.close()
        with running_server(cfg) as srv:
            with smtplib.SMTP(*srv.endpoint("submission"), timeout=10) as c:
                c.ehlo("client.test")
                c.starttls(context=_tls())
                c.ehlo("client.test")
                c.login("bill@home.test", "billpw")
                c.sendmail("bill@home.test", ["someone@nx.test"], b"Subject: a\r\n\r\nx\r\n")
            _wait(lambda: bool(maildir_files(cfg, "bill@home.test")))
            _wait_idle_queue(cfg)
            # A bounce arriving on the MX (null sender) for an alias whose target does not
            # exist: it fails too, and is dropped with a log line, never bounced again.
            with smtplib.SMTP(*srv.endpoint("smtp"), timeout=10) as c:
                c.ehlo("client.test")
                c.sendmail("<>", ["fwd@home.test"], b"Subject: bounce\r\n\r\nx\r\n")
            _wait_idle_queue(cfg)
            time.sleep(0.3)
        files = maildir_files(cfg, "bill@home.test")
        assert len(files) == 1
        msg = email.message_from_bytes(files[0].read_bytes())
        text = msg.get_payload()[0].get_payload(decode=True).decode()  # type: ignore[index,union-attr]
        assert "<someone@nx.test>: Couldn't find host named nx.test" in text
        assert msg.get_payload()[1].get_payload()[1]["Action"] == "failed"  # type: ignore[index,union-attr]
        assert not (cfg.data_dir / "mail" / "postmaster" / "new").exists() or not list(
            (cfg.data_dir / "mail" / "postmaster" / "new").iterdir())
        assert sum(sink.accepted.values()) == 0


@needs_remote
def test_cli_flush_reaches_a_running_server(tmp_path: Path) -> None:
    from serpentmail.cli import main

    with world(tmp_path, 5) as (sink, dns):
        cfg = _server_config(tmp_path, 5, sink, dns)
        cfg = replace(cfg, delivery=replace(cfg.delivery, retry_schedule=(3600.0,)))
        add_user(cfg, "bill@home.test")
        db = AccountDB(cfg.db_path)
        db.add_alias("fwd@home.test", "later@far.test")
        db.close()
        conf = tmp_path / "mail.toml"
        _toml(cfg, conf)
        sink.rcpt_replies["later@far.test"] = "451 4.3.0 come back later"
        with running_server(cfg) as srv:
            with smtplib.SMTP(*srv.endpoint("smtp"), timeout=10) as c:
                c.ehlo("client.test")
                c.sendmail("a@b.test", ["fwd@home.test"], b"Message-ID: <f1@b.test>\r\n\r\nx\r\n")
            store = QueueStore(cfg.data_dir)

            def tried() -> bool:
                recs = list(store.scan())
                return len(recs) == 1 and recs[0].recipients[0].attempts == 1

            _wait(tried)
            del sink.rcpt_replies["later@far.test"]
            time.sleep(1.2)
            assert sink.accepted[("later@far.test", "<f1@b.test>")] == 0  # next try is an hour away
            assert main(["-c", str(conf), "queue", "flush"]) == 0
            _wait_idle_queue(cfg)
        assert sink.accepted[("later@far.test", "<f1@b.test>")] == 1


def test_router_reuses_local_domain_answers_for_a_short_time(tmp_path: Path) -> None:
    from serpentmail.queue.service import local_domain_check

    cfg = make_config(tmp_path / "data", "127.0.4.91", hostname="mx.home.test")
    db = AccountDB(cfg.db_path)
    now = [100.0]
    is_local = local_domain_check(cfg, db, ttl=2.0, clock=lambda: now[0])
    assert is_local("MX.home.test.") and not is_local("new.test")
    db.ensure_domain("new.test")
    assert not is_local("new.test")  # the answer of a moment ago, no query
    now[0] += 2.5
    assert is_local("new.test")  # seen once the answer is older than the ttl
    db.close()
