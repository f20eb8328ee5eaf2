"""Submission (RFC 6409) with STARTTLS and AUTH, through stdlib smtplib against a real server.

The mission: the outgoing server checks the mail really comes from its own user and refuses to
be an open relay for anyone else.
"""

from __future__ import annotations

import base64
import smtplib
import socket
import ssl
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from serpentmail.accounts.db import AccountDB
from serpentmail.config import Config
from tests.helpers import ServerThread, add_user, maildir_files, make_config, running_server

HOST = "127.0.8.1"


def _ctx() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[tuple[Config, ServerThread]]:
    cfg = make_config(tmp_path / "data", HOST, limits={"submission_max_recipients": 3,
                                                       "submission_max_messages_per_hour": 5})
    add_user(cfg, "bill@yahoo.test", "billpw")
    add_user(cfg, "ann@yahoo.test", "annpw")
    db = AccountDB(cfg.db_path)
    db.add_alias("william@yahoo.test", "bill@yahoo.test")
    db.close()
    with running_server(cfg) as srv:
        yield cfg, srv


def _login(srv: ServerThread, user: str = "bill@yahoo.test", pw: str = "billpw") -> smtplib.SMTP:
    c = smtplib.SMTP(*srv.endpoint("submission"), timeout=10)
    c.ehlo("client.test")
    c.starttls(context=_ctx())
    c.ehlo("client.test")
    c.login(user, pw)
    return c


def test_auth_not_offered_and_refused_before_tls(server: tuple[Config, ServerThread]) -> None:
    _, srv = server
    with smtplib.SMTP(*srv.endpoint("submission"), timeout=10) as c:
        c.ehlo("client.test")
        assert c.has_extn("starttls")
        assert not c.has_extn("auth")
        assert c.docmd("AUTH", "PLAIN AGJpbGxAeWFob28udGVzdABiaWxscHc=") == (530, b"5.7.0 Must issue a STARTTLS command first")
        code, text = c.docmd("MAIL", "FROM:<bill@yahoo.test>")
        assert (code, text) == (530, b"5.7.0 Must issue a STARTTLS command first")


def test_mail_before_auth_under_tls_needs_authentication(server: tuple[Config, ServerThread]) -> None:
    _, srv = server
    with smtplib.SMTP(*srv.endpoint("submission"), timeout=10) as c:
        c.starttls(context=_ctx())
        c.ehlo("client.test")
        assert "PLAIN" in c.esmtp_features["auth"] and "LOGIN" in c.esmtp_features["auth"]
        assert c.docmd("MAIL", "FROM:<bill@yahoo.test>") == (530, b"5.7.0 Authentication required")


def test_wrong_password_is_535_and_right_one_delivers_locally(server: tuple[Config, ServerThread]) -> None:
    cfg, srv = server
    with pytest.raises(smtplib.SMTPAuthenticationError) as exc:
        _login(srv, pw="wrong")
    assert exc.value.smtp_code == 535
    assert exc.value.smtp_error.startswith(b"5.7.8")
    msg = EmailMessage()
    msg["From"] = "bill@yahoo.test"
    msg["To"] = "ann@yahoo.test"
    msg["Subject"] = "lunch"
    msg.set_content("At noon?\n")
    with _login(srv) as c:
        assert c.send_message(msg) == {}
    files = maildir_files(cfg, "ann@yahoo.test")
    assert len(files) == 1
    data = files[0].read_bytes()
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"with ESMTPSA" in head  # RFC 3848: authenticated submission over TLS
    assert b"billpw" not in data
    # RFC 6409 §8: Message-ID and Date were missing and are added.
    assert b"\r\nMessage-ID: <" in head and b"\r\nDate: " in head
    assert body == b"At noon?\r\n"


def test_auth_login_and_alias_as_sender(server: tuple[Config, ServerThread]) -> None:
    cfg, srv = server
    with smtplib.SMTP(*srv.endpoint("submission"), timeout=10) as c:
        c.starttls(context=_ctx())
        c.ehlo("client.test")
        assert c.docmd("AUTH", "LOGIN") == (334, b"VXNlcm5hbWU6")
        assert c.docmd(base64.b64encode(b"bill@yahoo.test").decode()) == (334, b"UGFzc3dvcmQ6")
        assert c.docmd(base64.b64encode(b"billpw").decode())[0] == 235
        # an alias that delivers to bill is one of his own addresses
        assert c.sendmail("william@yahoo.test", ["ann@yahoo.test"], b"Subject: x\r\n\r\nhi\r\n") == {}
    assert len(maildir_files(cfg, "ann@yahoo.test")) == 1


