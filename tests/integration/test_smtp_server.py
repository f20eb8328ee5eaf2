"""The MX server in-process, driven with smtplib and raw sockets (issue 2)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import smtplib
import socket
import sqlite3
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from serpentmail.accounts.db import AccountDB
from serpentmail.config import Config
from tests.helpers import (
    ServerThread,
    add_user,
    maildir_files,
    make_config,
    running_server,
    spool_files,
)

HOST = "127.0.6.2"
BILL = "bill@winview.test"


def cfg_for(tmp_path: Path, **limits: object) -> Config:
    cfg = make_config(tmp_path / "data", HOST, listeners=("smtp",), limits=limits or None)
    add_user(cfg, BILL)
    return cfg


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[Config, ServerThread]]:
    cfg = cfg_for(tmp_path)
    with running_server(cfg) as srv:
        yield cfg, srv


def connect(srv: ServerThread) -> smtplib.SMTP:
    c = smtplib.SMTP(*srv.endpoint("smtp"), timeout=20)
    c.ehlo("client.test")
    return c


def recv_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def wait_for(cond: object, what: str) -> None:
    """Poll a condition (no timing is asserted: the deadline only bounds a hung test)."""
    assert callable(cond)
    deadline = time.monotonic() + 20
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


# --- delivery ---------------------------------------------------------------------------------


def test_byte_for_byte_with_trace_headers(server: tuple[Config, ServerThread]) -> None:
    cfg, srv = server
    body = (b"From: a@b.test\r\nTo: bill@winview.test\r\nSubject: bytes\r\n\r\n"
            b"\xc3\xa9t\xc3\xa9 8bit\r\n.leading dot\r\n..two dots\r\n\ttab\r\n\r\n\r\ntrailing blank lines\r\n")
    with connect(srv) as c:
        assert c.sendmail("a@b.test", [BILL], body, mail_options=["BODY=8BITMIME"]) == {}
    files = maildir_files(cfg, BILL)
    assert len(files) == 1
    data = files[0].read_bytes()
    m = re.match(
        rb"Return-Path: <a@b\.test>\r\n"
        rb"Received: from client\.test \(\[127\.[0-9.]+\]\)\r\n"
        rb"\tby mx\.test \(serpentmail\) with ESMTP id (\S+)\r\n"
        rb"\tfor <bill@winview\.test>;\r\n"
        rb"\t[A-Z][a-z]{2}, [ 0-9]{1,2} [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d [+-]\d{4}\r\n",
        data,
    )
    assert m, data[:400]
    assert data[m.end():] == body
    assert files[0].name.endswith(f",S={len(data)}")
    # nothing left behind in tmp/ (tmp/spare/ holds the empty files made ahead of need)
    assert spool_files(cfg.data_dir) == []


@pytest.mark.parametrize("transfer", [b"DATA\r\n.\r\n", b"BDAT 0 LAST\r\n"])
def test_an_empty_message_still_gets_its_trace_fields(server: tuple[Config, ServerThread], transfer: bytes) -> None:
    # The trace fields are written with the first chunk of the body; an empty message has no
    # chunk, so they must be written when it completes.
    cfg, srv = server
    with socket.create_connection(srv.endpoint("smtp"), timeout=20) as s:
        s.sendall(b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<bill@winview.test>\r\n")
        if transfer.startswith(b"DATA"):
            s.sendall(b"DATA\r\n")
            seen = b""
            while b"\r\n354 " not in seen:
                chunk = s.recv(4096)
                assert chunk, seen
                seen += chunk
            s.sendall(b".\r\nQUIT\r\n")
        else:
            s.sendall(transfer + b"QUIT\r\n")
        out = recv_until_closed(s)
    assert b"250 2.0.0 OK: queued as" in out, out
    (f,) = maildir_files(cfg, BILL)
    data = f.read_bytes()
    assert data.startswith(b"Return-Path: <a@b.test>\r\nReceived: from c.test ") and data.endswith(b"\r\n")
    assert f.name.endswith(f",S={len(data)}")


def test_large_message_byte_for_byte(server: tuple[Config, ServerThread]) -> None:
    cfg, srv = server
    line = b"0123456789abcdef" * 8 + b"\r\n"
    body = b"Subject: big\r\n\r\n" + line * 60000 + b"." * 100 + b"\r\n"  # ~7.8 MB
    with connect(srv) as c:
        c.sendmail("a@b.test", [BILL], body)
    assert maildir_files(cfg, BILL)[0].read_bytes().endswith(body)


def test_bdat_over_the_wire(server: tuple[Config, ServerThread]) -> None:
    cfg, srv = server
    chunk1 = b"Subject: chunked\r\n\r\n"
    chunk2 = b"..not unstuffed\r\n.\r\nbinary-ish \x00\r\n"
    with socket.create_connection(srv.endpoint("smtp"), timeout=20) as s:
        s.sendall(b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<bill@winview.test>\r\n"
                  + b"BDAT %d\r\n" % len(chunk1) + chunk1 + b"BDAT %d LAST\r\n" % len(chunk2) + chunk2 + b"QUIT\r\n")
        out = recv_until_closed(s)
    assert b"250 2.0.0 OK: queued as" in out
    assert maildir_files(cfg, BILL)[0].read_bytes().endswith(chunk1 + chunk2)


def test_one_recipient_message_has_one_name_and_no_temp_file_left(server: tuple[Config, ServerThread]) -> None:
    cfg, srv = server
    with connect(srv) as c:
        for i in range(3):
            c.sendmail("a@b.test", [BILL], f"Subject: {i}\r\n\r\nalone\r\n".encode())
    files = maildir_files(cfg, BILL)
    assert len(files) == 3 and all(f.stat().st_nlink == 1 for f in files)  # renamed, not linked
    names = {f.name.split(",", 1)[0] for f in files}
    assert not [p for p in (cfg.data_dir / "tmp").rglob("*") if p.name.split(",", 1)[0] in names]


def test_several_recipients_share_one_write(tmp_path: Path) -> None:
    cfg = cfg_for(tmp_path)
    for a in ("ann@winview.test", "carl@other.test"):
        add_user(cfg, a)
    with running_server(cfg) as srv, connect(srv) as c:
        refused = c.sendmail("a@b.test", [BILL, "ann@winview.test", "carl@other.test", "BILL@WINVIEW.TEST"], b"Subject: x\r\n\r\nshared\r\n")
        assert refused == {}
    files = [maildir_files(cfg, a) for a in (BILL, "ann@winview.test", "carl@other.test")]
    assert [len(f) for f in files] == [1, 1, 1]  # the duplicate recipient got one copy
    stats = [f[0].stat() for f in files]
    assert len({st.st_ino for st in stats}) == 1
    assert all(st.st_nlink == 3 for st in stats)
    assert files[0][0].read_bytes().count(b"Received:") == 1


def test_alias_and_catch_all_delivery(tmp_path: Path) -> None:
    cfg = cfg_for(tmp_path)
    add_user(cfg, "ann@winview.test")
    db = AccountDB(cfg.db_path)
    db.add_alias("sales@winview.test", BILL)
    db.add_alias("sales@winview.test", "ann@winview.test")
    db.add_alias("team@winview.test", "sales@winview.test")
    db.ensure_domain("catch.test")
    db.add_alias("@catch.test", "ann@winview.test")
    db.close()
    with running_server(cfg) as srv, connect(srv) as c:
        c.sendmail("a@b.test", ["team@winview.test"], b"Subject: alias chain\r\n\r\n1\r\n")
        c.sendmail("a@b.test", ["whatever@CATCH.test"], b"Subject: catch-all\r\n\r\n2\r\n")
        with pytest.raises(smtplib.SMTPRecipientsRefused) as exc:
            c.sendmail("a@b.test", ["nobody@winview.test"], b"x\r\n")
        code, msg = exc.value.recipients["nobody@winview.test"]
        assert (code, msg.split(b" ")[0]) == (550, b"5.1.1")
    assert len(maildir_files(cfg, BILL)) == 1
    ann = [p.read_bytes() for p in maildir_files(cfg, "ann@winview.test")]
    assert len(ann) == 2
    assert any(b"alias chain" in a for a in ann) and any(b"catch-all" in a for a in ann)


def test_account_changes_take_effect_without_restart(server: tuple[Config, ServerThread]) -> None:
    cfg, srv = server
    db = AccountDB(cfg.db_path)
    with connect(srv) as c:
        c.mail("a@b.test")
        assert c.rcpt("new@winview.test")[0] == 550
        db.add_user("new@winview.test", "pw")
        assert c.rcpt("new@winview.test")[0] == 250
        db.add_domain("fresh.test")
        assert c.rcpt("x@fresh.test")[0] == 550  # now local, unknown user (was: relay denied)
        db.add_alias("@fresh.test", "new@winview.test")
        assert c.rcpt("x@fresh.test")[0] == 250
        db.del_user("new@winview.test")
        assert c.rcpt("new@winview.test")[0] == 550
        db.del_domain("fresh.test", force=True)
        assert c.rcpt("x@fresh.test")[0] == 554
    db.close()


def test_postmaster_without_account_goes_to_fallback_mailbox(server: tuple[Config, ServerThread]) -> None:
    cfg, srv = server
    with connect(srv) as c:
        assert c.sendmail("", ["postmaster", "postmaster@winview.test"], b"Subject: pm\r\n\r\nx\r\n") == {}
    files = list((cfg.data_dir / "mail" / "postmaster" / "new").iterdir())
    assert len(files) == 1


# --- STARTTLS -------------------------------------------------------------------------------


def test_starttls(server: tuple[Config, ServerThread]) -> None:
    cfg, srv = server
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with connect(srv) as c:
        assert c.has_extn("starttls")
        c.starttls(context=ctx)
        c.ehlo("client.test")
        assert not c.has_extn("starttls")
        assert not c.has_extn("auth")  # the MX never offers AUTH
        c.sendmail("a@b.test", [BILL], b"Subject: tls\r\n\r\nsecret\r\n")
    data = maildir_files(cfg, BILL)[0].read_bytes()
    assert b"with ESMTPS id" in data


def test_starttls_pipelined_plaintext_is_discarded(server: tuple[Config, ServerThread]) -> None:
    _cfg, srv = server
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(srv.endpoint("smtp"), timeout=20) as raw:
        f = raw.makefile("rb")
        f.readline()
        raw.sendall(b"EHLO c.test\r\n")
        while not f.readline().startswith(b"250 "):
            pass
        # CVE-2011-0411: commands injected after STARTTLS in the same packet
        raw.sendall(b"STARTTLS\r\nMAIL FROM:<evil@x.test>\r\nRCPT TO:<bill@winview.test>\r\n")
        assert f.readline().startswith(b"220 2.0.0")
        with ctx.wrap_socket(raw, server_hostname="mx.test") as tls:
            tf = tls.makefile("rb")
            tls.sendall(b"RCPT TO:<bill@winview.test>\r\n")
            assert tf.readline() == b"503 5.5.1 Send EHLO/HELO first\r\n"


# --- limits --------------------------------------------------------------------------------------


def test_connections_per_ip(tmp_path: Path) -> None:
    cfg = cfg_for(tmp_path, max_connections_per_ip=2)
    with running_server(cfg) as srv:
        a, b = connect(srv), connect(srv)
        with pytest.raises(smtplib.SMTPConnectError) as exc:
            smtplib.SMTP(*srv.endpoint("smtp"), timeout=20)
        assert exc.value.smtp_code == 421
        assert exc.value.smtp_error.startswith(b"4.7.0")
        a.quit()
        ctx = srv.server.ctx
        assert ctx is not None
        wait_for(lambda: ctx.connections == 1, "released slot")
        with connect(srv) as c:
            assert c.noop()[0] == 250
        b.quit()


def test_total_connections(tmp_path: Path) -> None:
    cfg = cfg_for(tmp_path, max_connections=1)
    with running_server(cfg) as srv, connect(srv):
        with pytest.raises(smtplib.SMTPConnectError) as exc:
            smtplib.SMTP(*srv.endpoint("smtp"), timeout=20)
        assert exc.value.smtp_code == 421
        assert exc.value.smtp_error.startswith(b"4.7.0")


def test_idle_timeout(tmp_path: Path) -> None:
    cfg = cfg_for(tmp_path, idle_timeout=0.3)
    with running_server(cfg) as srv, socket.create_connection(srv.endpoint("smtp"), timeout=20) as s:
        out = recv_until_closed(s)
    assert out.startswith(b"220 ")
    assert out.endswith(b"421 4.4.2 Idle timeout, closing connection\r\n")


def test_idle_timeout_during_data(tmp_path: Path) -> None:
    cfg = cfg_for(tmp_path, idle_timeout=0.3)
    with running_server(cfg) as srv, socket.create_connection(srv.endpoint("smtp"), timeout=20) as s:
        s.sendall(b"HELO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<bill@winview.test>\r\nDATA\r\nSubject: half\r\n")
        out = recv_until_closed(s)
    assert out.endswith(b"354 End data with <CR><LF>.<CR><LF>\r\n421 4.4.2 Idle timeout, closing connection\r\n")
    assert maildir_files(cfg, BILL) == []
    wait_for(lambda: not spool_files(cfg.data_dir), "spool file removed")


def test_errors_per_session(tmp_path: Path) -> None:
    cfg = cfg_for(tmp_path, max_errors=3)
    with running_server(cfg) as srv, connect(srv) as c:
        assert c.docmd("FOO")[0] == 500
        assert c.docmd("MAIL", "TO:<x>")[0] == 501
        assert c.docmd("BAR")[0] == 500
        assert c.getreply() == (421, b"4.7.0 Too many errors, closing connection")
        with pytest.raises(smtplib.SMTPServerDisconnected):
            c.getreply()


def test_message_size_and_recipient_limits(tmp_path: Path) -> None:
    cfg = cfg_for(tmp_path, max_message_size=1000, max_recipients=2)
    with running_server(cfg) as srv, connect(srv) as c:
        assert c.esmtp_features["size"] == "1000"
        with pytest.raises(smtplib.SMTPSenderRefused) as sexc:
            c.sendmail("a@b.test", [BILL], b"x" * 2000)  # smtplib declares SIZE=2000
        assert sexc.value.smtp_code == 552
        c.mail("a@b.test")
        c.rcpt(BILL)
        assert c.data(b"x" * 2000) == (552, b"5.3.4 Message size exceeds fixed maximum message size")
        c.mail("a@b.test")
        assert [c.rcpt(BILL)[0] for _ in range(3)] == [250, 250, 452]
        c.rset()
    assert maildir_files(cfg, BILL) == []


# --- failures and shutdown ----------------------------------------------------------------------


def _bill_maildir(cfg: Config) -> Path:
    db = AccountDB(cfg.db_path)
    user = db.get_user(BILL)
    db.close()
    assert user is not None
    return cfg.data_dir / "mail" / str(user.id)


@pytest.mark.parametrize("alone", [True, False], ids=["session commits itself", "committer thread"])
@pytest.mark.parametrize("when", ["before first delivery", "after first delivery"])
def test_internal_error_is_451_without_detail(tmp_path: Path, caplog: pytest.LogCaptureFixture, when: str,
                                              alone: bool) -> None:
    # A lone session runs the commit itself; with another session open it goes through the
    # committer thread. Both must fail the same way.
    cfg = cfg_for(tmp_path)
    md = _bill_maildir(cfg)
    with running_server(cfg) as srv, connect(srv) as c, contextlib.ExitStack() as stack:
        if not alone:
            stack.enter_context(connect(srv)).noop()
        assert len(srv.server.ctx.sessions) == (1 if alone else 2)
        if when == "after first delivery":
            c.sendmail("a@b.test", [BILL], b"Subject: ok\r\n\r\n1\r\n")
            shutil.rmtree(md / "new")
        md.mkdir(parents=True, exist_ok=True)
        (md / "new").write_bytes(b"not a directory")  # every store into new/ now fails
        c.mail("a@b.test")
        c.rcpt(BILL)
        code, msg = c.data(b"Subject: fails\r\n\r\n2\r\n")
        assert (code, msg) == (451, b"4.3.0 Local error in processing, please try again later")
        # the same session and the server keep working once the fault is gone
        (md / "new").unlink()
        (md / "new").mkdir()
        assert c.sendmail("a@b.test", [BILL], b"Subject: ok again\r\n\r\n3\r\n") == {}
        with connect(srv) as other:
            assert other.noop()[0] == 250
    assert [b"ok again" in p.read_bytes() for p in maildir_files(cfg, BILL)] == [True]
    assert not spool_files(cfg.data_dir)


def test_internal_error_in_policy_is_451(tmp_path: Path) -> None:
    cfg = cfg_for(tmp_path)
    with running_server(cfg) as srv, connect(srv) as c:
        # The accounts database breaks under the server (a table gone, as by a bad manual
        # edit, made visible with a touch of the change stamp): every lookup now raises.
        with contextlib.closing(sqlite3.connect(cfg.db_path)) as db:
            db.execute("ALTER TABLE users RENAME TO users_gone")
            db.commit()
        stamp = Path(f"{cfg.db_path}-stamp")
        os.utime(stamp, ns=(0, stamp.stat().st_mtime_ns + 1_000_000_000))
        c.mail("a@b.test")
        code, msg = c.rcpt(BILL)
        assert code == 451 and msg.startswith(b"4.3.0")
        assert b"users" not in msg and b"table" not in msg  # the detail is for the log only


def test_graceful_stop_finishes_the_transaction_in_flight(tmp_path: Path) -> None:
    cfg = cfg_for(tmp_path)
    srv = ServerThread(cfg).start()
    try:
        with socket.create_connection(srv.endpoint("smtp"), timeout=20) as busy, \
                socket.create_connection(srv.endpoint("smtp"), timeout=20) as idle:
            f = busy.makefile("rb")
            f.readline()
            busy.sendall(b"HELO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<bill@winview.test>\r\nDATA\r\nSubject: in flight\r\n\r\n")
            for _ in range(4):
                f.readline()
            stopping = asyncio.run_coroutine_threadsafe(srv.server.stop(grace=20), srv.loop)
            # the idle session is told the server is going away
            out = recv_until_closed(idle)
            assert out.endswith(b"421 4.3.2 Service shutting down, closing transmission channel\r\n")
            # new connections are refused
            wait_for(lambda: _refused(srv.endpoint("smtp")), "listener closed")
            # the transaction in flight completes and is acknowledged
            busy.sendall(b"still here\r\n.\r\n")
            assert f.readline().startswith(b"250 2.0.0 OK: queued as")
            assert f.readline() == b"421 4.3.2 Service shutting down, closing transmission channel\r\n"
            stopping.result(30)
        assert [b"still here" in p.read_bytes() for p in maildir_files(cfg, BILL)] == [True]
    finally:
        srv.loop.call_soon_threadsafe(srv.loop.stop)


def _refused(ep: tuple[str, int]) -> bool:
    try:
        socket.create_connection(ep, timeout=5).close()
    except OSError:
        return True
    return False


def test_concurrent_sessions(server: tuple[Config, ServerThread]) -> None:
    cfg, srv = server
    errors: list[BaseException] = []

    def send(n: int) -> None:
        try:
            with connect(srv) as c:
                for i in range(5):
                    c.sendmail("a@b.test", [BILL], b"Subject: %d-%d\r\n\r\nbody\r\n" % (n, i))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    subjects = sorted(re.search(rb"Subject: (\S+)", p.read_bytes()).group(1) for p in maildir_files(cfg, BILL))  # type: ignore[union-attr]
    assert subjects == sorted(b"%d-%d" % (n, i) for n in range(8) for i in range(5))
    assert spool_files(cfg.data_dir) == []


def test_client_vanishing_mid_data_leaves_nothing(server: tuple[Config, ServerThread]) -> None:
    cfg, srv = server
    with socket.create_connection(srv.endpoint("smtp"), timeout=20) as s:
        f = s.makefile("rb")
        s.sendall(b"HELO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<bill@winview.test>\r\nDATA\r\n")
        for _ in range(5):
            f.readline()
        s.sendall(b"Subject: cut\r\n\r\n" + b"x" * 100000)
        wait_for(lambda: spool_files(cfg.data_dir), "spool file being written")
        f.close()  # (a makefile() reader keeps the socket open)
    wait_for(lambda: not spool_files(cfg.data_dir), "spool file removed")
    assert maildir_files(cfg, BILL) == []
    ctx = srv.server.ctx
    assert ctx is not None
    wait_for(lambda: ctx.connections == 0 and not ctx.sessions, "session released")


def test_huge_pipelined_burst_is_answered_in_order(server: tuple[Config, ServerThread]) -> None:
    # several MB of pipelined messages arrive while earlier ones are being committed: reading is
    # paused and resumed (backpressure) and every reply comes back in order
    cfg, srv = server
    chunk = (b"Subject: burst\r\n\r\n" + b"y" * 1022 + b"\r\n") * 3000  # ~3 MB
    n = 4
    burst = b"EHLO c.test\r\n" + (b"MAIL FROM:<a@b.test>\r\nRCPT TO:<bill@winview.test>\r\n"
                                  + b"BDAT %d LAST\r\n" % len(chunk) + chunk) * n + b"QUIT\r\n"
    with socket.create_connection(srv.endpoint("smtp"), timeout=60) as s:
        received: list[bytes] = []
        reader = threading.Thread(target=lambda: received.append(recv_until_closed(s)))
        reader.start()
        s.sendall(burst)
        reader.join(60)
    lines = received[0].split(b"\r\n")
    finals = [ln[:9] for ln in lines if ln[:3] in (b"250", b"221") and b"-" not in ln[3:4]]
    assert finals == [b"250 START"] + [b"250 2.1.0", b"250 2.1.5", b"250 2.0.0"] * n + [b"221 2.0.0"]
    files = maildir_files(cfg, BILL)
    assert len(files) == n
    assert all(p.read_bytes().endswith(chunk) for p in files)
