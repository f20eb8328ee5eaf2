"""POP3 against an in-process server with stdlib poplib: what a user downloading mail sees."""

from __future__ import annotations

import asyncio
import contextlib
import os
import poplib
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from serpentmail.accounts.db import AccountDB
from serpentmail.config import Config, Endpoint
from serpentmail.server.pop3 import start_pop3_listeners
from serpentmail.storage.maildir import deliver_bytes, maildir_for
from tests.helpers import (
    ServerThread,
    add_user,
    drop_journal,
    free_port,
    maildir_files,
    make_config,
    running_server,
)

BILL, ANN = "bill@winview.test", "ann@winview.test"


def _cfg(tmp_path: Path, host: str, **limits: object) -> Config:
    cfg = make_config(tmp_path / "data", host, listeners=("smtp", "pop3", "pop3s"), limits=dict(limits) or None)
    add_user(cfg, BILL, "bill-pw")
    add_user(cfg, ANN, "ann-pw")
    return cfg


def _maildir(cfg: Config, address: str) -> Path:
    db = AccountDB(cfg.db_path)
    user = db.get_user(address)
    db.close()
    assert user is not None
    return maildir_for(cfg.data_dir, user.id)


def _login(srv: ServerThread, user: str = BILL, password: str = "bill-pw") -> poplib.POP3:
    p = poplib.POP3(*srv.endpoint("pop3"), timeout=10)
    p.user(user)
    p.pass_(password)
    return p


def _send(srv: ServerThread, rcpt: str, body: bytes) -> None:
    with smtplib.SMTP(*srv.endpoint("smtp"), timeout=10) as c:
        c.ehlo("client.test")
        assert c.sendmail("alice@elsewhere.test", [rcpt], body) == {}


def _no_verify() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _retr_bytes(p: poplib.POP3, n: int) -> bytes:
    _resp, lines, _octets = p.retr(n)
    return b"".join(line + b"\r\n" for line in lines)


def test_mail_sent_over_smtp_downloads_byte_identical(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "127.0.3.1")
    body = b"Subject: hello\r\nFrom: alice@elsewhere.test\r\n\r\nline one\r\n.dot line\r\n..two\r\n.\r\nend\r\n"
    with running_server(cfg) as srv:
        _send(srv, BILL, body)
        stored = maildir_files(cfg, BILL)[0].read_bytes()
        p = _login(srv)
        count, octets = p.stat()
        assert (count, octets) == (1, len(stored))
        assert p.list(1) == f"+OK 1 {len(stored)}".encode()
        got = _retr_bytes(p, 1)
        assert got == stored and got.endswith(body)
        top = b"".join(line + b"\r\n" for line in p.top(1, 1)[1])
        assert top.endswith(b"From: alice@elsewhere.test\r\n\r\nline one\r\n")
        assert p.quit().startswith(b"+OK")


