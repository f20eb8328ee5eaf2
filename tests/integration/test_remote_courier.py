"""The remote courier against real receiving serpentmail servers and scripted fake MXs.

Everything runs on 127.0.5.x: the sandbox DNS server on 127.0.5.1, exchangers on .2-.9, all
listening on one shared delivery port (as every MX on the internet listens on 25).
"""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from serpentmail.config import Config, DeliveryConfig, DNSConfig, Endpoint, Listener
from serpentmail.delivery.base import Envelope, RecipientResult
from serpentmail.delivery.remote import ConnectionCache, RemoteCourier, Timeouts
from serpentmail.sandbox.dns import DNSServer, running_dns
from tests.helpers import add_user, maildir_files, make_config, running_server
from tests.integration.fakesmtp import FakeSMTP

DNS_HOST = "127.0.5.1"
MX = {n: f"127.0.5.{n}" for n in range(2, 10)}
FAST = Timeouts(connect=1.0, greeting=1.0, helo=2.0, mail=2.0, rcpt=2.0, data_init=2.0,
                data_block=2.0, data_end=5.0, quit=1.0)
MESSAGE = (b"From: alice@sender.test\r\nTo: bob@winview.test\r\nSubject: hello\r\n\r\n"
           b"first line\r\n.leading dot\r\n.\r\n..two dots\r\nlast line\r\n")


def _port_free_everywhere(port: int, hosts: list[str]) -> bool:
    for h in hosts:
        with socket.socket() as s:
            try:
                s.bind((h, port))
            except OSError:
                return False
    return True


@pytest.fixture(scope="module")
def smtp_port() -> int:
    rng = random.Random()
    for _ in range(200):
        port = rng.randint(20000, 60000)
        if _port_free_everywhere(port, list(MX.values())):
            return port
    raise RuntimeError("no common free port")


@pytest.fixture
def dns() -> Iterator[DNSServer]:
    with running_dns(DNS_HOST, 0, {}) as server:
        yield server


def sender_config(tmp_path: Path, dns: DNSServer, port: int, **delivery: object) -> Config:
    cfg = make_config(tmp_path / "sender", "127.0.5.20", listeners=(), hostname="out.sender.test")
    return replace(
        cfg,
        dns=DNSConfig(nameservers=(Endpoint(DNS_HOST, dns.port),), timeout=1.0),
        delivery=DeliveryConfig(port=port, connect_timeout=1.0, **delivery),  # type: ignore[arg-type]
    )


def receiver_config(tmp_path: Path, name: str, host: str, port: int) -> Config:
    cfg = make_config(tmp_path / name, host, listeners=("smtp",), hostname=f"{name}.winview.test")
    cfg = replace(cfg, smtp=Listener((Endpoint(host, port),)))
    add_user(cfg, "bob@winview.test")
    add_user(cfg, "carol@winview.test")
    return cfg


def envelope(tmp_path: Path, data: bytes = MESSAGE, **kw: object) -> Envelope:
    path = tmp_path / "msg.eml"
    path.write_bytes(data)
    return Envelope(queue_id="Q1", sender="alice@sender.test", data_path=path, size=len(data), **kw)  # type: ignore[arg-type]


async def deliver_once(cfg: Config, env: Envelope, rcpts: list[str], *, timeouts: Timeouts = FAST,
                       seed: int = 1) -> list[RecipientResult]:
    """One delivery with a fresh courier, whose idle connections are then closed (QUIT)."""
    courier = RemoteCourier(cfg, rng=random.Random(seed), timeouts=timeouts)
    try:
        return await courier.deliver(env, rcpts)
    finally:
        await courier.aclose()


def deliver(cfg: Config, env: Envelope, rcpts: list[str], seed: int = 1) -> list[RecipientResult]:
    return asyncio.run(deliver_once(cfg, env, rcpts, seed=seed))


def two_mx(dns: DNSServer) -> None:
    dns.add_mx("winview.test", 10, "mx1.winview.test")
    dns.add_mx("winview.test", 20, "mx2.winview.test")
    dns.add_a("mx1.winview.test", MX[2])
    dns.add_a("mx2.winview.test", MX[3])


