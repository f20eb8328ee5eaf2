"""Table-driven tests of the sans-IO SMTP engine: bytes in, exact replies and events out.

Every decision event (MAIL, RCPT, end of data, AUTH) is answered by a small policy so the
dialogs read like real sessions. Hypothesis checks that no byte stream or command sequence
makes the engine raise: it only ever produces replies.
"""

from __future__ import annotations

import base64
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serpentmail.proto import replies as R
from serpentmail.proto.replies import Reply
from serpentmail.proto.smtp_server import (
    _DOT_WINDOW,
    NEED_DATA,
    AuthAttempt,
    CloseConnection,
    DataChunk,
    DataStart,
    Event,
    Helo,
    MailFrom,
    MessageComplete,
    ProtocolError,
    RcptTo,
    SessionLimits,
    SessionOptions,
    SMTPServerConnection,
    StartTLS,
    TransactionReset,
    _find_line_dot,
)

HOST = "mx.test"
MX = SessionOptions(hostname=HOST, tls_available=True)
SUBMISSION = SessionOptions(hostname=HOST, tls_available=True, auth_enabled=True, mail_requires_auth=True)
SUBMISSION_TLS = SessionOptions(hostname=HOST, tls_active=True, auth_enabled=True, mail_requires_auth=True)
EHLO = b"EHLO client.test\r\n"
ENVELOPE = b"MAIL FROM:<a@b.test>\r\nRCPT TO:<bill@mx.test>\r\n"


def default_policy(ev: Event) -> Reply:
    """Accept everything except recipients whose local part starts with 'unknown'."""
    match ev:
        case MailFrom():
            return R.SENDER_OK
        case RcptTo():
            return R.UNKNOWN_USER if ev.address.local.startswith("unknown") else R.RECIPIENT_OK
        case MessageComplete():
            return R.QUEUED
        case AuthAttempt():
            return R.AUTH_OK if ev.password == "secret" else R.AUTH_FAILED
    raise AssertionError(ev)


@dataclass
class Session:
    """Drives an engine the way the asyncio adapter does and records everything."""

    options: SessionOptions = MX
    limits: SessionLimits = field(default_factory=SessionLimits)
    policy: Callable[[Event], Reply] = default_policy
    engine: SMTPServerConnection = field(init=False)
    events: list[Event] = field(default_factory=list)
    out: bytearray = field(default_factory=bytearray)

    def __post_init__(self) -> None:
        self.engine = SMTPServerConnection(self.options, self.limits)
        self.out += self.engine.greeting()

    def feed(self, data: bytes) -> bytes:
        """Feed ``data``; return the bytes the server sent in response."""
        before = len(self.out)
        self.engine.receive_data(data)
        self.pump()
        return bytes(self.out[before:])

    def pump(self) -> None:
        while True:
            ev = self.engine.next_event()
            if ev is NEED_DATA:
                break
            assert not isinstance(ev, type(NEED_DATA))
            self.events.append(ev)
            if isinstance(ev, MailFrom | RcptTo | MessageComplete | AuthAttempt):
                self.engine.respond(self.policy(ev))
            elif isinstance(ev, StartTLS):
                self.out += self.engine.data_to_send()
                self.engine.tls_established()
        self.out += self.engine.data_to_send()

    @property
    def body(self) -> bytes:
        return b"".join(e.data for e in self.events if isinstance(e, DataChunk))

    def kinds(self) -> list[type]:
        return [type(e) for e in self.events]

    def codes(self) -> list[str]:
        """Reply codes with enhanced codes of everything sent after the greeting, e.g. '250 2.1.0'."""
        lines = bytes(self.out).split(b"\r\n")[1:-1]
        res = []
        for ln in lines:
            if ln[3:4] == b"-":
                continue
            parts = ln.decode().split(" ")
            code = parts[0]
            if len(parts) > 1 and parts[1][:1].isdigit() and "." in parts[1]:
                code += " " + parts[1]
            res.append(code)
        return res


def run(data: bytes, options: SessionOptions = MX, **limits: int) -> Session:
    s = Session(options, SessionLimits(**limits))
    s.feed(data)
    return s


# --- greeting and EHLO -----------------------------------------------------------------------


def test_greeting() -> None:
    assert SMTPServerConnection(MX).greeting() == b"220 mx.test ESMTP serpentmail\r\n"


def test_ehlo_keywords_mx() -> None:
    out = Session(limits=SessionLimits(max_message_size=1000)).feed(EHLO)
    assert out == (
        b"250-mx.test Hello client.test\r\n"
        b"250-PIPELINING\r\n"
        b"250-SIZE 1000\r\n"
        b"250-8BITMIME\r\n"
        b"250-SMTPUTF8\r\n"
        b"250-ENHANCEDSTATUSCODES\r\n"
        b"250-CHUNKING\r\n"
        b"250 STARTTLS\r\n"
    )


@pytest.mark.parametrize(
    ("options", "starttls", "auth"),
    [
        (SessionOptions(hostname=HOST), False, False),  # no certificate: no STARTTLS
        (MX, True, False),  # MX never offers AUTH
        (SUBMISSION, True, False),  # submission before TLS: no AUTH in plaintext
        (SUBMISSION_TLS, False, True),  # implicit TLS: AUTH, and no STARTTLS
    ],
)
def test_ehlo_starttls_and_auth_offered_only_where_right(options: SessionOptions, starttls: bool, auth: bool) -> None:
    out = Session(options).feed(EHLO)
    assert (b"STARTTLS\r\n" in out) is starttls
    assert (b"AUTH PLAIN LOGIN\r\n" in out) is auth


def test_auth_offered_after_starttls_on_submission() -> None:
    s = Session(SUBMISSION)
    s.feed(EHLO + b"STARTTLS\r\n")
    out = s.feed(EHLO)
    assert b"AUTH PLAIN LOGIN\r\n" in out
    assert b"STARTTLS" not in out


def test_ehlo_event_and_helo() -> None:
    s = run(b"HELO client.test\r\n")
    assert s.out.endswith(b"250 mx.test Hello client.test\r\n")
    assert s.events == [Helo("client.test", extended=False)]
    s = run(EHLO)
    assert s.events == [Helo("client.test", extended=True)]


# --- the table: bytes in -> replies out ------------------------------------------------------