def test_wire_bytes_are_stuffed_and_terminated(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "127.0.3.2")
    content = b"Subject: s\r\n\r\n.a\r\nb\r\n"
    deliver_bytes(cfg.data_dir, [_maildir(cfg, BILL)], content)
    with running_server(cfg) as srv, socket.create_connection(srv.endpoint("pop3"), timeout=10) as s:
        s.sendall(b"USER bill@winview.test\r\nPASS bill-pw\r\nRETR 1\r\nQUIT\r\n")
        data = b""
        while not data.endswith(b"signing off\r\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    assert data.endswith(b"+OK 21 octets\r\nSubject: s\r\n\r\n..a\r\nb\r\n.\r\n+OK serpentmail POP3 server signing off\r\n")


def test_dele_quit_removes_and_moves_the_rest_to_cur(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "127.0.3.3")
    md = _maildir(cfg, BILL)
    for i in range(3):
        deliver_bytes(cfg.data_dir, [md], f"Subject: {i}\r\n\r\nbody {i}\r\n".encode())
    with running_server(cfg) as srv:
        p = _login(srv)
        uids = p.uidl()[1]
        assert p.dele(2).startswith(b"+OK")
        p.quit()
        assert maildir_files(cfg, BILL, "new") == []
        cur = maildir_files(cfg, BILL, "cur")
        assert len(cur) == 2 and all(f.name.endswith(":2,S") for f in cur)
        assert sorted(f.read_bytes() for f in cur) == [b"Subject: 0\r\n\r\nbody 0\r\n", b"Subject: 2\r\n\r\nbody 2\r\n"]
        p = _login(srv)
        assert p.stat()[0] == 2
        assert p.uidl()[1] == [b"1 " + uids[0].split()[1], b"2 " + uids[2].split()[1]]
        p.quit()


def test_dele_then_dropped_connection_keeps_everything(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "127.0.3.4")
    md = _maildir(cfg, BILL)
    deliver_bytes(cfg.data_dir, [md], b"Subject: keep me\r\n\r\nx\r\n")
    before = maildir_files(cfg, BILL, "new")
    with running_server(cfg) as srv:
        p = _login(srv)
        assert p.dele(1).startswith(b"+OK")
        p.close()  # no QUIT: RFC 1939 §6, nothing is applied
        # the lock is released on disconnect, and the message is still there
        deadline = time.monotonic() + 5
        while True:
            try:
                p = _login(srv)
                break
            except poplib.error_proto as exc:
                assert b"IN-USE" in exc.args[0] and time.monotonic() < deadline
                time.sleep(0.05)
        assert p.stat()[0] == 1
        assert p.rset().startswith(b"+OK")
        p.quit()
    assert [f.name for f in before] == [f.name.removesuffix(":2,S") for f in maildir_files(cfg, BILL, "cur")]


def test_uidl_stable_across_sessions_moves_and_restarts(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "127.0.3.5")
    with running_server(cfg) as srv:
        for i in range(3):
            _send(srv, BILL, f"Subject: {i}\r\n\r\nx\r\n".encode())
        p = _login(srv)
        first = p.uidl()[1]
        assert len({line.split()[1] for line in first}) == 3
        p.quit()  # moves new/ -> cur/
        assert len(maildir_files(cfg, BILL, "cur")) == 3
        p = _login(srv)
        assert p.uidl()[1] == first
        assert p.uidl(2) == b"+OK " + first[1]
        p.quit()
    with running_server(cfg) as srv:
        p = _login(srv)
        assert p.uidl()[1] == first
        p.quit()
    for line in first:
        uid = line.split()[1]
        assert 1 <= len(uid) <= 70 and all(0x21 <= c <= 0x7E for c in uid)


def test_users_see_only_their_own_mail_and_wrong_password_fails(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "127.0.3.6")
    with running_server(cfg) as srv:
        _send(srv, BILL, b"Subject: for bill\r\n\r\nsecret bill stuff\r\n")
        _send(srv, ANN, b"Subject: for ann\r\n\r\nann only\r\n")
        _send(srv, ANN, b"Subject: for ann 2\r\n\r\nann only\r\n")
        p = _login(srv, ANN, "ann-pw")
        assert p.stat()[0] == 2
        assert all(b"ann only" in _retr_bytes(p, n) for n in (1, 2))
        with pytest.raises(poplib.error_proto, match="No such message"):
            p.retr(3)
        p.quit()
        q = poplib.POP3(*srv.endpoint("pop3"), timeout=10)
        q.user(BILL)
        with pytest.raises(poplib.error_proto, match=r"-ERR \[AUTH\] Authentication failed"):
            q.pass_("ann-pw")  # Ann's password does not open Bill's mailbox
        q.user(ANN)
        with pytest.raises(poplib.error_proto, match=r"-ERR \[AUTH\]"):
            q.pass_("bill-pw")
        q.close()
        p = _login(srv)
        assert p.stat()[0] == 1 and b"secret bill stuff" in _retr_bytes(p, 1)
        p.quit()


def test_path_tricks_and_aliases_do_not_log_in(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "127.0.3.7")
    db = AccountDB(cfg.db_path)
    db.add_alias("info@winview.test", BILL)
    db.close()
    with running_server(cfg) as srv:
        q = poplib.POP3(*srv.endpoint("pop3"), timeout=10)
        with pytest.raises(poplib.error_proto, match=r"-ERR \[AUTH\] Invalid login name"):
            q.user("../1@winview.test")
        q.user("info@winview.test")
        with pytest.raises(poplib.error_proto, match=r"-ERR \[AUTH\] Authentication failed"):
            q.pass_("bill-pw")
        q.close()


def test_three_failures_close_and_throttle_blocks_even_good_password(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "127.0.3.8", auth_max_failures=4)
    with running_server(cfg) as srv:
        q = poplib.POP3(*srv.endpoint("pop3"), timeout=10)
        for i in range(3):
            q.user(BILL)
            with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
                q.pass_(f"wrong{i}")
        # the third failure is followed by a close
        assert q.file.readline().startswith(b"-ERR [AUTH] Too many failed logins")
        assert q.file.readline() == b""
        q.close()
        q = poplib.POP3(*srv.endpoint("pop3"), timeout=10)
        q.user(BILL)
        with pytest.raises(poplib.error_proto, match=r"\[AUTH\] Authentication failed"):
            q.pass_("wrong3")  # the 4th failure from this address: now in cool-down
        q.user(BILL)
        with pytest.raises(poplib.error_proto, match=r"\[AUTH\] Too many failed logins .*try again"):
            q.pass_("bill-pw")
        q.close()


def test_in_use_lock_for_a_second_session(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "127.0.3.9")
    with running_server(cfg) as srv:
        p = _login(srv)
        q = poplib.POP3(*srv.endpoint("pop3"), timeout=10)
        q.user(BILL)
        with pytest.raises(poplib.error_proto, match=r"-ERR \[IN-USE\]"):
            q.pass_("bill-pw")
        # another user is not affected
        r = _login(srv, ANN, "ann-pw")
        r.quit()
        p.quit()
        q.user(BILL)
        assert q.pass_("bill-pw").startswith(b"+OK")  # IN-USE did not count as a failure
        q.quit()


def test_lock_of_a_crashed_process_does_not_lock_the_user_out(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "127.0.3.10")
    md = _maildir(cfg, BILL)
    md.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl,os,sys,time\n"
         f"fd=os.open({str(md / 'pop3.lock')!r}, os.O_RDWR|os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('locked', flush=True)\ntime.sleep(60)\n"],
        stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
        with running_server(cfg) as srv:
            q = poplib.POP3(*srv.endpoint("pop3"), timeout=10)
            q.user(BILL)
            with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
                q.pass_("bill-pw")
            os.kill(holder.pid, signal.SIGKILL)
            holder.wait(10)
            q.user(BILL)
            assert q.pass_("bill-pw").startswith(b"+OK")
            q.quit()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)