def test_delivers_to_preferred_mx_byte_for_byte(tmp_path: Path, dns: DNSServer, smtp_port: int) -> None:
    two_mx(dns)
    mx1 = receiver_config(tmp_path, "mx1", MX[2], smtp_port)
    mx2 = receiver_config(tmp_path, "mx2", MX[3], smtp_port)
    with running_server(mx1), running_server(mx2):
        res = deliver(sender_config(tmp_path, dns, smtp_port), envelope(tmp_path), ["bob@winview.test"])
    assert [r.status for r in res] == ["delivered"], res
    assert res[0].remote_mta == "mx1.winview.test"
    assert res[0].reply.startswith("250")
    files = maildir_files(mx1, "bob@winview.test")
    assert len(files) == 1 and maildir_files(mx2, "bob@winview.test") == []
    data = files[0].read_bytes()
    assert data.endswith(MESSAGE)
    # Opportunistic STARTTLS was used (RFC 3848 "with ESMTPS"), and our EHLO name was given.
    assert b"Received: from out.sender.test" in data and b"with ESMTPS" in data


def test_preferred_mx_down_falls_back_to_next(tmp_path: Path, dns: DNSServer, smtp_port: int) -> None:
    two_mx(dns)
    mx2 = receiver_config(tmp_path, "mx2", MX[3], smtp_port)
    with running_server(mx2):  # nothing listens on mx1: connection refused
        res = deliver(sender_config(tmp_path, dns, smtp_port), envelope(tmp_path), ["bob@winview.test"])
    assert res[0].status == "delivered" and res[0].remote_mta == "mx2.winview.test", res
    assert len(maildir_files(mx2, "bob@winview.test")) == 1


def test_all_mx_down_defers_with_last_reason(tmp_path: Path, dns: DNSServer, smtp_port: int) -> None:
    two_mx(dns)
    res = deliver(sender_config(tmp_path, dns, smtp_port), envelope(tmp_path), ["bob@winview.test", "carol@winview.test"])
    assert [r.status for r in res] == ["deferred", "deferred"]
    assert "mx2.winview.test" in res[0].reply and "refused" in res[0].reply.lower(), res[0].reply
    assert res[0].reply.startswith("451 4.4.1")


def test_max_mx_attempts_limits_connections(tmp_path: Path, dns: DNSServer, smtp_port: int) -> None:
    two_mx(dns)

    async def run() -> list[RecipientResult]:
        async with FakeSMTP(MX[3], smtp_port) as fake:
            cfg = sender_config(tmp_path, dns, smtp_port, max_mx_attempts=1)
            res = await deliver_once(cfg, envelope(tmp_path), ["bob@winview.test"])
            assert fake.connections == 0
            return res

    res = asyncio.run(run())
    assert res[0].status == "deferred" and "mx1.winview.test" in res[0].reply


def test_rejected_recipient_among_accepted(tmp_path: Path, dns: DNSServer, smtp_port: int) -> None:
    two_mx(dns)
    mx1 = receiver_config(tmp_path, "mx1", MX[2], smtp_port)
    with running_server(mx1):
        res = deliver(sender_config(tmp_path, dns, smtp_port), envelope(tmp_path),
                      ["bob@winview.test", "nobody@winview.test", "carol@winview.test"])
    assert [r.status for r in res] == ["delivered", "failed", "delivered"], res
    assert res[1].reply.startswith("550 5.1.1"), res[1].reply
    assert res[1].remote_mta == "mx1.winview.test" and res[1].diagnostic_type == "smtp"
    assert len(maildir_files(mx1, "bob@winview.test")) == 1
    assert len(maildir_files(mx1, "carol@winview.test")) == 1


def test_421_greeting_moves_to_next_mx_and_data_is_dot_stuffed(tmp_path: Path, dns: DNSServer, smtp_port: int) -> None:
    two_mx(dns)

    async def run() -> tuple[list[RecipientResult], FakeSMTP, FakeSMTP]:
        async with FakeSMTP(MX[2], smtp_port, greeting="421 4.3.2 busy, go away") as busy, \
                FakeSMTP(MX[3], smtp_port) as good:
            cfg = sender_config(tmp_path, dns, smtp_port)
            res = await deliver_once(cfg, envelope(tmp_path), ["bob@winview.test"])
            return res, busy, good

    res, busy, good = asyncio.run(run())
    assert busy.connections == 1 and busy.commands == []
    assert res[0].status == "delivered" and res[0].remote_mta == "mx2.winview.test"
    # No CHUNKING offered: DATA, with every line that starts with "." stuffed.
    assert good.verbs == ["EHLO", "MAIL", "RCPT", "DATA", "QUIT"]
    assert good.raw_data == [MESSAGE.replace(b"\r\n.", b"\r\n..") + b".\r\n"]
    assert good.commands[1] == f"MAIL FROM:<alice@sender.test> SIZE={len(MESSAGE)}"