TABLE: list[tuple[str, bytes, list[str]]] = [
    ("noop", b"NOOP\r\n", ["250 2.0.0"]),
    ("lower-case verbs", b"noop\r\nehlo x\r\nmail from:<a@b.test>\r\nrcpt to:<c@mx.test>\r\n", ["250 2.0.0", "250", "250 2.1.0", "250 2.1.5"]),
    ("rset", b"RSET\r\n", ["250 2.0.0"]),
    ("quit", b"QUIT\r\nNOOP\r\n", ["221 2.0.0"]),
    ("vrfy 252", b"VRFY bill\r\n", ["252 2.5.2"]),
    ("vrfy without argument", b"VRFY\r\n", ["501 5.5.4"]),
    ("expn", b"EXPN list\r\n", ["502 5.5.1"]),
    ("help", b"HELP\r\n", ["214 2.0.0"]),
    ("unknown command", b"FOO\r\n", ["500 5.5.2"]),
    ("empty line", b"\r\n", ["500 5.5.2"]),
    ("ehlo without name", b"EHLO\r\n", ["501 5.5.4"]),
    ("helo without name", b"HELO\r\n", ["501 5.5.4"]),
    ("mail before helo", b"MAIL FROM:<a@b.test>\r\n", ["503 5.5.1"]),
    ("rcpt before helo", b"RCPT TO:<a@b.test>\r\n", ["503 5.5.1"]),
    ("rcpt before mail", EHLO + b"RCPT TO:<a@b.test>\r\n", ["250", "503 5.5.1"]),
    ("data before mail", EHLO + b"DATA\r\n", ["250", "503 5.5.1"]),
    ("data without recipients", EHLO + b"MAIL FROM:<a@b.test>\r\nDATA\r\n", ["250", "250 2.1.0", "554 5.5.1"]),
    ("data with argument", EHLO + ENVELOPE + b"DATA x\r\n", ["250", "250 2.1.0", "250 2.1.5", "501 5.5.4"]),
    ("nested mail", EHLO + b"MAIL FROM:<a@b.test>\r\nMAIL FROM:<a@b.test>\r\n", ["250", "250 2.1.0", "503 5.5.1"]),
    ("mail syntax", EHLO + b"MAIL <a@b.test>\r\n", ["250", "501 5.5.4"]),
    ("rcpt syntax", EHLO + b"MAIL FROM:<>\r\nRCPT <a@b.test>\r\n", ["250", "250 2.1.0", "501 5.5.4"]),
    ("bad sender", EHLO + b"MAIL FROM:<a@@b>\r\n", ["250", "501 5.1.7"]),
    ("bad recipient", EHLO + b"MAIL FROM:<>\r\nRCPT TO:<no-domain>\r\n", ["250", "250 2.1.0", "501 5.1.3"]),
    ("null recipient", EHLO + b"MAIL FROM:<>\r\nRCPT TO:<>\r\n", ["250", "250 2.1.0", "501 5.1.3"]),
    ("unknown MAIL parameter", EHLO + b"MAIL FROM:<a@b.test> FOO=bar\r\n", ["250", "555 5.5.4"]),
    ("unknown RCPT parameter", EHLO + b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@mx.test> NOTIFY=NEVER\r\n", ["250", "250 2.1.0", "555 5.5.4"]),
    ("AUTH= on MX is unknown", EHLO + b"MAIL FROM:<a@b.test> AUTH=<>\r\n", ["250", "555 5.5.4"]),
    ("SIZE within limit", EHLO + b"MAIL FROM:<a@b.test> SIZE=1000\r\n", ["250", "250 2.1.0"]),
    ("SIZE too big", EHLO + b"MAIL FROM:<a@b.test> SIZE=1001\r\n", ["250", "552 5.3.4"]),
    ("SIZE not a number", EHLO + b"MAIL FROM:<a@b.test> SIZE=12k\r\n", ["250", "501 5.5.4"]),
    ("SIZE without value", EHLO + b"MAIL FROM:<a@b.test> SIZE\r\n", ["250", "501 5.5.4"]),
    ("SIZE with non-ASCII digits", EHLO + "MAIL FROM:<a@b.test> SIZE=\u00b2\r\n".encode(), ["250", "501 5.5.4"]),
    ("SIZE with Arabic digits", EHLO + "MAIL FROM:<a@b.test> SIZE=\u0661\u0662\r\n".encode(), ["250", "501 5.5.4"]),
    ("BODY=8BITMIME", EHLO + b"MAIL FROM:<a@b.test> BODY=8BITMIME\r\n", ["250", "250 2.1.0"]),
    ("BODY=7BIT", EHLO + b"MAIL FROM:<a@b.test> BODY=7bit\r\n", ["250", "250 2.1.0"]),
    ("BODY=BINARYMIME refused", EHLO + b"MAIL FROM:<a@b.test> BODY=BINARYMIME\r\n", ["250", "501 5.5.4"]),
    ("SMTPUTF8 with value", EHLO + b"MAIL FROM:<a@b.test> SMTPUTF8=yes\r\n", ["250", "501 5.5.4"]),
    ("non-ASCII sender needs SMTPUTF8", EHLO + "MAIL FROM:<j\u00f6rg@b.test>\r\n".encode(), ["250", "553 5.6.7"]),
    ("non-ASCII sender with SMTPUTF8", EHLO + "MAIL FROM:<j\u00f6rg@b.test> SMTPUTF8\r\n".encode(), ["250", "250 2.1.0"]),
    ("non-ASCII recipient needs SMTPUTF8", EHLO + "MAIL FROM:<a@b.test>\r\nRCPT TO:<j\u00f6rg@mx.test>\r\n".encode(), ["250", "250 2.1.0", "553 5.6.7"]),
    ("non-ASCII recipient with SMTPUTF8", EHLO + "MAIL FROM:<a@b.test> SMTPUTF8\r\nRCPT TO:<j\u00f6rg@mx.test>\r\n".encode(), ["250", "250 2.1.0", "250 2.1.5"]),
    ("non-ASCII domain with SMTPUTF8", EHLO + "MAIL FROM:<a@b.test> SMTPUTF8\r\nRCPT TO:<x@b\u00fccher.test>\r\n".encode(), ["250", "250 2.1.0", "250 2.1.5"]),
    ("invalid UTF-8 in command", EHLO + b"MAIL FROM:<\xff@b.test>\r\n", ["250", "500 5.5.2"]),
    ("NUL in command", b"NOOP\x00\r\n", ["500 5.5.2"]),
    ("bare postmaster", EHLO + b"MAIL FROM:<>\r\nRCPT TO:<Postmaster>\r\n", ["250", "250 2.1.0", "250 2.1.5"]),
    ("bare non-postmaster refused", EHLO + b"MAIL FROM:<>\r\nRCPT TO:<bill>\r\n", ["250", "250 2.1.0", "501 5.1.3"]),
    ("unknown user from policy", EHLO + b"MAIL FROM:<>\r\nRCPT TO:<unknown@mx.test>\r\n", ["250", "250 2.1.0", "550 5.1.1"]),
    ("starttls unavailable", b"STARTTLS\r\n", ["454 4.7.0"]),
    ("starttls with argument", b"STARTTLS now\r\n", ["501 5.5.4"]),
    ("auth on MX", EHLO + b"AUTH PLAIN AGJpbGwAc2VjcmV0\r\n", ["250", "502 5.5.1"]),
    ("bare LF in command", b"NOOP\n", ["500 5.5.2"]),
    ("bare CR in command", b"NO\rOP\r\n", ["500 5.5.2"]),
    ("CR CR LF", b"NOOP\r\r\n", ["500 5.5.2"]),
]

_TABLE_OPTIONS = {"starttls unavailable": SessionOptions(hostname=HOST)}


@pytest.mark.parametrize(("name", "data", "codes"), TABLE, ids=[t[0] for t in TABLE])
def test_table(name: str, data: bytes, codes: list[str]) -> None:
    s = run(data, _TABLE_OPTIONS.get(name, MX), max_message_size=1000)
    assert s.codes() == codes


def test_every_non_ehlo_reply_carries_an_enhanced_code() -> None:
    s = run(b"".join(t[1] for t in TABLE if b"QUIT" not in t[1]), max_errors=1000)
    keywords = (b"PIPELINING", b"SIZE ", b"8BITMIME", b"SMTPUTF8", b"ENHANCEDSTATUSCODES", b"CHUNKING", b"STARTTLS")
    checked = 0
    for line in bytes(s.out).split(b"\r\n")[1:-1]:
        # exempt by RFC 2034: the greeting, 354, and the EHLO/HELO replies
        if line[:3] in (b"220", b"354") or b" Hello " in line or line[4:].startswith(keywords):
            continue
        assert line[4:5].isdigit() and line[5:6] == b".", line
        checked += 1
    assert checked > 40


def test_helo_and_ehlo_reset_the_transaction() -> None:
    s = run(EHLO + ENVELOPE + EHLO + b"RCPT TO:<c@mx.test>\r\n")
    assert s.codes() == ["250", "250 2.1.0", "250 2.1.5", "250", "503 5.5.1"]
    assert TransactionReset in s.kinds()


def test_rset_resets_the_transaction() -> None:
    s = run(EHLO + ENVELOPE + b"RSET\r\nDATA\r\n")
    assert s.codes() == ["250", "250 2.1.0", "250 2.1.5", "250 2.0.0", "503 5.5.1"]
    assert s.kinds().count(TransactionReset) == 1


def test_quit_closes() -> None:
    s = run(b"QUIT\r\nNOOP\r\n")
    assert s.out.endswith(b"221 2.0.0 mx.test closing connection\r\n")
    assert isinstance(s.events[-1], CloseConnection)
    assert s.engine.closed
    assert s.feed(b"NOOP\r\n") == b""


# --- a full message -------------------------------------------------------------------------


def test_full_transaction_events_and_replies() -> None:
    s = run(EHLO + ENVELOPE + b"DATA\r\nSubject: x\r\n\r\nhello\r\n.\r\nQUIT\r\n")
    assert s.codes() == ["250", "250 2.1.0", "250 2.1.5", "354", "250 2.0.0", "221 2.0.0"]
    assert s.kinds() == [Helo, MailFrom, RcptTo, DataStart, DataChunk, MessageComplete, CloseConnection]
    assert s.body == b"Subject: x\r\n\r\nhello\r\n"
    done = s.events[5]
    assert isinstance(done, MessageComplete)
    assert done.size == len(s.body)
    assert done.header_names == frozenset({"subject"})
    assert done.hops == 0
    mail = s.events[1]
    assert isinstance(mail, MailFrom) and str(mail.address) == "a@b.test"


def test_two_messages_in_one_session() -> None:
    s = run(EHLO + ENVELOPE + b"DATA\r\nA\r\n.\r\n" + ENVELOPE + b"DATA\r\nB\r\n.\r\n")
    assert s.codes().count("250 2.0.0") == 2
    assert s.body == b"A\r\nB\r\n"


def test_refused_message_resets() -> None:
    s = Session(policy=lambda ev: R.LOCAL_ERROR if isinstance(ev, MessageComplete) else default_policy(ev))
    s.feed(EHLO + ENVELOPE + b"DATA\r\nA\r\n.\r\nRCPT TO:<c@mx.test>\r\n")
    assert s.codes() == ["250", "250 2.1.0", "250 2.1.5", "354", "451 4.3.0", "503 5.5.1"]


def test_empty_message() -> None:
    s = run(EHLO + ENVELOPE + b"DATA\r\n.\r\n")
    assert s.codes()[-1] == "250 2.0.0"
    assert s.body == b""


# --- dot-stuffing and the terminator ------------------------------------------------------------

DOT_CASES = [
    (b"..leading dot\r\n", b".leading dot\r\n"),
    (b"..\r\n", b".\r\n"),
    (b"...\r\n", b"..\r\n"),
    (b"a\r\n..\r\nb\r\n", b"a\r\n.\r\nb\r\n"),
    (b"a\r\n...x\r\n", b"a\r\n..x\r\n"),
    (b"a.b\r\n. not a terminator\r\n", b"a.b\r\n not a terminator\r\n"),
    (b"\r\n\r\n", b"\r\n\r\n"),
    (b"x" * 70000 + b"\r\n..y\r\n", b"x" * 70000 + b"\r\n.y\r\n"),
    (b"." + b"x" * 70000 + b"\r\n", b"x" * 70000 + b"\r\n"),
]


@pytest.mark.parametrize(("content", "expected"), DOT_CASES)
def test_dot_unstuffing(content: bytes, expected: bytes) -> None:
    s = run(EHLO + ENVELOPE + b"DATA\r\n" + content + b".\r\nNOOP\r\n")
    assert s.body == expected
    assert s.codes()[-2:] == ["250 2.0.0", "250 2.0.0"]


def _dialog_output(pieces: list[bytes]) -> tuple[bytes, bytes, list[str]]:
    s = Session()
    for p in pieces:
        s.feed(p)
    return bytes(s.out), s.body, [type(e).__name__ for e in s.events if not isinstance(e, DataChunk)]


_SPLIT_STREAM = (
    EHLO + ENVELOPE + b"DATA\r\n"
    + b"Subject: split\r\n\r\n..a\r\n.\r\r\n.x\r\n\r\n..\r\nend\r\n.\r\n"
    + ENVELOPE + b"DATA\r\nsecond\r\n.\r\nQUIT\r\n"
)


def test_terminator_split_at_every_boundary() -> None:
    whole = _dialog_output([_SPLIT_STREAM])
    # the middle message has a bare CR: refused; the second is accepted
    assert whole[0].count(b"550 5.5.2") == 1
    assert whole[0].count(b"250 2.0.0 OK: queued") == 1
    for i in range(1, len(_SPLIT_STREAM)):
        assert _dialog_output([_SPLIT_STREAM[:i], _SPLIT_STREAM[i:]]) == whole, i
    assert _dialog_output([bytes([b]) for b in _SPLIT_STREAM]) == whole


def test_clean_message_split_everywhere() -> None:
    stream = EHLO + ENVELOPE + b"DATA\r\n..a\r\n\r\n.\r\n.x\r\n..\r\nend\r\n.\r\nNOOP\r\n"
    whole = _dialog_output([stream])
    assert b"250 2.0.0 OK: queued" in whole[0]
    assert _dialog_output([bytes([b]) for b in stream]) == whole
    rnd = random.Random(1234)
    for _ in range(300):
        cuts = sorted(rnd.sample(range(1, len(stream)), rnd.randint(1, 8)))
        pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
        assert _dialog_output(pieces) == whole, cuts


@given(st.lists(st.integers(min_value=1, max_value=len(_SPLIT_STREAM) - 1), max_size=12))
def test_hypothesis_random_splits_give_identical_output(cuts: list[int]) -> None:
    cuts = sorted(set(cuts))
    pieces = [_SPLIT_STREAM[a:b] for a, b in zip([0, *cuts], [*cuts, len(_SPLIT_STREAM)], strict=True)]
    assert _dialog_output(pieces) == _dialog_output([_SPLIT_STREAM])


# --- bare LF / bare CR and the December 2023 smuggling payloads --------------------------------

SMUGGLING = [
    b"\n.\n",
    b"\r.\r",
    b"\n.\r\n",
    b"\r.\r\n",
    b"\r\n.\n",
    b"\r\n.\r",
    b"\n.\r",
]


@pytest.mark.parametrize("separator", SMUGGLING)
def test_smuggling_payloads_never_end_data(separator: bytes) -> None:
    smuggled = b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<victim@mx.test>\r\nDATA\r\nsmuggled\r\n"
    s = run(EHLO + ENVELOPE + b"DATA\r\nfirst" + separator + smuggled + b".\r\n")
    # exactly one DATA was started, its content held everything, and it was refused as a whole
    assert s.kinds().count(DataStart) == 1
    assert s.kinds().count(MailFrom) == 1
    assert MessageComplete not in s.kinds()
    assert s.codes()[-1] == "550 5.5.2"
    assert b"evil" not in b"".join(str(e).encode() for e in s.events if not isinstance(e, DataChunk))


@pytest.mark.parametrize("content", [b"a\nb\r\n", b"a\rb\r\n", b"a\r\r\n", b"\nx\r\n", b"x" * 70000 + b"\n" + b"y\r\n"])
def test_bare_newline_in_data_refused(content: bytes) -> None:
    s = run(EHLO + ENVELOPE + b"DATA\r\n" + content + b".\r\nNOOP\r\n")
    assert s.codes()[-2:] == ["550 5.5.2", "250 2.0.0"]
    assert MessageComplete not in s.kinds()
    assert TransactionReset in s.kinds()


def test_bare_lf_dot_lf_byte_by_byte() -> None:
    stream = EHLO + ENVELOPE + b"DATA\r\nfirst\n.\nNOOP\n" + b"\r\n.\r\n"
    s = Session()
    for b in stream:
        s.feed(bytes([b]))
    assert s.codes()[-1] == "550 5.5.2"
    assert s.kinds().count(DataStart) == 1


# --- size, recipients, hops, line length, errors -------------------------------------------------


def test_actual_size_during_data() -> None:
    s = run(EHLO + ENVELOPE + b"DATA\r\n" + b"x" * 200 + b"\r\n.\r\nNOOP\r\n", max_message_size=100)
    assert s.codes()[-2:] == ["552 5.3.4", "250 2.0.0"]
    assert MessageComplete not in s.kinds()
    assert len(s.body) <= 100


def test_size_exactly_at_limit_accepted() -> None:
    s = run(EHLO + ENVELOPE + b"DATA\r\n" + b"x" * 98 + b"\r\n.\r\n", max_message_size=100)
    assert s.codes()[-1] == "250 2.0.0"


def test_actual_size_during_bdat() -> None:
    s = run(EHLO + ENVELOPE + b"BDAT 60\r\n" + b"x" * 60 + b"BDAT 60 LAST\r\n" + b"y" * 60 + b"NOOP\r\n", max_message_size=100)
    assert s.codes()[-3:] == ["250 2.0.0", "552 5.3.4", "250 2.0.0"]
    assert MessageComplete not in s.kinds()


def test_bdat_failed_chunk_fails_later_chunks() -> None:
    s = run(EHLO + ENVELOPE + b"BDAT 200\r\n" + b"x" * 200 + b"BDAT 1 LAST\r\nz" + b"NOOP\r\n", max_message_size=100)
    assert s.codes()[-3:] == ["552 5.3.4", "552 5.3.4", "250 2.0.0"]
    assert MessageComplete not in s.kinds()


def test_too_many_recipients() -> None:
    rcpts = b"".join(b"RCPT TO:<u%d@mx.test>\r\n" % i for i in range(4))
    s = run(EHLO + b"MAIL FROM:<a@b.test>\r\n" + rcpts, max_recipients=3)
    assert s.codes() == ["250", "250 2.1.0", "250 2.1.5", "250 2.1.5", "250 2.1.5", "452 4.5.3"]


def test_refused_recipients_do_not_count_towards_the_limit() -> None:
    rcpts = b"RCPT TO:<unknown1@mx.test>\r\nRCPT TO:<u1@mx.test>\r\nRCPT TO:<u2@mx.test>\r\n"
    s = run(EHLO + b"MAIL FROM:<a@b.test>\r\n" + rcpts, max_recipients=2)
    assert s.codes()[-3:] == ["550 5.1.1", "250 2.1.5", "250 2.1.5"]


def _received(n: int) -> bytes:
    return b"".join(b"Received: from h%d by h%d; Mon, 1 Jan 2024 00:00:00 +0000\r\n" % (i, i) for i in range(n))


@pytest.mark.parametrize(("hops", "code"), [(50, "250 2.0.0"), (51, "554 5.4.6")])
def test_mail_loop_detection(hops: int, code: str) -> None:
    s = run(EHLO + ENVELOPE + b"DATA\r\n" + _received(hops) + b"Subject: x\r\n\r\nbody\r\n.\r\n")
    assert s.codes()[-1] == code


def test_received_in_body_does_not_count() -> None:
    s = run(EHLO + ENVELOPE + b"DATA\r\nSubject: x\r\n\r\n" + _received(60) + b".\r\n")
    assert s.codes()[-1] == "250 2.0.0"


def test_loop_detection_with_bdat() -> None:
    msg = _received(51) + b"\r\nbody\r\n"
    s = run(EHLO + ENVELOPE + b"BDAT %d LAST\r\n" % len(msg) + msg)
    assert s.codes()[-1] == "554 5.4.6"


def test_command_line_too_long() -> None:
    s = run(b"NOOP " + b"x" * 600 + b"\r\nNOOP\r\n", max_line_length=512)
    assert s.codes() == ["500 5.5.2", "250 2.0.0"]
    assert b"Line too long" in s.out


def test_command_line_too_long_arriving_in_pieces_gets_one_reply() -> None:
    s = Session(limits=SessionLimits(max_line_length=512))
    for _ in range(10):
        s.feed(b"x" * 300)
    s.feed(b"\r\nNOOP\r\n")
    assert s.codes() == ["500 5.5.2", "250 2.0.0"]


def test_too_many_errors_closes_with_421() -> None:
    s = run(b"FOO\r\n" * 5 + b"NOOP\r\n", max_errors=3)
    assert s.codes() == ["500 5.5.2", "500 5.5.2", "500 5.5.2", "421 4.7.0"]
    assert isinstance(s.events[-1], CloseConnection)
    assert s.engine.closed


def test_refusals_from_policy_count_as_errors() -> None:
    rcpts = b"RCPT TO:<unknown@mx.test>\r\n" * 3
    s = run(EHLO + b"MAIL FROM:<a@b.test>\r\n" + rcpts, max_errors=3)
    assert s.codes()[-1] == "421 4.7.0"


@pytest.mark.parametrize("line", [b"GET / HTTP/1.1\r\n", b"POST /x HTTP/1.0\r\n", b"CONNECT mx.test:25 HTTP/1.1\r\n",
                                  b"HEAD / HTTP/1.1\r\n", b"PUT /a HTTP/1.1\r\n", b"OPTIONS * HTTP/1.1\r\n"])
def test_http_verbs_close_at_once(line: bytes) -> None:
    s = run(line + b"Host: mx.test\r\n\r\n")
    assert s.codes() == ["421 4.7.0"]
    assert isinstance(s.events[-1], CloseConnection)


def test_http_request_with_bare_lf_also_closes_at_once() -> None:
    s = run(b"GET / HTTP/1.0\nHost: mx.test\n\n")
    assert s.codes() == ["421 4.7.0"]
    assert isinstance(s.events[-1], CloseConnection)


# --- pipelining -------------------------------------------------------------------------------


def test_pipelined_commands_answered_in_order() -> None:
    stream = EHLO + b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@mx.test>\r\nRCPT TO:<unknown@mx.test>\r\nRCPT TO:<y@mx.test>\r\nDATA\r\nhi\r\n.\r\nRSET\r\nNOOP\r\nQUIT\r\n"
    s = run(stream)
    assert s.codes() == ["250", "250 2.1.0", "250 2.1.5", "550 5.1.1", "250 2.1.5", "354", "250 2.0.0", "250 2.0.0", "250 2.0.0", "221 2.0.0"]


def test_pipelining_waits_for_a_pending_decision() -> None:
    e = SMTPServerConnection(MX)
    e.receive_data(EHLO + b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@mx.test>\r\nNOOP\r\n")
    assert isinstance(e.next_event(), Helo)
    mail = e.next_event()
    assert isinstance(mail, MailFrom)
    assert e.awaiting_decision
    # nothing after MAIL is processed until MAIL is answered
    assert e.next_event() is NEED_DATA
    assert e.data_to_send().count(b"\r\n") == 8  # only the EHLO reply
    e.respond(R.SENDER_OK)
    rcpt = e.next_event()
    assert isinstance(rcpt, RcptTo)
    e.respond(R.RELAY_DENIED)
    assert e.next_event() is NEED_DATA
    assert e.data_to_send() == b"250 2.1.0 Sender OK\r\n554 5.7.1 Relay access denied\r\n250 2.0.0 OK\r\n"


def test_pipelined_refused_mail_then_rcpt_and_data() -> None:
    s = Session(policy=lambda ev: R.RATE_LIMITED if isinstance(ev, MailFrom) else default_policy(ev))
    s.feed(EHLO + ENVELOPE + b"DATA\r\nbody\r\n.\r\n")
    # RFC 2920: the commands after a refused MAIL fail, and the body is read as commands
    assert s.codes()[:4] == ["250", "450 4.7.1", "503 5.5.1", "503 5.5.1"]
    assert DataStart not in s.kinds()


def test_respond_without_pending_decision_is_a_protocol_error() -> None:
    e = SMTPServerConnection(MX)
    with pytest.raises(ProtocolError):
        e.respond(R.OK)


# --- BDAT (RFC 3030) -------------------------------------------------------------------------


def test_bdat_chunks() -> None:
    s = run(EHLO + ENVELOPE + b"BDAT 5\r\nhelloBDAT 7\r\n, world" + b"BDAT 2 LAST\r\n\r\nNOOP\r\n")
    assert s.codes() == ["250", "250 2.1.0", "250 2.1.5", "250 2.0.0", "250 2.0.0", "250 2.0.0", "250 2.0.0"]
    assert s.body == b"hello, world\r\n"
    assert s.kinds().count(DataStart) == 1
    ds = next(e for e in s.events if isinstance(e, DataStart))
    assert ds.chunking
    assert b"250 2.0.0 5 octets received\r\n250 2.0.0 12 octets received\r\n" in s.out


def test_bdat_does_not_unstuff_or_need_a_terminator() -> None:
    msg = b"..x\r\n.\r\nbinary\x00\xff\r\n"
    s = run(EHLO + ENVELOPE + b"BDAT %d LAST\r\n" % len(msg) + msg)
    assert s.body == msg
    assert s.codes()[-1] == "250 2.0.0"


@pytest.mark.parametrize("chunks", [
    [b"line one\nline two\r\n"],  # bare LF inside a chunk
    [b"abc\r", b"def\r\n"],  # a CR ending one chunk, the next not starting with LF
    [b"abc\r\n", b"\nxyz\r\n"],  # an LF starting a chunk after a complete CRLF
    [b"abc\r\n", b"end\r"],  # the message's last octet a CR
    [b"a\rb\r\n"],
])
def test_bdat_refuses_bare_cr_or_lf(chunks: list[bytes]) -> None:
    """RFC 5321 §2.3.8 for BDAT content too (no BINARYMIME is offered): refused at LAST with
    the same 550 as DATA, and no message is passed on."""
    stream = EHLO + ENVELOPE + b"".join(
        b"BDAT %d%s\r\n" % (len(c), b" LAST" if i == len(chunks) - 1 else b"") + c for i, c in enumerate(chunks))
    s = run(stream + b"NOOP\r\n")
    assert s.codes()[-2:] == ["550 5.5.2", "250 2.0.0"]
    assert MessageComplete not in s.kinds()


def test_bdat_crlf_straddling_chunks_and_reads_is_accepted() -> None:
    """A CRLF cut between two BDAT chunks, or between two reads, is one line ending."""
    stream = EHLO + ENVELOPE + b"BDAT 4\r\nabc\rBDAT 6 LAST\r\n\ndef\r\n"
    for pieces in ([stream], [bytes([b]) for b in stream]):
        s = Session()
        for piece in pieces:
            s.feed(piece)
        assert s.codes()[-1] == "250 2.0.0"
        assert MessageComplete in s.kinds()
        assert s.body == b"abc\r\ndef\r\n"


def test_bdat_zero_last() -> None:
    s = run(EHLO + ENVELOPE + b"BDAT 3\r\nabcBDAT 0 LAST\r\n")
    assert s.codes()[-2:] == ["250 2.0.0", "250 2.0.0"]
    assert MessageComplete in s.kinds()


def test_bdat_byte_by_byte() -> None:
    stream = EHLO + ENVELOPE + b"BDAT 10 LAST\r\n0123\r\n6789NOOP\r\n"
    whole = _dialog_output([stream])
    assert _dialog_output([bytes([b]) for b in stream]) == whole


def test_bdat_without_mail_still_consumes_the_bytes() -> None:
    # the chunk looks like commands; it must be swallowed, not executed
    chunk = b"RCPT TO:<x@mx.test>\r\n"
    s = run(EHLO + b"BDAT %d\r\n" % len(chunk) + chunk + b"NOOP\r\n")
    assert s.codes() == ["250", "503 5.5.1", "250 2.0.0"]
    assert RcptTo not in s.kinds()
    s = run(b"BDAT %d LAST\r\n" % len(chunk) + chunk + b"NOOP\r\n")
    assert s.codes() == ["503 5.5.1", "250 2.0.0"]


def test_bdat_without_mail_does_not_poison_the_next_transaction() -> None:
    s = run(EHLO + b"BDAT 3\r\nabc" + ENVELOPE + b"BDAT 2 LAST\r\nhi")
    assert s.codes() == ["250", "503 5.5.1", "250 2.1.0", "250 2.1.5", "250 2.0.0"]
    assert s.body == b"hi"


def test_bdat_without_recipients() -> None:
    s = run(EHLO + b"MAIL FROM:<a@b.test>\r\nBDAT 3 LAST\r\nabcNOOP\r\n")
    assert s.codes() == ["250", "250 2.1.0", "554 5.5.1", "250 2.0.0"]


@pytest.mark.parametrize("cmd", [b"BDAT\r\n", b"BDAT x\r\n", b"BDAT 5 FIRST\r\n", b"BDAT 1 LAST more\r\n", b"BDAT -1\r\n",
                                 "BDAT \u00b2\r\n".encode(), "BDAT \u0661\r\n".encode()])
def test_bad_bdat_closes_the_connection(cmd: bytes) -> None:
    s = run(EHLO + ENVELOPE + cmd + b"NOOP\r\n")
    assert s.codes()[-1] == "501 5.5.4"
    assert isinstance(s.events[-1], CloseConnection)


def test_data_after_bdat_refused() -> None:
    s = run(EHLO + ENVELOPE + b"BDAT 2\r\nabDATA\r\n")
    assert s.codes()[-1] == "503 5.5.1"


def test_rset_during_bdat_sequence() -> None:
    s = run(EHLO + ENVELOPE + b"BDAT 2\r\nabRSET\r\n" + ENVELOPE + b"BDAT 2 LAST\r\ncd")
    assert s.codes()[-1] == "250 2.0.0"
    assert s.body == b"abcd"  # the events carry both chunks; the reset tells the adapter to drop the first
    assert TransactionReset in s.kinds()


# --- STARTTLS ---------------------------------------------------------------------------------


def test_starttls_discards_pipelined_plaintext() -> None:
    e = SMTPServerConnection(MX)
    e.receive_data(EHLO + b"STARTTLS\r\nMAIL FROM:<evil@x.test>\r\nRCPT TO:<v@mx.test>\r\n")
    evs = []
    while (ev := e.next_event()) is not NEED_DATA:
        evs.append(ev)
    assert [type(x) for x in evs] == [Helo, StartTLS]
    assert e.data_to_send().endswith(b"220 2.0.0 Ready to start TLS\r\n")
    e.tls_established()
    assert e.buffered == 0
    # the session restarts: EHLO needed again, and the injected MAIL never ran
    e.receive_data(b"MAIL FROM:<a@b.test>\r\n")
    assert e.next_event() is NEED_DATA
    assert e.data_to_send() == b"503 5.5.1 Send EHLO/HELO first\r\n"
    assert e.tls_active


def test_starttls_aborts_transaction_and_not_offered_twice() -> None:
    s = Session()
    s.feed(EHLO + b"MAIL FROM:<a@b.test>\r\nSTARTTLS\r\n")
    assert TransactionReset in s.kinds()
    out = s.feed(EHLO + b"STARTTLS\r\nRCPT TO:<x@mx.test>\r\n")
    assert b"STARTTLS" not in out.split(b"\r\n")[0:8][-1]
    assert s.codes()[-2:] == ["503 5.5.1", "503 5.5.1"]


# --- AUTH (submission) --------------------------------------------------------------------------


def _b64(s: str) -> bytes:
    return base64.b64encode(s.encode())


AUTH_TABLE: list[tuple[str, bytes, list[str]]] = [
    ("plain initial response", b"AUTH PLAIN " + _b64("\0bill@mx.test\0secret") + b"\r\n", ["235 2.7.0"]),
    ("plain wrong password", b"AUTH PLAIN " + _b64("\0bill@mx.test\0nope") + b"\r\n", ["535 5.7.8"]),
    ("plain continuation", b"AUTH PLAIN\r\n" + _b64("\0bill@mx.test\0secret") + b"\r\n", ["334", "235 2.7.0"]),
    ("plain cancelled", b"AUTH PLAIN\r\n*\r\nNOOP\r\n", ["334", "501 5.0.0", "250 2.0.0"]),
    ("plain malformed base64", b"AUTH PLAIN !!!\r\nNOOP\r\n", ["501 5.5.2", "250 2.0.0"]),
    ("plain malformed continuation", b"AUTH PLAIN\r\nnot-base64!\r\nNOOP\r\n", ["334", "501 5.5.2", "250 2.0.0"]),
    ("plain without NULs", b"AUTH PLAIN " + _b64("billsecret") + b"\r\n", ["501 5.5.2"]),
    ("plain empty user", b"AUTH PLAIN " + _b64("\0\0secret") + b"\r\n", ["501 5.5.2"]),
    ("plain '=' is empty", b"AUTH PLAIN =\r\n", ["501 5.5.2"]),
    ("plain invalid UTF-8", b"AUTH PLAIN " + base64.b64encode(b"\0bill\0\xff") + b"\r\n", ["501 5.5.2"]),
    ("login", b"AUTH LOGIN\r\n" + _b64("bill@mx.test") + b"\r\n" + _b64("secret") + b"\r\n", ["334", "334", "235 2.7.0"]),
    ("login initial response", b"AUTH LOGIN " + _b64("bill@mx.test") + b"\r\n" + _b64("secret") + b"\r\n", ["334", "235 2.7.0"]),
    ("login cancelled at password", b"AUTH LOGIN\r\n" + _b64("bill") + b"\r\n*\r\nNOOP\r\n", ["334", "334", "501 5.0.0", "250 2.0.0"]),
    ("login malformed", b"AUTH LOGIN\r\n%%%\r\n", ["334", "501 5.5.2"]),
    ("unknown mechanism", b"AUTH CRAM-MD5\r\n", ["504 5.5.4"]),
    ("no mechanism", b"AUTH\r\n", ["501 5.5.4"]),
    ("mail needs auth", b"MAIL FROM:<bill@mx.test>\r\n", ["530 5.7.0"]),
    ("auth twice", b"AUTH PLAIN " + _b64("\0bill@mx.test\0secret") + b"\r\nAUTH PLAIN " + _b64("\0b\0secret") + b"\r\n", ["235 2.7.0", "503 5.5.1"]),
    ("auth then mail", b"AUTH PLAIN " + _b64("\0bill@mx.test\0secret") + b"\r\nMAIL FROM:<bill@mx.test>\r\n", ["235 2.7.0", "250 2.1.0"]),
    ("auth line too long cancels the exchange", b"AUTH PLAIN\r\n" + b"A" * 600 + b"\r\nNOOP\r\n", ["334", "500 5.5.2", "250 2.0.0"]),
    ("auth bare LF cancels the exchange", b"AUTH PLAIN\r\nAAAA\nNOOP\r\n", ["334", "500 5.5.2", "250 2.0.0"]),
]


@pytest.mark.parametrize(("name", "data", "codes"), AUTH_TABLE, ids=[t[0] for t in AUTH_TABLE])
def test_auth_table(name: str, data: bytes, codes: list[str]) -> None:
    s = run(EHLO + data, SUBMISSION_TLS, max_line_length=512)
    assert s.codes()[1:] == codes


def test_auth_plain_event_fields() -> None:
    s = run(EHLO + b"AUTH PLAIN " + _b64("admin\0bill@mx.test\0secret") + b"\r\n", SUBMISSION_TLS)
    ev = next(e for e in s.events if isinstance(e, AuthAttempt))
    assert (ev.mechanism, ev.authzid, ev.username, ev.password) == ("PLAIN", "admin", "bill@mx.test", "secret")
    assert "secret" not in repr(ev)
    assert s.engine.authenticated_as == "bill@mx.test"


def test_auth_requires_tls_on_plaintext_submission() -> None:
    s = run(EHLO + b"AUTH PLAIN " + _b64("\0bill@mx.test\0secret") + b"\r\nMAIL FROM:<a@b.test>\r\n", SUBMISSION)
    assert s.codes()[1:] == ["530 5.7.0", "530 5.7.0"]
    assert AuthAttempt not in s.kinds()


def test_auth_during_transaction_refused() -> None:
    s = run(EHLO + b"AUTH PLAIN " + _b64("\0bill@mx.test\0secret") + b"\r\nMAIL FROM:<bill@mx.test>\r\nAUTH LOGIN\r\n", SUBMISSION_TLS)
    assert s.codes()[-1] == "503 5.5.1"


# --- engine robustness: Hypothesis -------------------------------------------------------------

_COMMANDS = [
    b"EHLO c.test\r\n", b"HELO c.test\r\n", b"MAIL FROM:<a@b.test>\r\n", b"MAIL FROM:<> SIZE=10 BODY=8BITMIME\r\n",
    "MAIL FROM:<\u00e4@b.test> SMTPUTF8\r\n".encode(), b"RCPT TO:<x@mx.test>\r\n", b"RCPT TO:<postmaster>\r\n",
    b"DATA\r\n", b"hello\r\n", b".\r\n", b"..\r\n", b"\n.\n", b"\r.\r", b"BDAT 3\r\nabc", b"BDAT 4 LAST\r\nwxyz",
    b"BDAT 2\r\n", b"RSET\r\n", b"NOOP\r\n", b"VRFY x\r\n", b"HELP\r\n", b"STARTTLS\r\n", b"AUTH PLAIN\r\n",
    b"AUTH LOGIN\r\n", b"AUTH PLAIN " + _b64("\0u@mx.test\0secret") + b"\r\n", b"*\r\n", b"dXNlcg==\r\n",
    b"QUIT\r\n", b"GET / HTTP/1.1\r\n", b"Received: x\r\n", b"\r\n", b"x" * 3000, b"\r", b"\n", b"\x00",
    b"MAIL FROM:<a@b.test> SIZE=\xc2\xb2\r\n", b"BDAT \xd9\xa1\r\n",
]


def _random_policy(draw: Callable[[], bool]) -> Callable[[Event], Reply]:
    positive = {MailFrom: R.SENDER_OK, RcptTo: R.RECIPIENT_OK, MessageComplete: R.QUEUED, AuthAttempt: R.AUTH_OK}
    negative = [R.LOCAL_ERROR, R.UNKNOWN_USER, R.RELAY_DENIED, R.AUTH_FAILED, R.TOO_MANY_HOPS]

    def policy(ev: Event) -> Reply:
        return positive[type(ev)] if draw() else negative[hash(type(ev).__name__) % len(negative)]

    return policy


def _check_never_raises(options: SessionOptions, chunks: list[bytes], decisions: list[bool]) -> None:
    it = iter(decisions)
    s = Session(options, SessionLimits(max_message_size=500, max_recipients=3, max_line_length=600, max_errors=50),
                _random_policy(lambda: next(it, True)))
    for c in chunks:
        s.feed(c)
        if s.engine.closed:
            break
    out = bytes(s.out)
    # only well-formed replies come out
    assert out.endswith(b"\r\n")
    for line in out.split(b"\r\n")[:-1]:
        assert line[:3].isdigit() and line[3:4] in (b" ", b"-", b""), line


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=20), st.lists(st.booleans(), max_size=20),
       st.sampled_from([MX, SUBMISSION, SUBMISSION_TLS]))