def test_stls_and_pop3s(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "127.0.3.11")
    deliver_bytes(cfg.data_dir, [_maildir(cfg, BILL)], b"Subject: tls\r\n\r\nover tls\r\n")
    with running_server(cfg) as srv:
        p = poplib.POP3(*srv.endpoint("pop3"), timeout=10)
        assert "STLS" in p.capa()
        p.stls(context=_no_verify())
        assert "STLS" not in p.capa()
        p.user(BILL)
        p.pass_("bill-pw")
        assert _retr_bytes(p, 1).endswith(b"over tls\r\n")
        p.quit()
        s = poplib.POP3_SSL(*srv.endpoint("pop3s"), context=_no_verify(), timeout=10)
        assert "STLS" not in s.capa()
        s.user(BILL)
        s.pass_("bill-pw")
        assert s.stat()[0] == 1
        s.quit()


def test_plaintext_login_refused_before_tls_off_loopback(tmp_path: Path) -> None:
    """A listener that treats the peer as non-local (as a real remote client would be)."""
    cfg = _cfg(tmp_path, "127.0.3.12")
    with running_server(cfg) as srv:
        port = free_port("127.0.3.12")
        fut = asyncio.run_coroutine_threadsafe(
            start_pop3_listeners(srv.server, "pop3", [Endpoint("127.0.3.12", port)], implicit_tls=False,
                                 plaintext_on_loopback=False), srv.loop)
        servers = fut.result(10)
        try:
            p = poplib.POP3("127.0.3.12", port, timeout=10)
            caps = p.capa()
            assert "USER" not in caps and "SASL" not in caps and "STLS" in caps
            with pytest.raises(poplib.error_proto, match=r"-ERR \[AUTH\] Plaintext authentication is not allowed"):
                p.user(BILL)
            p.stls(context=_no_verify())
            p.user(BILL)
            assert p.pass_("bill-pw").startswith(b"+OK")
            p.quit()
        finally:
            for s in servers:
                srv.loop.call_soon_threadsafe(s.close)