def test_greeting_timeout_moves_on(tmp_path: Path, dns: DNSServer, smtp_port: int) -> None:
    two_mx(dns)

    async def run() -> list[RecipientResult]:
        async with FakeSMTP(MX[2], smtp_port, silent=True), FakeSMTP(MX[3], smtp_port):
            cfg = sender_config(tmp_path, dns, smtp_port)
            return await deliver_once(cfg, envelope(tmp_path), ["bob@winview.test"], timeouts=replace(FAST, greeting=0.3))

    res = asyncio.run(run())
    assert res[0].status == "delivered" and res[0].remote_mta == "mx2.winview.test", res


def test_ehlo_refused_falls_back_to_helo_and_4xx_rcpt_defers(tmp_path: Path, dns: DNSServer, smtp_port: int) -> None:
    dns.add_mx("winview.test", 10, "mx1.winview.test")
    dns.add_a("mx1.winview.test", MX[2])

    async def run() -> tuple[list[RecipientResult], FakeSMTP]:
        async with FakeSMTP(MX[2], smtp_port, ehlo_reply="502 5.5.1 what is EHLO",
                            rcpt_replies={"carol@winview.test": "452 4.2.2 mailbox full, try later"}) as fake:
            cfg = sender_config(tmp_path, dns, smtp_port)
            res = await deliver_once(cfg, envelope(tmp_path), ["bob@winview.test", "carol@winview.test"])
            return res, fake

    res, fake = asyncio.run(run())
    # No PIPELINING after HELO: one RCPT at a time; no SIZE parameter either.
    assert fake.verbs == ["EHLO", "HELO", "MAIL", "RCPT", "RCPT", "DATA", "QUIT"]
    assert fake.commands[2] == "MAIL FROM:<alice@sender.test>"
    assert [r.status for r in res] == ["delivered", "deferred"]
    assert res[1].reply == "452 4.2.2 mailbox full, try later"


def test_mail_from_5xx_fails_every_recipient(tmp_path: Path, dns: DNSServer, smtp_port: int) -> None:
    dns.add_a("winview.test", MX[2])  # implicit MX

    async def run() -> list[RecipientResult]:
        async with FakeSMTP(MX[2], smtp_port, mail_reply="550 5.7.1 sender blocked"):
            cfg = sender_config(tmp_path, dns, smtp_port)
            return await deliver_once(cfg, envelope(tmp_path), ["bob@winview.test", "x@winview.test"])

    res = asyncio.run(run())
    assert [(r.status, r.reply) for r in res] == [("failed", "550 5.7.1 sender blocked")] * 2


def test_message_bigger_than_size_fails_without_sending(tmp_path: Path, dns: DNSServer, smtp_port: int) -> None:
    dns.add_a("winview.test", MX[2])

    async def run() -> tuple[list[RecipientResult], FakeSMTP]:
        async with FakeSMTP(MX[2], smtp_port, extensions=("PIPELINING", "SIZE 50")) as fake:
            cfg = sender_config(tmp_path, dns, smtp_port)
            res = await deliver_once(cfg, envelope(tmp_path), ["bob@winview.test"])
            return res, fake

    res, fake = asyncio.run(run())
    assert res[0].status == "failed" and res[0].reply.startswith("552 5.3.4"), res
    assert "MAIL" not in fake.verbs and fake.raw_data == []


def test_loops_back_to_myself(tmp_path: Path, dns: DNSServer, smtp_port: int) -> None:
    dns.add_mx("winview.test", 10, "out.sender.test")  # our own hostname is the best MX
    dns.add_a("out.sender.test", MX[4])
    res = deliver(sender_config(tmp_path, dns, smtp_port), envelope(tmp_path), ["bob@winview.test"])
    assert res[0].status == "failed" and res[0].reply == "554 5.4.6 mail for winview.test loops back to myself"