def test_arbitrary_bytes_never_raise(chunks: list[bytes], decisions: list[bool], options: SessionOptions) -> None:
    _check_never_raises(options, [EHLO, *chunks], decisions)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.lists(st.sampled_from(_COMMANDS), max_size=30), st.lists(st.booleans(), max_size=30),
       st.sampled_from([MX, SUBMISSION, SUBMISSION_TLS]), st.randoms(use_true_random=False))
def test_command_sequences_never_raise(cmds: list[bytes], decisions: list[bool], options: SessionOptions,
                                       rnd: random.Random) -> None:
    stream = b"".join(cmds)
    cuts = sorted(rnd.sample(range(len(stream) + 1), min(len(stream) + 1, rnd.randint(0, 6))))
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    _check_never_raises(options, pieces, decisions)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80), st.text(max_size=80))
def test_arbitrary_text_commands_never_raise(verb: str, arg: str) -> None:
    line = f"{verb} {arg}".replace("\r", "").replace("\n", "").encode("utf-8", "surrogatepass")
    for opts in (MX, SUBMISSION_TLS):
        _check_never_raises(opts, [EHLO, b"MAIL FROM:<a@b.test>\r\n", line + b"\r\n",
                                   b"MAIL FROM:<a@b.test> " + line + b"\r\n", b"RCPT TO:<" + line + b">\r\n"], [])