def test_auth_plain_over_the_wire(tmp_path: Path) -> None:
    import base64

    cfg = _cfg(tmp_path, "127.0.3.13")
    token = base64.b64encode(b"\0bill@winview.test\0bill-pw")
    with running_server(cfg) as srv:
        p = poplib.POP3(*srv.endpoint("pop3"), timeout=10)
        assert p._shortcmd("AUTH PLAIN " + token.decode()).startswith(b"+OK Logged in")
        p.quit()


def test_idle_timeout_closes_and_applies_nothing(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "127.0.3.14", pop3_idle_timeout=0.5)
    deliver_bytes(cfg.data_dir, [_maildir(cfg, BILL)], b"Subject: x\r\n\r\nx\r\n")
    with running_server(cfg) as srv:
        p = _login(srv)
        p.dele(1)
        assert p.file.readline() == b"-ERR Disconnected for inactivity\r\n"
        assert p.file.readline() == b""
        p.close()
        p = _login(srv)
        assert p.stat()[0] == 1
        p.quit()


def test_large_message_streams_identical(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "127.0.3.15")
    line = b".starts with a dot and is long enough to matter " * 10 + b"\r\n"
    content = b"Subject: big\r\n\r\n" + line * 12_000  # ~5.8 MB, every body line needs stuffing
    deliver_bytes(cfg.data_dir, [_maildir(cfg, BILL)], content)
    with running_server(cfg) as srv:
        p = _login(srv)
        assert p.list(1) == f"+OK 1 {len(content)}".encode()
        assert _retr_bytes(p, 1) == content
        p.quit()


def test_twenty_thousand_messages_list_from_names_only(tmp_path: Path) -> None:
    """Sizes come from ``,S=`` in the names: the stored files are tiny, the names claim 1000+i
    octets, so LIST can only be right if no body (and no stat) was used."""
    cfg = _cfg(tmp_path, "127.0.3.16")
    new = _maildir(cfg, BILL) / "new"
    new.mkdir(parents=True, exist_ok=True)
    n = 20_000
    base = 1_700_000_000
    for i in range(n):
        # deliberately created in scrambled order: numbering must follow the names' times
        j = (i * 7919) % n
        (new / f"{base + j}.M0P1Q{j}.gen,S={1000 + j}").write_bytes(b"Subject: %d\r\n\r\n" % j)
    with running_server(cfg) as srv:
        t0 = time.monotonic()
        p = _login(srv)
        count, octets = p.stat()
        _resp, listing, _ = p.list()
        elapsed = time.monotonic() - t0
        assert count == n and octets == sum(1000 + j for j in range(n))
        assert listing[0] == b"1 1000" and listing[-1] == f"{n} {1000 + n - 1}".encode()
        assert p.uidl(n) == f"+OK {n} {base + n - 1}.M0P1Q{n - 1}.gen".encode()
        assert p.top(5, 0)[1][0] == b"Subject: 4"
        assert elapsed < 10, elapsed
        p.close()


def test_client_that_stops_reading_mid_retr_is_dropped_and_lock_released(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "127.0.3.17", pop3_idle_timeout=1.0)
    content = b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 20_000  # 20 MB
    deliver_bytes(cfg.data_dir, [_maildir(cfg, BILL)], content)
    deliver_bytes(cfg.data_dir, [_maildir(cfg, BILL)], b"Subject: small\r\n\r\nx\r\n")
    with running_server(cfg) as srv:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.settimeout(10)
        s.connect(srv.endpoint("pop3"))
        s.sendall(b"USER bill@winview.test\r\nPASS bill-pw\r\nDELE 2\r\nRETR 1\r\n")
        got = b""
        while f"+OK {len(content)} octets".encode() not in got:
            got += s.recv(256)
        t0 = time.monotonic()
        try:
            deadline = time.monotonic() + 15
            while True:  # the stalled session holds the lock until the server gives up on it
                try:
                    p = _login(srv)
                    break
                except poplib.error_proto as exc:
                    assert b"IN-USE" in exc.args[0] and time.monotonic() < deadline
                    time.sleep(0.2)
            assert time.monotonic() - t0 >= 0.9  # held until the 1 s write timeout, not before
            assert p.stat()[0] == 2  # the DELE of the dropped session was not applied
            p.quit()
        finally:
            s.close()