def test_loops_back_by_listen_address_and_backup_mx_tries_only_better(tmp_path: Path, dns: DNSServer, smtp_port: int) -> None:
    dns.add_mx("winview.test", 10, "mx1.winview.test")
    dns.add_mx("winview.test", 20, "backup.winview.test")
    dns.add_a("mx1.winview.test", MX[2])
    dns.add_a("backup.winview.test", MX[5])
    cfg = sender_config(tmp_path, dns, smtp_port)
    # We listen on the best MX's address: a loop.
    me_best = replace(cfg, smtp=Listener((Endpoint(MX[2], smtp_port),)))
    res = deliver(me_best, envelope(tmp_path), ["bob@winview.test"])
    assert res[0].status == "failed" and "loops back to myself" in res[0].reply
    # We are the backup MX: only the better one is tried (down here), never ourselves.
    me_backup = replace(cfg, smtp=Listener((Endpoint(MX[5], smtp_port),)))
    res = deliver(me_backup, envelope(tmp_path), ["bob@winview.test"])
    assert res[0].status == "deferred" and "mx1.winview.test" in res[0].reply


@pytest.mark.parametrize("kind", ["nxdomain", "null"])
def test_nxdomain_and_null_mx_fail_at_once(tmp_path: Path, dns: DNSServer, smtp_port: int, kind: str) -> None:
    if kind == "null":
        dns.add_null_mx("winview.test")
    res = deliver(sender_config(tmp_path, dns, smtp_port), envelope(tmp_path), ["bob@winview.test", "c@winview.test"])
    assert [r.status for r in res] == ["failed", "failed"]
    if kind == "null":
        assert res[0].reply.startswith("556 5.1.10")
    else:
        assert res[0].reply.startswith("550 5.1.2 Host or domain name not found")
        assert "couldn't find host named winview.test" in res[0].reply
    assert res[0].remote_mta is None and res[0].diagnostic_type == "x-local"


def test_dns_servfail_defers(tmp_path: Path, dns: DNSServer, smtp_port: int) -> None:
    dns.set_mode("winview.test", "servfail")
    res = deliver(sender_config(tmp_path, dns, smtp_port), envelope(tmp_path), ["bob@winview.test"])
    assert res[0].status == "deferred" and res[0].reply.startswith("451 4.4.3"), res


def test_relay_smart_host_with_auth_login(tmp_path: Path, dns: DNSServer, smtp_port: int) -> None:
    # No DNS records at all: with a relay, no MX lookup happens.
    async def run() -> tuple[list[RecipientResult], FakeSMTP]:
        async with FakeSMTP(MX[6], smtp_port + 1, auth={"relayuser": "s3cret"}, auth_mechanisms="LOGIN",
                            extensions=("PIPELINING", "SIZE 1000000", "CHUNKING"),
                            rcpt_replies={"x@far.test": "550 5.1.1 unknown"}) as fake:
            cfg = sender_config(tmp_path, dns, smtp_port, relay=Endpoint(MX[6], smtp_port + 1),
                                relay_username="relayuser", relay_password="s3cret", relay_tls="none")
            res = await deliver_once(cfg, envelope(tmp_path), ["bob@far.test", "x@far.test"])
            return res, fake

    res, fake = asyncio.run(run())
    assert fake.auth_seen == [("LOGIN", "relayuser")]
    assert [r.status for r in res] == ["delivered", "failed"], res
    # CHUNKING offered: BDAT, no dot-stuffing.
    assert fake.verbs[-2] == "BDAT" and b"".join(fake.chunks) == MESSAGE
    assert dns.queries == []


def test_relay_requires_starttls_when_configured(tmp_path: Path, dns: DNSServer, smtp_port: int) -> None:
    async def run() -> tuple[list[RecipientResult], FakeSMTP]:
        async with FakeSMTP(MX[6], smtp_port + 1, auth={"u": "p"}) as fake:
            cfg = sender_config(tmp_path, dns, smtp_port, relay=Endpoint(MX[6], smtp_port + 1),
                                relay_username="u", relay_password="p", relay_tls="starttls")
            res = await deliver_once(cfg, envelope(tmp_path), ["bob@far.test"])
            return res, fake

    res, fake = asyncio.run(run())
    assert res[0].status == "deferred" and "4.7.10" in res[0].reply, res
    assert fake.auth_seen == [] and "MAIL" not in fake.verbs  # no password in the clear