@given(st.lists(st.binary(max_size=12).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")), min_size=1, max_size=40),
       st.lists(st.booleans(), max_size=40),
       st.lists(st.integers(min_value=1, max_value=4000), max_size=10))
def test_hypothesis_stuffed_lines_come_back_as_sent(lines: list[bytes], dotted: list[bool], cuts: list[int]) -> None:
    """Against a reference: lines (some starting with dots) stuffed as a client does (RFC 5321
    §4.5.2), the stream cut anywhere; the body is the original lines, whatever the cuts."""
    lines = [(b"." + ln if i < len(dotted) and dotted[i] else ln) for i, ln in enumerate(lines)]
    original = b"".join(ln + b"\r\n" for ln in lines)
    stuffed = b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in lines)
    stream = EHLO + ENVELOPE + b"DATA\r\n" + stuffed + b".\r\nNOOP\r\n"
    bounds = sorted({c for c in cuts if c < len(stream)})
    s = Session()
    for a, b in zip([0, *bounds], [*bounds, len(stream)], strict=True):
        s.feed(stream[a:b])
    assert s.body == original
    assert s.codes()[-2:] == ["250 2.0.0", "250 2.0.0"]


_PIECES = [b"\r\n.", b".", b"\r\n", b"\r", b"\n", b"\n.", b"\r.", b"x"]