def test_server_shutdown_tells_idle_sessions_and_applies_nothing(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "127.0.3.18")
    deliver_bytes(cfg.data_dir, [_maildir(cfg, BILL)], b"Subject: x\r\n\r\nx\r\n")
    srv = ServerThread(cfg).start()
    try:
        p = _login(srv)
        assert p.dele(1).startswith(b"+OK")
    finally:
        srv.stop()
    assert p.file.readline() == b"-ERR [SYS/TEMP] Server shutting down\r\n"
    p.close()
    assert len(maildir_files(cfg, BILL, "new")) == 1


def _pop3_write_buffers(srv: ServerThread) -> int:
    """Octets waiting in the server's POP3 transports (read on the server's own loop)."""
    from serpentmail.server.pop3 import POP3Session

    async def total() -> int:
        assert srv.server.ctx is not None
        return sum(s.transport.get_write_buffer_size() for s in srv.server.ctx.sessions
                   if isinstance(s, POP3Session) and s.transport is not None)

    return asyncio.run_coroutine_threadsafe(total(), srv.loop).result(10)


def test_pipelined_retrs_of_small_messages_to_a_client_that_does_not_read_stay_bounded(tmp_path: Path) -> None:
    """Small messages are sent without a worker thread; a client pipelining RETRs and reading
    nothing must still not make the server buffer its whole mailbox."""
    cfg = _cfg(tmp_path, "127.0.3.19")
    body = b"Subject: s\r\n\r\n" + (b"z" * 98 + b"\r\n") * 900  # ~90 KiB each, below the sync bound
    n = 100  # ~9 MB in all
    for _ in range(n):
        deliver_bytes(cfg.data_dir, [_maildir(cfg, BILL)], body)
    with running_server(cfg) as srv:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.settimeout(10)
        s.connect(srv.endpoint("pop3"))
        try:
            s.sendall(b"USER bill@winview.test\r\nPASS bill-pw\r\n"
                      + b"".join(b"RETR %d\r\n" % i for i in range(1, n + 1)))
            time.sleep(1.5)
            assert _pop3_write_buffers(srv) < 1024 * 1024  # not n * 90 KiB
            # Reading resumes the session: every message arrives, in order, byte-stuffed.
            f = s.makefile("rb")
            got = 0
            for _ in range(3):
                assert f.readline().startswith(b"+OK")
            while got < n:
                assert f.readline() == f"+OK {len(body)} octets\r\n".encode()
                data = b""
                while not data.endswith(b"\r\n.\r\n"):
                    data += f.readline()
                assert data == body + b".\r\n"
                got += 1
        finally:
            s.close()


def test_a_fifo_under_a_message_name_is_an_error_not_a_hang(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "127.0.3.20")
    deliver_bytes(cfg.data_dir, [_maildir(cfg, BILL)], b"Subject: real\r\n\r\nx\r\n")
    new = _maildir(cfg, BILL) / "new"
    fifo = new / "1.M0P1Q0.planted,S=10"  # oldest: message 1
    os.mkfifo(fifo)
    with running_server(cfg) as srv:
        p = _login(srv)
        try:
            with pytest.raises(poplib.error_proto, match=r"SYS/TEMP"):
                p.retr(1)
            assert _retr_bytes(p, 2) == b"Subject: real\r\n\r\nx\r\n"
            p.quit()
        finally:
            with contextlib.suppress(OSError):  # unblock a reader stuck in open() (old code)
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