def test_relay_through_serpentmail_submission_with_starttls_and_auth_plain(tmp_path: Path, dns: DNSServer) -> None:
    cfg = make_config(tmp_path / "relay", MX[7], listeners=("submission",), hostname="relay.winview.test")
    add_user(cfg, "alice@winview.test", "pw-alice")
    add_user(cfg, "bob@winview.test")
    sub = cfg.submission.listen[0]
    with running_server(cfg):
        sender = sender_config(tmp_path, dns, 25, relay=Endpoint(sub.host, sub.port),
                               relay_username="alice@winview.test", relay_password="pw-alice", relay_tls="starttls")
        env = replace(envelope(tmp_path), sender="alice@winview.test")
        res = deliver(sender, env, ["bob@winview.test"])
        bad = replace(sender, delivery=replace(sender.delivery, relay_password="wrong"))
        res_bad = deliver(bad, env, ["bob@winview.test"])
    assert res[0].status == "delivered", res
    assert maildir_files(cfg, "bob@winview.test")[0].read_bytes().endswith(MESSAGE)
    assert res_bad[0].status == "deferred" and res_bad[0].reply.startswith("535"), res_bad


def test_unexpected_error_is_deferred_not_raised(tmp_path: Path, dns: DNSServer, smtp_port: int) -> None:
    dns.add_a("winview.test", MX[2])
    env = replace(envelope(tmp_path), data_path=tmp_path / "missing.eml")

    async def run() -> list[RecipientResult]:
        async with FakeSMTP(MX[2], smtp_port):
            cfg = sender_config(tmp_path, dns, smtp_port)
            return await deliver_once(cfg, env, ["bob@winview.test"])

    res = asyncio.run(run())
    assert res[0].status == "deferred" and res[0].reply.startswith("451"), res


def test_large_message_streams_in_several_bdat_chunks(tmp_path: Path, dns: DNSServer, smtp_port: int) -> None:
    dns.add_a("winview.test", MX[2])
    mx = receiver_config(tmp_path, "mx1", MX[2], smtp_port)
    line = b"." + b"x" * 1021 + b"\r\n"  # 1 KiB lines, each starting with a dot
    big = b"Subject: big\r\n\r\n" + line * 2600  # ~2.6 MiB: three 1 MiB chunks
    with running_server(mx):
        res = deliver(sender_config(tmp_path, dns, smtp_port), envelope(tmp_path, big), ["bob@winview.test"])
    assert res[0].status == "delivered", res
    assert maildir_files(mx, "bob@winview.test")[0].read_bytes().endswith(big)


def test_tls_verify_domains_require_a_verified_certificate(tmp_path: Path, dns: DNSServer, smtp_port: int) -> None:
    dns.add_a("winview.test", MX[2])
    cfg = sender_config(tmp_path, dns, smtp_port, tls_verify_domains=("winview.test",))
    mx = receiver_config(tmp_path, "mx1", MX[2], smtp_port)
    with running_server(mx):  # STARTTLS with a self-signed certificate: verification fails
        res = deliver(cfg, envelope(tmp_path), ["bob@winview.test"])
    assert res[0].status == "deferred" and res[0].reply.startswith("451 4.7.5"), res
    assert maildir_files(mx, "bob@winview.test") == []

    async def no_starttls() -> tuple[list[RecipientResult], FakeSMTP]:
        async with FakeSMTP(MX[2], smtp_port) as fake:
            res = await deliver_once(cfg, envelope(tmp_path), ["bob@winview.test"])
            return res, fake

    res, fake = asyncio.run(no_starttls())
    assert res[0].status == "deferred" and "4.7.10" in res[0].reply and "MAIL" not in fake.verbs


def test_non_ascii_recipient_needs_smtputf8(tmp_path: Path, dns: DNSServer, smtp_port: int) -> None:
    dns.add_a("winview.test", MX[2])

    async def run(ext: tuple[str, ...]) -> tuple[list[RecipientResult], FakeSMTP]:
        async with FakeSMTP(MX[2], smtp_port, extensions=ext) as fake:
            cfg = sender_config(tmp_path, dns, smtp_port)
            env = envelope(tmp_path, smtputf8=True)
            res = await deliver_once(cfg, env, ["bob@winview.test", "jürgen@winview.test"])
            return res, fake

    res, fake = asyncio.run(run(("PIPELINING",)))
    assert [r.status for r in res] == ["delivered", "failed"] and res[1].reply.startswith("553 5.6.7")
    assert fake.commands[1] == "MAIL FROM:<alice@sender.test>"
    res, fake = asyncio.run(run(("PIPELINING", "SMTPUTF8")))
    assert [r.status for r in res] == ["delivered", "delivered"]
    assert fake.commands[1] == "MAIL FROM:<alice@sender.test> SMTPUTF8"


