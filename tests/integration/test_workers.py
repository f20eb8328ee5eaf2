"""``workers = N``: a real ``serpentmail serve`` with several processes on 127.0.15.x.

Checked as an administrator would: every message lands in the Maildir whatever process took
the connection; mail queued by any worker reaches the remote host (each worker delivers and
retries its own share of the queue); a killed worker is replaced; SIGTERM stops every process; a taken port is one
clear error line.
"""

from __future__ import annotations

import contextlib
import os
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from serpentmail.accounts.db import AccountDB
from serpentmail.config import Config
from tests.helpers import (
    add_user,
    free_port,
    free_ports,
    maildir_files,
    make_config,
    running_server,
)

HOST = "127.0.15.1"
REMOTE = "127.0.15.2"


def _conf(tmp_path: Path, *, workers: int, relay: tuple[str, int] | None = None,
          smtp_port: int | None = None, limits: str = "", delivery: str = "") -> tuple[Path, dict[str, int]]:
    smtp, submission, pop3 = free_ports(HOST, 3)
    ports = {"smtp": smtp_port or smtp, "submission": submission, "pop3": pop3}
    text = f"""hostname = "mx.w.test"
data_dir = "{tmp_path / 'data'}"
workers = {workers}
[smtp]
listen = ["{HOST}:{ports['smtp']}"]
[submission]
listen = ["{HOST}:{ports['submission']}"]
[submissions]
listen = []
[pop3]
listen = ["{HOST}:{ports['pop3']}"]
[pop3s]
listen = []
[log]
file = "{tmp_path / 'serve.log'}"
[limits]
auth_failure_delay = "0.05s"
{limits}
"""
    if relay:
        text += f'[delivery]\nrelay = "{relay[0]}:{relay[1]}"\nrelay_tls = "none"\n{delivery}\n'
    path = tmp_path / "mail.toml"
    path.write_text(text)
    db = AccountDB(tmp_path / "data" / "accounts.sqlite3")
    db.ensure_domain("w.test")
    db.add_user("bill@w.test", "billpw")
    db.close()
    return path, ports