@given(st.lists(st.tuples(st.integers(min_value=0, max_value=9000), st.sampled_from(_PIECES)), max_size=12))
def test_hypothesis_line_dot_search_matches_find(parts: list[tuple[int, bytes]]) -> None:
    """The windowed search finds the same first "\\r\\n." as a plain find, with dots far
    apart (several windows), close together, and at the very start."""
    buf = bytearray(b"".join(b"y" * filler + piece for filler, piece in parts))
    assert _find_line_dot(buf) == buf.find(b"\r\n.")


@pytest.mark.parametrize("gap", range(_DOT_WINDOW - 4, _DOT_WINDOW + 4))
def test_line_dot_search_at_the_window_edge(gap: int) -> None:
    """A lone dot, then a line starting with a dot about one window later: found wherever it
    falls against the window's end."""
    buf = bytearray(b"ab.c" + b"y" * gap + b"\r\n.z" + b"y" * 10)
    assert _find_line_dot(buf) == buf.find(b"\r\n.") >= 0


@pytest.mark.parametrize("dots", [
    [2, 40, 90, 5000, 5050, 5100, 15000],  # dense (windows double), then sparse, then dense
    list(range(2, 30000, 37)),  # a dot every 37 octets: text
])
def test_line_dot_search_matches_find_wherever_the_line_falls(dots: list[int]) -> None:
    """Brute force over the windows' edges: a line starting with a dot placed at every offset
    of the first 24 KiB (one step per octet near each window boundary) is found exactly where
    a plain find finds it."""
    base = bytearray(b"y" * 30000)
    for d in dots:
        base[d] = ord(".")
    boundaries = [w + shift for w in (_DOT_WINDOW, 2 * _DOT_WINDOW, 3 * _DOT_WINDOW, 6 * _DOT_WINDOW)
                  for shift in (0, 2, 40)]
    edges = {b + k for b in boundaries for k in range(-6, 7)}
    for at in sorted(edges | set(range(0, 24000, 97))):
        buf = bytearray(base)
        buf[at:at + 3] = b"\r\n."
        assert _find_line_dot(buf) == buf.find(b"\r\n."), at
    assert _find_line_dot(base) == base.find(b"\r\n.") == -1


def test_long_message_without_dots_then_stuffed_line_far_in() -> None:
    """A dot-stuffed line 20 KiB into a message whose earlier lines hold dots that do not start
    a line: unstuffed, and the message ends at the real terminator."""
    lines = [b"mid.dot line %d" % i for i in range(200)] + [b"X" * 70] * 200 + [b".starts with a dot", b"last"]
    stuffed = b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in lines)
    s = Session()
    s.feed(EHLO + ENVELOPE + b"DATA\r\n" + stuffed + b".\r\n")
    assert s.body == b"".join(ln + b"\r\n" for ln in lines)
    assert s.codes()[-1] == "250 2.0.0"