def test_cancelled_and_malformed_auth(server: tuple[Config, ServerThread]) -> None:
    _, srv = server
    with smtplib.SMTP(*srv.endpoint("submission"), timeout=10) as c:
        c.starttls(context=_ctx())
        c.ehlo("client.test")
        assert c.docmd("AUTH", "PLAIN") == (334, b"")
        assert c.docmd("*")[0] == 501
        assert c.docmd("AUTH", "PLAIN !!!notbase64")[0] == 501
        assert c.docmd("AUTH", "CRAM-MD5")[0] == 504


def test_spoofed_sender_and_null_sender_refused(server: tuple[Config, ServerThread]) -> None:
    _, srv = server
    with _login(srv) as c:
        assert c.docmd("MAIL", "FROM:<ann@yahoo.test>") == (553, b"5.7.1 Sender address rejected: not owned by authenticated user")
        assert c.docmd("MAIL", "FROM:<president@whitehouse.test>")[0] == 553
        assert c.docmd("MAIL", "FROM:<>")[0] == 553


def test_per_message_recipient_limit(server: tuple[Config, ServerThread]) -> None:
    _, srv = server
    with _login(srv) as c:
        c.mail("bill@yahoo.test")
        for _ in range(3):
            assert c.rcpt("ann@yahoo.test")[0] == 250
        code, text = c.rcpt("ann@yahoo.test")
        assert code == 452 and text.startswith(b"4.7.1")


def test_hourly_message_limit(server: tuple[Config, ServerThread]) -> None:
    _, srv = server
    with _login(srv) as c:
        for _ in range(5):
            assert c.sendmail("bill@yahoo.test", ["ann@yahoo.test"], b"Subject: x\r\n\r\nx\r\n") == {}
        code, text = c.docmd("MAIL", "FROM:<bill@yahoo.test>")
        assert code == 450 and text.startswith(b"4.7.1")


def test_implicit_tls_port_465(server: tuple[Config, ServerThread]) -> None:
    cfg, srv = server
    with smtplib.SMTP_SSL(*srv.endpoint("submissions"), context=_ctx(), timeout=10) as c:
        c.ehlo("client.test")
        assert not c.has_extn("starttls")
        c.login("bill@yahoo.test", "billpw")
        assert c.sendmail("bill@yahoo.test", ["ann@yahoo.test"], b"Subject: tls\r\n\r\nsecret\r\n") == {}
    assert len(maildir_files(cfg, "ann@yahoo.test")) == 1


def _raw_dialog(addr: tuple[str, int], lines: list[bytes]) -> list[bytes]:
    """Send each line and collect the reply lines (single-line replies)."""
    with socket.create_connection(addr, timeout=10) as s:
        f = s.makefile("rb")
        replies = [f.readline()]
        for line in lines:
            s.sendall(line)
            reply = f.readline()
            while reply[3:4] == b"-":
                reply = f.readline()
            replies.append(reply)
        return replies


@pytest.mark.parametrize("kind", ["smtp", "submission"])
def test_the_missions_open_relay_attempt_is_refused(server: tuple[Config, ServerThread], kind: str) -> None:
    """The mission's telnet example, byte for byte over a raw socket, on port 25 and 587."""
    cfg, srv = server
    replies = _raw_dialog(srv.endpoint(kind), [
        b"HELO whitehouse.test\r\n",
        b"MAIL FROM:<president@whitehouse.test>\r\n",
        b"RCPT TO:<bush@whitehouse.test>\r\n",
        b"QUIT\r\n",
    ])
    assert replies[0].startswith(b"220 mx.test ESMTP")
    assert replies[1] == b"250 mx.test Hello whitehouse.test\r\n"
    if kind == "smtp":
        assert replies[2] == b"250 2.1.0 Sender OK\r\n"
        assert replies[3] == b"554 5.7.1 <bush@whitehouse.test>: Relay access denied\r\n"
    else:
        assert replies[2] == b"530 5.7.0 Must issue a STARTTLS command first\r\n"
        assert replies[3] == b"503 5.5.1 Need MAIL command first\r\n"
    assert replies[4] == b"221 2.0.0 mx.test closing connection\r\n"
    assert not list((cfg.data_dir / "queue").rglob("*.json"))