def test_read_ahead_never_serves_the_wrong_message(tmp_path: Path) -> None:
    """The message after each one sent is read ahead; out-of-order RETR/TOP, DELE of the
    read-ahead message and the last message must all still get exactly the right bytes."""
    cfg = _cfg(tmp_path, "127.0.3.21")
    bodies = [b"Subject: m%d\r\n\r\n.dot line %d\r\nend\r\n" % (i, i) for i in range(1, 7)]
    for b in bodies:
        deliver_bytes(cfg.data_dir, [_maildir(cfg, BILL)], b)
    with running_server(cfg) as srv:
        p = _login(srv)
        assert _retr_bytes(p, 1) == bodies[0]  # 2 is read ahead ...
        assert _retr_bytes(p, 3) == bodies[2]  # ... and not served for 3
        assert p.dele(4).startswith(b"+OK")  # 4 was read ahead, then deleted
        with pytest.raises(poplib.error_proto, match="already deleted"):
            p.retr(4)
        assert _retr_bytes(p, 2) == bodies[1]
        assert p.top(5, 0)[1] == [b"Subject: m5", b""]
        assert _retr_bytes(p, 6) == bodies[5]  # 6 was read ahead by TOP 5; 6 is the last
        assert _retr_bytes(p, 6) == bodies[5]
        assert _retr_bytes(p, 1) == bodies[0]
        p.quit()
    assert len(maildir_files(cfg, BILL, "cur")) == 5


def test_the_message_after_a_retr_is_read_ahead(tmp_path: Path) -> None:
    """The observable trade of the read-ahead: once RETR 1 is answered, message 2 is already
    in memory, so removing its file behind the server's back no longer makes RETR 2 fail
    (it is served as a RETR a moment earlier would have served it: Maildir files never
    change, and the session works on its login snapshot). Message 3 was not read ahead."""
    cfg = _cfg(tmp_path, "127.0.3.22")
    bodies = [b"Subject: m%d\r\n\r\nx\r\n" % i for i in range(1, 4)]
    for b in bodies:
        deliver_bytes(cfg.data_dir, [_maildir(cfg, BILL)], b)
    with running_server(cfg) as srv:
        p = _login(srv)
        assert _retr_bytes(p, 1) == bodies[0]
        # The read-ahead runs in the loop callback that wrote RETR 1's reply, so once a later
        # command is answered it is done (this client shares the server's process and GIL).
        assert p.noop().startswith(b"+OK")
        for f in maildir_files(cfg, BILL, "new"):
            if f.read_bytes() != bodies[0]:
                f.unlink()
        assert _retr_bytes(p, 2) == bodies[1]
        with pytest.raises(poplib.error_proto, match="SYS/TEMP"):
            p.retr(3)
        p.quit()


def test_a_deletion_the_journal_still_holds_is_kept_and_quit_says_so(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A message another process's journal still lists (its checkpoint is not coming) is not
    unlinked: a crash would bring it back. QUIT says some deletions did not happen (RFC 1939
    §6), the message stays, and the next session deletes it once the record is settled."""
    import serpentmail.server.pop3 as pop3_mod
    from serpentmail.storage.journal import Entry, Journal, replay

    monkeypatch.setattr(pop3_mod, "JOURNAL_WAIT", 0.3)
    cfg = _cfg(tmp_path, "127.0.3.40")
    md = _maildir(cfg, BILL)
    (path,) = deliver_bytes(cfg.data_dir, [md], b"Subject: held\r\n\r\nbody\r\n")
    with running_server(cfg) as srv:
        # A worker that journaled this message and died before its checkpoint.
        other = Journal(cfg.data_dir / "journal" / "w9.log", cfg.data_dir)
        with other.lock:
            other.append([Entry(path.read_bytes(), [path])])
        drop_journal(other)
        p = _login(srv)
        assert p.dele(1).startswith(b"+OK")
        with pytest.raises(poplib.error_proto, match=r"SYS/TEMP"):
            p.quit()
        assert len(maildir_files(cfg, BILL, "new") + maildir_files(cfg, BILL, "cur")) == 1
        replay(other.path, cfg.data_dir)  # what that worker's restart does
        p = _login(srv)
        assert p.stat()[0] == 1
        assert p.dele(1).startswith(b"+OK")
        assert p.quit().startswith(b"+OK")
        assert maildir_files(cfg, BILL, "new") + maildir_files(cfg, BILL, "cur") == []
