"""The sans-IO SMTP client engine: replies, EHLO/HELO, framing, pipelining, BDAT, AUTH."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from serpentmail.proto import replies as R
from serpentmail.proto.smtp_client import (
    NEED_DATA,
    DotStuffer,
    ReplyError,
    ServerReply,
    SMTPClientConnection,
    dot_stuff,
)
from serpentmail.proto.smtp_server import NEED_DATA as SERVER_NEED_DATA
from serpentmail.proto.smtp_server import (
    DataChunk,
    MailFrom,
    MessageComplete,
    RcptTo,
    SessionOptions,
    SMTPServerConnection,
)


def replies(c: SMTPClientConnection, data: bytes) -> list[ServerReply]:
    c.receive_data(data)
    out = []
    while True:
        ev = c.next_event()
        if ev is NEED_DATA:
            return out
        assert isinstance(ev, ServerReply)
        out.append(ev)


def greeted() -> SMTPClientConnection:
    c = SMTPClientConnection()
    assert replies(c, b"220 mx.test ESMTP\r\n")[0].command == "GREETING"
    return c


def test_multiline_reply_split_anywhere_and_enhanced_code() -> None:
    c = greeted()
    c.mail("a@b.test")
    raw = b"550-5.7.1 first line\r\n550-5.7.1 second\r\n550 5.7.1 third\r\n"
    got: list[ServerReply] = []
    for i in range(len(raw)):  # byte by byte: the reply appears only when complete
        got += replies(c, raw[i:i + 1])
        assert len(got) == (1 if i == len(raw) - 1 else 0)
    r = got[0]
    assert (r.command, r.code, r.enhanced, r.lines) == ("MAIL", 550, "5.7.1", ("first line", "second", "third"))
    assert str(r) == "550 5.7.1 first line second third" and r.is_permanent


@pytest.mark.parametrize("raw,code,enhanced,text", [
    (b"250 OK\n", 250, "", "OK"),  # bare LF tolerated on replies
    (b"250\r\n", 250, "", ""),  # code only
    (b"451 5.1.1 mismatched class\r\n", 451, "", "5.1.1 mismatched class"),  # not an enhanced code
    (b"452 4.5.3 too many\r\n", 452, "4.5.3", "too many"),
])
def test_reply_forms(raw: bytes, code: int, enhanced: str, text: str) -> None:
    c = greeted()
    c.rcpt("x@y.test")
    [r] = replies(c, raw)
    assert (r.code, r.enhanced, r.text, r.argument) == (code, enhanced, text, "x@y.test")


@pytest.mark.parametrize("raw", [b"HTTP/1.1 400 Bad\r\n", b"25 short\r\n", b"250-a\r\n251 b\r\n", b"250x\r\n"])
def test_garbage_replies_raise(raw: bytes) -> None:
    c = greeted()
    c.noop()
    with pytest.raises(ReplyError):
        replies(c, raw)


def test_reply_without_command_is_an_error() -> None:
    c = greeted()
    with pytest.raises(ReplyError):
        replies(c, b"250 surprise\r\n")


def test_ehlo_records_extensions() -> None:
    c = greeted()
    c.ehlo("me.test")
    assert c.data_to_send() == b"EHLO me.test\r\n"
    replies(c, b"250-mx.test hi\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n"
               b"250-STARTTLS\r\n250-CHUNKING\r\n250-auth plain login\r\n250 ENHANCEDSTATUSCODES\r\n")
    ext = c.extensions
    assert c.extended and c.server_name == "mx.test"
    for kw in ("PIPELINING", "8BITMIME", "SMTPUTF8", "STARTTLS", "CHUNKING", "ENHANCEDSTATUSCODES"):
        assert kw in ext
    assert ext.size_limit == 1000 and ext.auth_mechanisms == {"PLAIN", "LOGIN"}
    c.starttls()
    replies(c, b"220 2.0.0 go\r\n")
    c.tls_established()  # RFC 3207 §4.2: forget everything learnt before TLS
    assert "PIPELINING" not in c.extensions and c.extensions.size_limit is None


def test_ehlo_refused_falls_back_to_helo() -> None:
    c = greeted()
    c.ehlo("me.test")
    c.data_to_send()
    [r] = replies(c, b"502 5.5.1 EHLO not implemented\r\n")
    assert r.command == "EHLO" and r.code == 502
    # The engine queued HELO itself and expects its reply.
    assert c.data_to_send() == b"HELO me.test\r\n" and c.expecting == ("HELO",)
    [r] = replies(c, b"250 mx.test\r\n")
    assert r.command == "HELO" and not c.extended and "SIZE" not in c.extensions


def test_ehlo_421_does_not_fall_back() -> None:
    c = greeted()
    c.ehlo("me.test")
    c.data_to_send()
    [r] = replies(c, b"421 4.3.2 bye\r\n")
    assert r.code == 421 and c.data_to_send() == b"" and c.closed


def test_pipelined_mail_and_rcpts_in_one_write_matched_in_order() -> None:
    c = greeted()
    c.mail("a@b.test", size=123, body="8BITMIME", smtputf8=True)
    c.rcpt("one@x.test")
    c.rcpt("two@x.test")
    assert c.data_to_send() == (b"MAIL FROM:<a@b.test> SIZE=123 BODY=8BITMIME SMTPUTF8\r\n"
                                b"RCPT TO:<one@x.test>\r\nRCPT TO:<two@x.test>\r\n")
    assert c.expecting == ("MAIL", "RCPT", "RCPT")
    got = replies(c, b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n550 5.1.1 no such user\r\n")
    assert [(r.command, r.argument, r.code) for r in got] == [
        ("MAIL", "", 250), ("RCPT", "one@x.test", 250), ("RCPT", "two@x.test", 550)]
    assert c.expecting == ()


def test_null_sender_and_injection_refused() -> None:
    c = greeted()
    c.mail("")
    assert c.data_to_send() == b"MAIL FROM:<>\r\n"
    with pytest.raises(ValueError):
        c.rcpt("x@y.test>\r\nRCPT TO:<evil@z.test")


@pytest.mark.parametrize("message,wire", [
    (b"a\r\n.\r\nb\r\n", b"a\r\n..\r\nb\r\n.\r\n"),  # a line that is just "."
    (b".lead\r\n", b"..lead\r\n.\r\n"),  # a leading dot on the first line
    (b"no final crlf", b"no final crlf\r\n.\r\n"),  # the message always ends with CRLF
    (b"", b".\r\n"),
    (b"x\r\n..\r\n", b"x\r\n...\r\n.\r\n"),
])
def test_dot_stuffing(message: bytes, wire: bytes) -> None:
    assert dot_stuff(message) == wire


def test_dot_stuffing_across_chunk_boundaries() -> None:
    message = b"l1\r\n.a\r\n.\r\n..b\r\nend"
    for cut1 in range(len(message) + 1):
        for cut2 in range(cut1, len(message) + 1):
            ds = DotStuffer()
            wire = ds.feed(message[:cut1]) + ds.feed(message[cut1:cut2]) + ds.feed(message[cut2:]) + ds.end()
            assert wire == dot_stuff(message), (cut1, cut2)


@given(st.lists(st.sampled_from([b"\r\n", b".", b"a", b"\r", b"\n", b".."]), max_size=30), st.integers(1, 7))
def test_stuffed_data_round_trips_through_the_server_engine(parts: list[bytes], size: int) -> None:
    # Messages as our queue holds them: CRLF line ends only.
    message = b"".join(parts).replace(b"\r", b"").replace(b"\n", b"\r\n")
    ds = DotStuffer()
    wire = b"".join(ds.feed(message[i:i + size]) for i in range(0, len(message), size)) + ds.end()
    srv = SMTPServerConnection(SessionOptions("mx.test"))
    srv.receive_data(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n" + wire)
    body = b""
    while True:
        ev = srv.next_event()
        if isinstance(ev, MailFrom):
            srv.respond(R.SENDER_OK)
        elif isinstance(ev, RcptTo):
            srv.respond(R.RECIPIENT_OK)
        elif isinstance(ev, DataChunk):
            body += ev.data
        elif isinstance(ev, MessageComplete):
            break
        elif ev is SERVER_NEED_DATA:
            raise AssertionError(f"server never saw the end of data: {wire!r}")
    expected = message if message.endswith(b"\r\n") or not message else message + b"\r\n"
    assert body == expected


def test_data_and_bdat_framing() -> None:
    c = greeted()
    c.data()
    assert c.data_to_send() == b"DATA\r\n"
    replies(c, b"354 go\r\n")
    ds = DotStuffer()
    c.send_content(ds.feed(b"hi\r\n"))
    c.end_data(ds.end())
    assert c.data_to_send() == b"hi\r\n.\r\n" and c.expecting == ("DOT",)
    [r] = replies(c, b"250 2.0.0 queued\r\n")
    assert r.command == "DOT"
    c.bdat(b"abc\r\n.\r\n")
    c.bdat(b"end\r\n", last=True)
    # RFC 3030 §2: exact octet counts, no stuffing, LAST on the final chunk.
    assert c.data_to_send() == b"BDAT 8\r\nabc\r\n.\r\nBDAT 5 LAST\r\nend\r\n"
    assert c.expecting == ("BDAT", "BDAT")


def test_auth_plain_and_login() -> None:
    c = greeted()
    c.auth_plain("user", "pw")
    line = c.data_to_send()
    assert line.startswith(b"AUTH PLAIN ") and base64.b64decode(line[11:-2]) == b"\x00user\x00pw"
    [r] = replies(c, b"235 2.7.0 ok\r\n")
    assert r.code == 235
    c = greeted()
    c.auth_login("user", "pw")
    assert c.data_to_send() == b"AUTH LOGIN\r\n"
    [challenge] = replies(c, b"334 VXNlcm5hbWU6\r\n")
    assert (challenge.command, challenge.code) == ("AUTH", 334) and c.expecting == ("AUTH",)
    assert c.data_to_send() == base64.b64encode(b"user") + b"\r\n"
    replies(c, b"334 UGFzc3dvcmQ6\r\n")
    assert c.data_to_send() == base64.b64encode(b"pw") + b"\r\n"
    got = replies(c, b"235 2.7.0 ok\r\n")
    assert got[-1].code == 235 and c.expecting == ()