def test_brute_force_is_throttled(tmp_path: Path) -> None:
    cfg = make_config(tmp_path / "data", "127.0.8.2", limits={"auth_max_failures": 3})
    add_user(cfg, "bill@yahoo.test", "billpw")
    with running_server(cfg) as srv:
        for _ in range(3):
            with pytest.raises(smtplib.SMTPAuthenticationError):
                _login(srv, pw="guess")
        # past the threshold even the right password is refused for the cool-down
        with pytest.raises(smtplib.SMTPAuthenticationError) as exc:
            _login(srv)
        assert exc.value.smtp_code == 454


def test_remote_recipient_is_queued_durably_with_its_body_type(tmp_path: Path) -> None:
    """A remote recipient goes to the outbound queue (committed before the 250), with the
    SMTPUTF8/8BITMIME facts the courier needs. DNS points at a dead loopback port, so the item
    stays queued and nothing leaves the machine."""
    from serpentmail.config import DNSConfig, Endpoint
    from serpentmail.queue.store import QueueStore

    cfg = make_config(tmp_path / "data", "127.0.8.3", dns=DNSConfig(nameservers=(Endpoint("127.0.8.3", 9),), timeout=0.5))
    add_user(cfg, "bill@yahoo.test", "billpw")
    with running_server(cfg) as srv, _login(srv) as c:
        c.mail("bill@yahoo.test", ["BODY=8BITMIME", "SMTPUTF8"])
        assert c.rcpt("grüße@winview.test")[0] == 250
        code, text = c.data("Subject: é\r\n\r\nnaïve\r\n".encode())
        assert code == 250, text
        qid = text.decode().rsplit(" ", 1)[1]
        # Durable in the journal; its files come at the checkpoint: `queue list` reads both.
        records = {r.id: r for r in QueueStore(cfg.data_dir, read_journals=True).scan()}
    rec = records[qid]
    assert rec.sender == "bill@yahoo.test"
    assert [r.address for r in rec.recipients] == ["grüße@winview.test"]
    assert rec.smtputf8 and rec.body_8bit
    data = QueueStore(cfg.data_dir).data_path(qid).read_bytes()
    assert not data.startswith(b"Return-Path:")  # added only at final delivery (RFC 5321 §4.4)
    assert data.endswith("naïve\r\n".encode())


def test_missing_fields_added_in_front_of_the_header_section_also_when_it_is_huge(server: tuple[Config, ServerThread]) -> None:
    """RFC 6409 §8: Message-ID/Date are added whether the header section is small (held while it
    streams) or too big to hold (the slow copy), and the client's bytes are kept exactly."""
    cfg, srv = server
    small = b"Subject: small\r\n\r\nbody\r\n"
    huge = b"Subject: huge\r\n" + b"X-Filler: " + b"y" * 300_000 + b"\r\n\r\nbody\r\n"
    with_both = b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <keep@yahoo.test>\r\n\r\nbody\r\n"
    with _login(srv) as c:
        for msg in (small, huge, with_both):
            assert c.sendmail("bill@yahoo.test", ["ann@yahoo.test"], msg) == {}
        # BDAT: the header section ends inside the second chunk
        assert c.docmd("MAIL", "FROM:<bill@yahoo.test>")[0] == 250
        assert c.docmd("RCPT", "TO:<ann@yahoo.test>")[0] == 250
        c.send(b"BDAT 10\r\nSubject: c")
        assert c.getreply()[0] == 250
        rest = b"hunked\r\n\r\nbody\r\n"
        c.send(b"BDAT %d LAST\r\n" % len(rest) + rest)
        assert c.getreply()[0] == 250
    files = maildir_files(cfg, "ann@yahoo.test")
    assert len(files) == 4
    stored = [f.read_bytes() for f in files]
    for original in (small, huge, b"Subject: chunked\r\n\r\nbody\r\n"):
        data = next(d for d in stored if d.endswith(original))
        head = data[: len(data) - len(original)]
        assert b"\r\nMessage-ID: <" in head and b"\r\nDate: " in head, head[-200:]
    kept = next(d for d in stored if d.endswith(with_both))
    assert kept.count(b"Message-ID:") == 1 and kept.count(b"\r\nDate:") == 1