def _tls() -> ssl.SSLContext:
    """A client context for the test servers' self-signed certificates."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _submit(ports: dict[str, int], n: int, tag: str, word: str) -> None:
    """``n`` messages from bill@w.test to joe@r.test in one submission session (STARTTLS +
    AUTH), with subject ``<tag><i>`` and body ``<word> <i>``."""
    with smtplib.SMTP(HOST, ports["submission"], timeout=10) as s:
        s.starttls(context=_tls())
        s.login("bill@w.test", "billpw")
        for i in range(n):
            s.sendmail("bill@w.test", ["joe@r.test"], f"Subject: {tag}{i}\r\n\r\n{word} {i}\r\n".encode())


def _remote_dest(tmp_path: Path) -> Config:
    """Another organisation's server (its own data directory on REMOTE) with one user,
    joe@r.test, for the relay to deliver to."""
    dest = make_config(tmp_path / "dest", REMOTE, listeners=("smtp",), hostname="mx.r.test")
    add_user(dest, "joe@r.test")
    return dest


def _children(pid: int) -> set[int]:
    out: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            out.update(int(c) for c in (task / "children").read_text().split())
    return out


def _wait(cond: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((HOST, port)) == 0


@contextlib.contextmanager
def serve(conf: Path, ports: dict[str, int], workers: int) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-m", "serpentmail", "-c", str(conf), "serve"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait(lambda: _port_open(ports["smtp"]) and len(_children(proc.pid)) == workers)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _maildir(tmp_path: Path, user_id: int = 1) -> Path:
    return tmp_path / "data" / "mail" / str(user_id) / "new"


def _count(d: Path) -> int:
    return len(list(d.iterdir())) if d.exists() else 0


def test_two_workers_store_every_message_and_stop_together_on_sigterm(tmp_path: Path) -> None:
    conf, ports = _conf(tmp_path, workers=2)
    with serve(conf, ports, 2) as proc:
        kids = _children(proc.pid)
        assert len(kids) == 2
        n = 40
        for i in range(n):
            with smtplib.SMTP(HOST, ports["smtp"], timeout=10) as s:
                s.sendmail("x@else.test", ["bill@w.test"], f"Subject: m{i}\r\n\r\nbody {i}\r\n".encode())
        files = sorted(_maildir(tmp_path).iterdir())
        assert len(files) == n  # each 250 came after the file was in new/
        bodies = {f.read_bytes().split(b"\r\n\r\n", 1)[1] for f in files}
        assert bodies == {f"body {i}\r\n".encode() for i in range(n)}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        for kid in kids:
            assert not Path(f"/proc/{kid}").exists() or "zombie" in Path(f"/proc/{kid}/status").read_text()
    log = (tmp_path / "serve.log").read_text()
    assert "worker=1/2" in log and "worker=2/2" in log and "all workers stopped" in log
    assert "Traceback" not in log


def _pids(files: list[Path]) -> set[str]:
    """The worker process ids in Maildir file names (``<time>.M<usec>P<pid>Q<n>.<host>``)."""
    return {f.name.split("P", 1)[1].split("Q", 1)[0] for f in files}


def test_one_client_at_a_time_is_served_by_one_worker_and_a_busy_server_by_all(tmp_path: Path) -> None:
    """server/steering.py: connections one after the other all go to the same worker (with
    the kernel's hash, 20 would land on both); with three held open, new ones are spread."""
    conf, ports = _conf(tmp_path, workers=2)
    new = _maildir(tmp_path)

    def send(tag: str, n: int) -> list[Path]:
        before = set(new.iterdir()) if new.exists() else set()
        for i in range(n):
            with smtplib.SMTP(HOST, ports["smtp"], timeout=10) as s:
                s.sendmail("x@else.test", ["bill@w.test"], f"Subject: {tag} {i}\r\n\r\nx\r\n".encode())
        return sorted(set(new.iterdir()) - before)

    with serve(conf, ports, 2):
        # Until the last worker has started, the kernel's hash still decides.
        _wait(lambda: (tmp_path / "serve.log").read_text().count("serpentmail.server: started") >= 2)
        alone = send("alone", 20)
        assert len(alone) == 20 and len(_pids(alone)) == 1
        held = [smtplib.SMTP(HOST, ports["smtp"], timeout=10) for _ in range(3)]
        try:
            for h in held:
                h.ehlo()
            busy = send("busy", 30)
            assert len(busy) == 30 and len(_pids(busy)) == 2
        finally:
            for h in held:
                h.quit()
        time.sleep(0.3)  # the server sees the three closes
        again = send("again", 12)
        assert len(again) == 12 and _pids(again) == _pids(alone)
    assert "Traceback" not in (tmp_path / "serve.log").read_text()


@pytest.mark.parametrize("which", ["first", "last"])  # the last one steers connections
def test_a_killed_worker_is_replaced_and_mail_keeps_flowing(tmp_path: Path, which: str) -> None:
    conf, ports = _conf(tmp_path, workers=2)
    with serve(conf, ports, 2) as proc:
        kids = _children(proc.pid)
        victim = min(kids) if which == "first" else max(kids)  # forked in order
        os.kill(victim, signal.SIGKILL)
        _wait(lambda: victim not in _children(proc.pid) and len(_children(proc.pid)) == 2)
        for i in range(10):
            with smtplib.SMTP(HOST, ports["smtp"], timeout=10) as s:
                s.sendmail("x@else.test", ["bill@w.test"], f"Subject: after {i}\r\n\r\nx\r\n".encode())
        assert _count(_maildir(tmp_path)) == 10
    assert "worker died, restarting" in (tmp_path / "serve.log").read_text()


def test_each_worker_makes_its_spool_files_in_its_own_directory(tmp_path: Path) -> None:
    """tmp/spare/w0 and w1: no directory lock shared between the processes when they create
    files, and a replaced worker empties its own directory of what its predecessor left."""
    conf, ports = _conf(tmp_path, workers=2)
    spare = tmp_path / "data" / "tmp" / "spare"
    with serve(conf, ports, 2) as proc:
        for i in range(20):
            with smtplib.SMTP(HOST, ports["smtp"], timeout=10) as s:
                s.sendmail("x@else.test", ["bill@w.test"], f"Subject: {i}\r\n\r\nx\r\n".encode())
        assert _count(_maildir(tmp_path)) == 20
        assert sorted(p.name for p in spare.iterdir()) == ["w0", "w1"]  # no file of its own
        assert _count(spare / "w0") + _count(spare / "w1") > 0  # the pools' ready files
        left = spare / "w0" / "left.by.the.dead"
        left.write_bytes(b"x")
        first = min(_children(proc.pid))  # forked in order: worker 0
        os.kill(first, signal.SIGKILL)
        _wait(lambda: first not in _children(proc.pid) and len(_children(proc.pid)) == 2)
        _wait(lambda: not left.exists())


def test_spool_directories_of_workers_no_longer_configured_are_emptied_at_start(tmp_path: Path) -> None:
    """Started with fewer workers than before (here one, which uses tmp/spare itself), the
    server still empties the directories of the workers it no longer has."""
    conf, ports = _conf(tmp_path, workers=1)
    old = tmp_path / "data" / "tmp" / "spare" / "w3"
    old.mkdir(parents=True)
    (old / "left.by.a.fourth.worker").write_bytes(b"x")
    with serve(conf, ports, 0):
        assert not any(old.iterdir())


def test_mail_queued_by_any_worker_reaches_the_remote_host(tmp_path: Path) -> None:
    dest = _remote_dest(tmp_path)
    ctx = _tls()
    with running_server(dest) as remote:
        conf, ports = _conf(tmp_path, workers=2, relay=remote.endpoint("smtp"))
        with serve(conf, ports, 2) as proc:
            n = 24
            for i in range(n):  # one connection each: the kernel spreads them over both workers
                with smtplib.SMTP(HOST, ports["submission"], timeout=10) as s:
                    s.starttls(context=ctx)
                    s.login("bill@w.test", "billpw")
                    s.sendmail("bill@w.test", ["joe@r.test"], f"Subject: r{i}\r\n\r\nremote {i}\r\n".encode())
            _wait(lambda: len(maildir_files(dest, "joe@r.test")) >= n, timeout=30)
            time.sleep(0.5)
            got = [p.read_bytes() for p in maildir_files(dest, "joe@r.test")]
            assert len(got) == n  # each exactly once
            assert {g.split(b"\r\n\r\n", 1)[1] for g in got} == {f"remote {i}\r\n".encode() for i in range(n)}
            _wait(lambda: not any((tmp_path / "data" / "queue" / "env").iterdir()), timeout=10)
            assert proc.poll() is None


def test_each_worker_retries_its_own_deferred_mail_and_queue_flush_reaches_them_all(tmp_path: Path) -> None:
    """The queue is partitioned among the workers by id: mail deferred by either worker stays
    in that worker's share, and one `queue flush` makes every worker try its share again."""
    from serpentmail.cli import main
    from serpentmail.queue.store import QueueStore, owner_of

    dest = _remote_dest(tmp_path)
    ep = dest.smtp.listen[0]
    conf, ports = _conf(tmp_path, workers=2, relay=(ep.host, ep.port),
                        delivery='retry_schedule = ["1h"]\nconnect_timeout = "2s"')
    queue = QueueStore(tmp_path / "data")
    n = 24
    with serve(conf, ports, 2):
        ctx = _tls()
        # Many connections at once, so the kernel spreads them over both workers (a lone one
        # goes to the last worker: server/steering.py). Nobody listens at the destination yet:
        # every message is deferred.
        with contextlib.ExitStack() as stack:
            clients = [stack.enter_context(smtplib.SMTP(HOST, ports["submission"], timeout=10)) for _ in range(n)]
            for i, s in enumerate(clients):
                s.starttls(context=ctx)
                s.login("bill@w.test", "billpw")
                s.sendmail("bill@w.test", ["joe@r.test"], f"Subject: d{i}\r\n\r\ndeferred {i}\r\n".encode())

        def all_tried() -> bool:
            recs = list(queue.scan())
            return len(recs) == n and all(r.recipients[0].attempts == 1 for r in recs)

        _wait(all_tried, timeout=30)
        owners = {owner_of(r.id, 2) for r in queue.scan()}
        assert owners == {0, 1}  # both workers took mail, each kept its own
        with running_server(dest):
            time.sleep(1.5)
            assert maildir_files(dest, "joe@r.test") == []  # the next try is an hour away
            assert main(["-c", str(conf), "queue", "flush"]) == 0
            _wait(lambda: len(maildir_files(dest, "joe@r.test")) >= n, timeout=30)
            _wait(lambda: not any((tmp_path / "data" / "queue" / "env").iterdir()), timeout=10)
            time.sleep(1.5)  # a request acted on twice would send nothing more: nothing is left
            got = [p.read_bytes().split(b"\r\n\r\n", 1)[1] for p in maildir_files(dest, "joe@r.test")]
    assert sorted(got) == sorted(f"deferred {i}\r\n".encode() for i in range(n))  # each once
    assert "Traceback" not in (tmp_path / "serve.log").read_text()


def test_a_worker_started_again_takes_up_its_share_of_the_queue(tmp_path: Path) -> None:
    """Mail deferred by a worker that is then killed is not orphaned: the worker started in its
    place loads the same share of the queue and delivers it, once."""
    from serpentmail.cli import main

    dest = _remote_dest(tmp_path)
    ep = dest.smtp.listen[0]
    conf, ports = _conf(tmp_path, workers=2, relay=(ep.host, ep.port),
                        delivery='retry_schedule = ["1h"]\nconnect_timeout = "2s"')
    env = tmp_path / "data" / "queue" / "env"
    n = 5
    with serve(conf, ports, 2) as proc:
        _submit(ports, n, "o", "orphan")  # a lone client: the last worker
        _wait(lambda: "status=deferred" in (tmp_path / "serve.log").read_text()
              and (tmp_path / "serve.log").read_text().count("status=deferred") >= n, timeout=30)
        victim = max(_children(proc.pid))
        os.kill(victim, signal.SIGKILL)
        _wait(lambda: victim not in _children(proc.pid) and len(_children(proc.pid)) == 2)
        assert len(list(env.iterdir())) == n
        with running_server(dest):
            _wait(lambda: (tmp_path / "serve.log").read_text().count("scheduler started") >= 3)
            assert main(["-c", str(conf), "queue", "flush"]) == 0
            _wait(lambda: len(maildir_files(dest, "joe@r.test")) >= n, timeout=30)
            _wait(lambda: not any(env.iterdir()), timeout=10)
            time.sleep(1.0)
            got = [p.read_bytes().split(b"\r\n\r\n", 1)[1] for p in maildir_files(dest, "joe@r.test")]
    assert sorted(got) == [f"orphan {i}\r\n".encode() for i in range(n)]


def test_a_taken_port_is_one_clear_error(tmp_path: Path) -> None:
    with socket.socket() as blocker:
        blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        blocker.bind((HOST, 0))
        blocker.listen(1)
        port = blocker.getsockname()[1]
        conf, _ports = _conf(tmp_path, workers=2, smtp_port=port)
        res = subprocess.run([sys.executable, "-m", "serpentmail", "-c", str(conf), "serve"],
                             capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
    assert f"cannot listen on {HOST}:{port} (smtp)" in res.stderr
    assert "Traceback" not in res.stderr + res.stdout


@pytest.mark.parametrize("value,ok", [("2", True), ('"auto"', True), ("0", False), ('"many"', False)])
def test_workers_key_is_validated(tmp_path: Path, value: str, ok: bool) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text(f'data_dir = "{tmp_path}"\nworkers = {value}\n')
    res = subprocess.run([sys.executable, "-m", "serpentmail", "-c", str(conf), "config", "check"],
                         capture_output=True, text=True, timeout=60)
    assert (res.returncode == 0) == ok, res.stderr
    if not ok:
        assert "key 'workers'" in res.stderr and ":2:" in res.stderr


def test_workers_do_not_outlive_a_killed_supervisor(tmp_path: Path) -> None:
    conf, ports = _conf(tmp_path, workers=2)
    with serve(conf, ports, 2) as proc:
        kids = _children(proc.pid)
        proc.kill()
        proc.wait()
        _wait(lambda: not any(Path(f"/proc/{k}").exists() for k in kids), timeout=30)
        assert not _port_open(ports["smtp"])


def _auth_plain(c: smtplib.SMTP, user: str, password: str) -> int:
    """One AUTH PLAIN attempt (smtplib's login() would go on with other mechanisms)."""
    c.ehlo()
    c.user, c.password = user, password
    try:
        return c.auth("PLAIN", c.auth_plain)[0]
    except smtplib.SMTPAuthenticationError as exc:
        return exc.smtp_code


def test_limits_count_for_the_whole_server_not_per_worker(tmp_path: Path) -> None:
    """Connections per IP and failed logins are shared between the workers (server/peers.py):
    whichever process takes the next connection, the client meets the same limits."""
    conf, ports = _conf(tmp_path, workers=2, limits="max_connections_per_ip = 4\nauth_max_failures = 3")
    ctx = _tls()
    with serve(conf, ports, 2):
        # serve() probed the port until the workers existed; those probe connections count
        # (from this same address) until the workers have seen them close.
        _wait(lambda: "worker=1/2" in (tmp_path / "serve.log").read_text()
              and "worker=2/2" in (tmp_path / "serve.log").read_text())
        time.sleep(1.0)
        held = [socket.create_connection((HOST, ports["smtp"]), timeout=10) for _ in range(4)]
        try:
            for s in held:
                assert s.recv(512).startswith(b"220")
            time.sleep(0.3)
            for _ in range(6):  # the kernel spreads these over both workers: each refuses
                with socket.create_connection((HOST, ports["smtp"]), timeout=10) as extra:
                    assert extra.recv(512).startswith(b"421 4.7.0 Too many connections from your address")
        finally:
            for s in held:
                s.close()

        def greeted() -> bool:  # released everywhere once the workers have seen them close
            with socket.create_connection((HOST, ports["smtp"]), timeout=10) as again:
                return again.recv(512).startswith(b"220")

        _wait(greeted)

        def submission() -> smtplib.SMTP:
            # A connection closed a moment ago may still count where it was served (its worker
            # has not seen the close yet): this part is about logins, so wait that out.
            deadline = time.monotonic() + 10
            while True:
                try:
                    return smtplib.SMTP(HOST, ports["submission"], timeout=10)
                except smtplib.SMTPConnectError as exc:
                    if exc.smtp_code != 421 or time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)

        for _ in range(3):
            with submission() as c:
                c.starttls(context=ctx)
                assert _auth_plain(c, "bill@w.test", "wrong") == 535
        time.sleep(0.3)
        for _ in range(6):  # over the threshold on whichever worker: refused, even the right password
            with submission() as c:
                c.starttls(context=ctx)
                assert _auth_plain(c, "bill@w.test", "billpw") == 454


@pytest.mark.parametrize("workers", [1, 2])
def test_a_second_server_on_a_live_data_dir_refuses_before_touching_it(tmp_path: Path, workers: int) -> None:
    """Its start would otherwise clean the live server's temp and spool files as a crash's
    leftovers: it stops at the data directory's lock, with one clear line."""
    conf, ports = _conf(tmp_path, workers=workers)
    other = tmp_path / "other"
    other.mkdir()
    conf2, _ = _conf(other, workers=1)
    # The same data directory, other ports.
    conf2.write_text(conf2.read_text().replace(str(other / "data"), str(tmp_path / "data")))
    spare = tmp_path / "data" / "tmp" / "spare"
    with serve(conf, ports, workers if workers > 1 else 0) as proc:
        with smtplib.SMTP(HOST, ports["smtp"], timeout=10) as s:  # the spool files are made ahead from then on
            s.sendmail("x@else.test", ["bill@w.test"], b"Subject: first\r\n\r\nbody\r\n")
        _wait(lambda: spare.exists() and any(spare.iterdir()))
        before = {p.name for p in spare.iterdir()}
        res = subprocess.run([sys.executable, "-m", "serpentmail", "-c", str(conf2), "serve"],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode != 0
        assert f"data directory {tmp_path / 'data'} is in use by another serpentmail server (pid {proc.pid})" in res.stderr
        assert "Traceback" not in res.stderr + res.stdout
        assert before <= {p.name for p in spare.iterdir()}  # nothing of the live server's removed
        with smtplib.SMTP(HOST, ports["smtp"], timeout=10) as s:
            s.sendmail("x@else.test", ["bill@w.test"], b"Subject: still here\r\n\r\nbody\r\n")
        assert _count(_maildir(tmp_path)) == 2
    # Once the first has stopped, the same command starts.
    proc2 = subprocess.Popen([sys.executable, "-m", "serpentmail", "-c", str(conf2), "serve"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait(lambda: "started" in (other / "serve.log").read_text() if (other / "serve.log").exists() else False)
        assert proc2.poll() is None
    finally:
        proc2.send_signal(signal.SIGTERM)
        assert proc2.wait(20) == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_mail_deleted_over_pop3_just_after_arrival_stays_deleted_after_a_kill(tmp_path: Path, workers: int) -> None:
    """A message is journaled before its 250 and the journal's record stays pending for about
    a second. A POP3 session that deletes it within that second must not let a crash (a
    replay at the next start) bring it back: the deletion waits for the record's checkpoint.
    With two workers the record may be in the other process's journal."""
    import poplib

    conf, ports = _conf(tmp_path, workers=workers)
    with serve(conf, ports, workers if workers > 1 else 0) as proc:
        kids = _children(proc.pid)
        for i in range(3):
            with smtplib.SMTP(HOST, ports["smtp"], timeout=10) as s:
                s.sendmail("x@else.test", ["bill@w.test"], f"Subject: m{i}\r\n\r\nbody {i}\r\n".encode())
        p = poplib.POP3(HOST, ports["pop3"], timeout=10)
        p.user("bill@w.test")
        p.pass_("billpw")
        count = len(p.list()[1])
        assert count == 3
        for n in range(1, count + 1):
            p.retr(n)
            p.dele(n)
        assert p.quit().startswith(b"+OK")
        proc.kill()  # at once: no clean stop, no final checkpoint
        proc.wait()
        _wait(lambda: not any(Path(f"/proc/{k}").exists() for k in kids), timeout=30)
    with serve(conf, ports, workers if workers > 1 else 0):
        mail = tmp_path / "data" / "mail" / "1"
        assert sorted(p.name for sub in ("new", "cur") for p in (mail / sub).iterdir()) == []
    assert "restored=" not in (tmp_path / "serve.log").read_text()


def test_relayed_mail_is_not_sent_again_after_a_kill_right_after_delivery(tmp_path: Path) -> None:
    """Queue items are journaled by the process that delivers them, and removed with no flush
    once delivered, the removal recorded in the journal (queue/store.py). A kill a moment
    later leaves their records pending: the replay at the next start must finish those
    removals, not send the mail again, and must lose nothing that was acknowledged."""
    from serpentmail.storage.journal import records

    dest = _remote_dest(tmp_path)
    n = 30
    with running_server(dest) as remote:
        conf, ports = _conf(tmp_path, workers=1, relay=remote.endpoint("smtp"))
        with serve(conf, ports, 0) as proc:
            _submit(ports, n, "k", "killed")
            # Every item delivered and removed (normally well within the second before the
            # journal's checkpoint, so their records are still pending), then killed at once.
            _wait(lambda: len(maildir_files(dest, "joe@r.test")) >= n, timeout=30)
            # Each removal recorded (the event loop writes the record at once unless a flush
            # holds the journal; then the next write or the checkpointer's round does).
            journal = tmp_path / "data" / "journal" / "w0.log"
            _wait(lambda: sum(t.startswith("-queue/env/") for ts, _ in records(journal) for t in ts) >= n
                  or not list(records(journal)), timeout=30)
            proc.kill()
            proc.wait()
        pending = list(records(tmp_path / "data" / "journal" / "w0.log"))
        with serve(conf, ports, 0):
            time.sleep(1.0)  # anything the replay put back would be sent now
            _wait(lambda: not any((tmp_path / "data" / "queue" / "env").iterdir()), timeout=30)
        got = [p.read_bytes().split(b"\r\n\r\n", 1)[1] for p in maildir_files(dest, "joe@r.test")]
    assert set(got) == {f"killed {i}\r\n".encode() for i in range(n)}  # nothing lost
    # Were the recorded removals undone, every item still in the journal would come twice.
    assert len(got) == n, (len(got), len(pending))
    assert "Traceback" not in (tmp_path / "serve.log").read_text()


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGTERM])
def test_relayed_mail_held_only_in_the_journal_survives_a_stop(tmp_path: Path, stop: signal.Signals) -> None:
    """An accepted item lives in its spools until the journal's checkpoint gives it files
    (queue/store.py). Stopped while its first attempt hangs on a relay that never answers, the
    server has acknowledged mail that exists only in its journal: killed, the next start must
    write it back from there; stopped cleanly, the last checkpoint gives it its files. Either
    way every message is delivered once."""
    from serpentmail.storage.journal import records

    dest = _remote_dest(tmp_path)
    n = 5
    with socket.socket() as mute:  # accepts connections (the backlog does) and never says a word
        mute.bind((REMOTE, 0))
        mute.listen(16)
        mute_at = "{}:{}".format(*mute.getsockname()[:2])
        conf, ports = _conf(tmp_path, workers=1, relay=mute.getsockname()[:2])
        with serve(conf, ports, 0) as proc:
            _submit(ports, n, "h", "held")
            proc.send_signal(stop)
            assert proc.wait(30) == (0 if stop == signal.SIGTERM else -signal.SIGKILL)
    journal = tmp_path / "data" / "journal" / "w0.log"
    held = {t for targets, _ in records(journal) for t in targets if t.startswith("queue/env/")}
    on_disk = list((tmp_path / "data" / "queue" / "env").iterdir())
    if stop == signal.SIGKILL:
        assert len(held) == n and not on_disk  # all still pending in the journal, no file yet
    else:
        assert not held and len(on_disk) == n  # the stop's checkpoint placed them
    with running_server(dest) as remote:
        conf.write_text(conf.read_text().replace(mute_at, "{}:{}".format(*remote.endpoint("smtp"))))
        with serve(conf, ports, 0):
            _wait(lambda: len(maildir_files(dest, "joe@r.test")) >= n, timeout=30)
            time.sleep(0.5)  # a duplicate would arrive now
        got = sorted(p.read_bytes().split(b"\r\n\r\n", 1)[1] for p in maildir_files(dest, "joe@r.test"))
    assert got == sorted(f"held {i}\r\n".encode() for i in range(n))
    assert "Traceback" not in (tmp_path / "serve.log").read_text()


@pytest.mark.parametrize("workers", [1, 2])
def test_an_unusable_data_dir_is_one_clear_error(tmp_path: Path, workers: int) -> None:
    (tmp_path / "afile").write_text("not a directory")
    conf = tmp_path / "c.toml"
    conf.write_text(f'data_dir = "{tmp_path / "afile" / "data"}"\nworkers = {workers}\n'
                    f'[smtp]\nlisten = ["{HOST}:{free_port(HOST)}"]\n[submission]\nlisten = []\n'
                    '[submissions]\nlisten = []\n[pop3]\nlisten = []\n[pop3s]\nlisten = []\n')
    res = subprocess.run([sys.executable, "-m", "serpentmail", "-c", str(conf), "serve"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
    assert f"cannot start: cannot use data directory {tmp_path / 'afile' / 'data'}: Not a directory" in res.stderr
    assert "Traceback" not in res.stderr + res.stdout


def test_pool_threads_started_under_load_get_every_cpu_back(tmp_path: Path) -> None:
    """A busy worker pins its event-loop thread to one CPU (server/cpupin.py), and a thread
    inherits the affinity of the thread that starts it. Eight sessions log in at once, so
    password checks start pool threads while the loops hold several sessions each; once the
    sessions are gone, no thread of any worker may be left on one CPU."""
    allowed = os.sched_getaffinity(0)
    if len(allowed) < 2:
        pytest.skip("needs two CPUs: on one, nothing is pinned")
    conf, ports = _conf(tmp_path, workers=2)
    together = threading.Barrier(8)
    failures: list[BaseException] = []

    def session() -> None:
        try:
            with smtplib.SMTP(HOST, ports["submission"], timeout=20) as s:
                s.starttls(context=_tls())
                together.wait(20)  # every session connected: the workers' loops are pinned
                s.login("bill@w.test", "billpw")
                together.wait(20)
        except BaseException as exc:  # reported below, from the test's own thread
            failures.append(exc)

    def threads_on_fewer_cpus(pid: int) -> list[str]:
        narrow = []
        for worker in _children(pid):
            for task in Path(f"/proc/{worker}/task").iterdir():
                with contextlib.suppress(OSError):
                    if os.sched_getaffinity(int(task.name)) != allowed:
                        narrow.append(f"{worker}/{task.name} {(task / 'comm').read_text().strip()}")
        return narrow

    with serve(conf, ports, 2) as proc:
        clients = [threading.Thread(target=session) for _ in range(8)]
        for t in clients:
            t.start()
        for t in clients:
            t.join(60)
        assert not failures, failures
        with contextlib.suppress(AssertionError):
            _wait(lambda: not threads_on_fewer_cpus(proc.pid), timeout=5)
        assert threads_on_fewer_cpus(proc.pid) == []


def test_each_started_line_says_whether_the_modules_run_compiled(tmp_path: Path) -> None:
    # The server imports what this test imports (scripts/test.sh runs the suite once against
    # the compiled build, PYTHONPATH reaching the server too): each worker says so in its log,
    # and how its delivery journal writes (direct where this filesystem takes O_DIRECT).
    from serpentmail import compiled_modules

    conf, ports = _conf(tmp_path, workers=2)
    expect = "compiled=yes" if compiled_modules() else "compiled=no"
    probe = tmp_path / "direct-probe"
    probe.write_bytes(b"")
    journal = "journal=fdatasync"  # a system without O_DIRECT, or a filesystem refusing it
    if hasattr(os, "O_DIRECT"):
        with contextlib.suppress(OSError):
            os.close(os.open(probe, os.O_WRONLY | os.O_DIRECT))
            journal = "journal=direct"
    with serve(conf, ports, 2):
        _wait(lambda: (tmp_path / "serve.log").read_text().count("serpentmail.server: started") >= 2)
        started = [line for line in (tmp_path / "serve.log").read_text().splitlines()
                   if "serpentmail.server: started" in line]
    assert len(started) == 2 and all(expect in line and journal in line for line in started), started