# --- connection reuse (RFC 5321 §3.3; issue 5: "several messages ... may reuse a connection") ---


class ScriptedMX:
    """A minimal SMTP server with one knob per connection-reuse test.

    ``after_message``: what a connection whose number (1-based) is in ``misbehave_on`` does
    once it has accepted a message: "close" (silently, as an idle timeout would), "421"
    (RFC 5321 §3.8 shutdown notice, then close); with ``at_next_mail`` it does so only when
    the next MAIL arrives (the client cannot see it coming). ``swallow_dot_on``: message numbers (1-based,
    over all connections) whose end of data is read but never answered, the connection then
    closed. ``hold_until_data``: MAIL/RCPT replies are held back until the DATA line arrives,
    so a client that waits for them before sending DATA times out. ``rcpt_reply``: the reply
    to every RCPT; DATA is answered 354 whatever happened before (as some servers do).
    """

    def __init__(self, host: str, port: int, *, after_message: str = "", misbehave_on: tuple[int, ...] = (),
                 swallow_dot_on: tuple[int, ...] = (), hold_until_data: bool = False,
                 rcpt_reply: bytes = b"250 2.1.5 OK\r\n", at_next_mail: bool = False) -> None:
        self.host, self.port = host, port
        self.after_message = after_message
        self.misbehave_on = misbehave_on
        self.swallow_dot_on = swallow_dot_on
        self.hold_until_data = hold_until_data
        self.rcpt_reply = rcpt_reply
        self.at_next_mail = at_next_mail
        self.connections = 0
        self.messages: list[bytes] = []  # every message whose end of data arrived
        self.verbs: list[list[str]] = []  # per connection
        self._server: asyncio.base_events.Server | None = None

    async def __aenter__(self) -> ScriptedMX:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        verbs: list[str] = []
        self.verbs.append(verbs)
        held: list[bytes] = []
        writer.write(b"220 scripted.test ESMTP\r\n")
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                verb = line.split(b" ", 1)[0].strip().upper().decode()
                verbs.append(verb)
                match verb:
                    case "EHLO":
                        writer.write(b"250-scripted.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
                    case "MAIL" if self.at_next_mail and number in self.misbehave_on and verbs.count("MAIL") > 1:
                        if self.after_message == "421":
                            writer.write(b"421 4.4.2 scripted.test closing\r\n")
                            await writer.drain()
                        return
                    case "MAIL" | "RCPT" | "RSET" | "NOOP":
                        reply = self.rcpt_reply if verb == "RCPT" else b"250 2.0.0 OK\r\n"
                        if self.hold_until_data and verb in ("MAIL", "RCPT"):
                            held.append(reply)
                        else:
                            writer.write(reply)
                    case "DATA":
                        writer.write(b"".join(held) + b"354 go ahead\r\n")
                        held.clear()
                        await writer.drain()
                        content = b""
                        while not content.endswith(b"\r\n.\r\n") and content != b".\r\n":
                            content += await reader.readuntil(b"\r\n")
                        self.messages.append(content)
                        if len(self.messages) in self.swallow_dot_on:
                            return
                        writer.write(b"250 2.0.0 queued\r\n")
                        if number in self.misbehave_on and not self.at_next_mail:
                            if self.after_message == "421":
                                writer.write(b"421 4.4.2 scripted.test idle timeout, closing\r\n")
                            await writer.drain()
                            return
                    case "QUIT":
                        writer.write(b"221 2.0.0 bye\r\n")
                        await writer.drain()
                        return
                    case _:
                        writer.write(b"502 5.5.1 no\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


def _msg(i: int) -> bytes:
    return f"Subject: message {i}\r\n\r\nbody {i}\r\n".encode()


def _env(tmp_path: Path, i: int) -> Envelope:
    path = tmp_path / f"msg{i}.eml"
    path.write_bytes(_msg(i))
    return Envelope(queue_id=f"Q{i}", sender="alice@sender.test", data_path=path, size=len(_msg(i)))


def test_several_messages_reuse_one_connection(tmp_path: Path, dns: DNSServer, smtp_port: int) -> None:
    dns.add_a("winview.test", MX[2])

    async def run() -> tuple[list[RecipientResult], FakeSMTP, int]:
        async with FakeSMTP(MX[2], smtp_port) as fake:
            courier = RemoteCourier(sender_config(tmp_path, dns, smtp_port), timeouts=FAST)
            res = []
            for i in range(3):
                res += await courier.deliver(_env(tmp_path, i), ["bob@winview.test"])
            idle = len(courier.cache)
            await courier.aclose()
            return res, fake, idle

    res, fake, idle = asyncio.run(run())
    assert [r.status for r in res] == ["delivered"] * 3, res
    assert fake.connections == 1 and idle == 1
    # One greeting and EHLO, then three transactions, then QUIT when the cache is closed.
    assert fake.verbs == ["EHLO"] + ["MAIL", "RCPT", "DATA"] * 3 + ["QUIT"]
    assert fake.raw_data == [_msg(i) + b".\r\n" for i in range(3)]


def test_concurrent_deliveries_never_share_a_connection(tmp_path: Path, dns: DNSServer, smtp_port: int) -> None:
    dns.add_a("winview.test", MX[2])

    async def run() -> tuple[list[RecipientResult], FakeSMTP]:
        # The first message is answered only once all three are connected, so the three
        # really overlap (a loaded machine could otherwise finish one before the third began).
        async with FakeSMTP(MX[2], smtp_port, hold_data_until_connections=3) as fake:
            courier = RemoteCourier(sender_config(tmp_path, dns, smtp_port), timeouts=FAST)
            res: list[RecipientResult] = []
            for wave in range(2):
                outs = await asyncio.gather(*(courier.deliver(_env(tmp_path, 3 * wave + k), ["bob@winview.test"])
                                              for k in range(3)))
                res += [r for out in outs for r in out]
            await courier.aclose()
            return res, fake

    res, fake = asyncio.run(run())
    assert [r.status for r in res] == ["delivered"] * 6, res
    # Three at once need three connections; the second wave reuses them, one each.
    assert fake.connections == 3
    assert sorted(fake.raw_data) == sorted(_msg(i) + b".\r\n" for i in range(6))


@pytest.mark.parametrize("how", ["close", "421"])
@pytest.mark.parametrize("at_next_mail", [False, True], ids=["while-idle", "at-next-mail"])
def test_reused_connection_lost_before_data_falls_back_to_a_fresh_one(tmp_path: Path, dns: DNSServer,
                                                                      smtp_port: int, how: str,
                                                                      at_next_mail: bool) -> None:
    dns.add_a("winview.test", MX[2])

    async def run() -> tuple[list[RecipientResult], ScriptedMX]:
        async with ScriptedMX(MX[2], smtp_port, after_message=how, misbehave_on=(1,),
                              at_next_mail=at_next_mail) as mx:
            courier = RemoteCourier(sender_config(tmp_path, dns, smtp_port), timeouts=FAST)
            res = await courier.deliver(_env(tmp_path, 1), ["bob@winview.test"])
            await asyncio.sleep(0.1)  # the server has hung up on the idle connection by now
            res += await courier.deliver(_env(tmp_path, 2), ["bob@winview.test"])
            await courier.aclose()
            return res, mx

    res, mx = asyncio.run(run())
    assert [r.status for r in res] == ["delivered", "delivered"], res
    # The second message went over a second connection, exactly once: nothing lost, no duplicate.
    assert mx.connections == 2
    assert mx.verbs[1] == ["EHLO", "MAIL", "RCPT", "DATA", "QUIT"]
    if at_next_mail:
        assert mx.verbs[0][-1] == "MAIL"  # the reuse was tried, and failed at MAIL
    assert mx.messages == [_msg(1) + b".\r\n", _msg(2) + b".\r\n"]


def test_reused_connection_lost_after_end_of_data_defers_without_retry(tmp_path: Path, dns: DNSServer,
                                                                       smtp_port: int) -> None:
    dns.add_a("winview.test", MX[2])

    async def run() -> tuple[list[RecipientResult], ScriptedMX]:
        async with ScriptedMX(MX[2], smtp_port, swallow_dot_on=(2,)) as mx:
            courier = RemoteCourier(sender_config(tmp_path, dns, smtp_port), timeouts=FAST)
            res = await courier.deliver(_env(tmp_path, 1), ["bob@winview.test"])
            res += await courier.deliver(_env(tmp_path, 2), ["bob@winview.test"])
            await courier.aclose()
            return res, mx

    res, mx = asyncio.run(run())
    # The server may have committed message 2 (RFC 5321 §6.1): deferred, not resent elsewhere.
    assert [r.status for r in res] == ["delivered", "deferred"], res
    assert "after end of data" in res[1].reply
    assert mx.connections == 1 and len(mx.messages) == 2


def test_idle_connection_expires_with_quit(tmp_path: Path, dns: DNSServer, smtp_port: int) -> None:
    dns.add_a("winview.test", MX[2])

    async def run() -> tuple[list[RecipientResult], FakeSMTP, int]:
        async with FakeSMTP(MX[2], smtp_port) as fake:
            courier = RemoteCourier(sender_config(tmp_path, dns, smtp_port), timeouts=FAST,
                                    cache=ConnectionCache(idle_timeout=0.2))
            res = await courier.deliver(_env(tmp_path, 1), ["bob@winview.test"])
            await asyncio.sleep(0.6)
            idle = len(courier.cache)
            res += await courier.deliver(_env(tmp_path, 2), ["bob@winview.test"])
            await courier.aclose()
            return res, fake, idle

    res, fake, idle = asyncio.run(run())
    assert [r.status for r in res] == ["delivered", "delivered"]
    assert idle == 0 and fake.connections == 2
    assert fake.verbs == ["EHLO", "MAIL", "RCPT", "DATA", "QUIT"] * 2


def test_no_reuse_when_the_cache_is_off(tmp_path: Path, dns: DNSServer, smtp_port: int) -> None:
    dns.add_a("winview.test", MX[2])

    async def run() -> FakeSMTP:
        async with FakeSMTP(MX[2], smtp_port) as fake:
            courier = RemoteCourier(sender_config(tmp_path, dns, smtp_port), timeouts=FAST,
                                    cache=ConnectionCache(idle_timeout=0))
            for i in range(2):
                await courier.deliver(_env(tmp_path, i), ["bob@winview.test"])
            return fake

    fake = asyncio.run(run())
    assert fake.connections == 2 and fake.verbs.count("QUIT") == 2


def test_data_is_pipelined_with_mail_and_rcpt(tmp_path: Path, dns: DNSServer, smtp_port: int) -> None:
    # RFC 2920 §3.1: DATA may close the command group. This server answers MAIL and RCPT only
    # once DATA has arrived: a client that waited for them before sending DATA would time out.
    dns.add_a("winview.test", MX[2])

    async def run() -> tuple[list[RecipientResult], ScriptedMX]:
        async with ScriptedMX(MX[2], smtp_port, hold_until_data=True) as mx:
            res = await deliver_once(sender_config(tmp_path, dns, smtp_port), _env(tmp_path, 1),
                                     ["bob@winview.test", "carol@winview.test"])
            return res, mx

    res, mx = asyncio.run(run())
    assert [r.status for r in res] == ["delivered", "delivered"], res
    assert mx.verbs == [["EHLO", "MAIL", "RCPT", "RCPT", "DATA", "QUIT"]]


def test_all_recipients_refused_but_data_accepted_sends_only_the_dot(tmp_path: Path, dns: DNSServer,
                                                                    smtp_port: int) -> None:
    # The server answers 354 to a pipelined DATA even with no valid recipient: the client must
    # then end the data at once (RFC 2920 §3.1) and never send the message.
    dns.add_a("winview.test", MX[2])

    async def run() -> tuple[list[RecipientResult], ScriptedMX]:
        async with ScriptedMX(MX[2], smtp_port, rcpt_reply=b"550 5.1.1 no such user\r\n") as mx:
            res = await deliver_once(sender_config(tmp_path, dns, smtp_port), _env(tmp_path, 1), ["bob@winview.test"])
            return res, mx

    res, mx = asyncio.run(run())
    assert [(r.status, r.reply) for r in res] == [("failed", "550 5.1.1 no such user")]
    assert mx.messages == [b".\r\n"]
