"""The sans-IO POP3 engine: table-driven sessions over every state and error path, exact
bytes for RETR/TOP framing, and a Hypothesis test that no input raises out of the engine."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serpentmail.proto import pop3 as P
from serpentmail.proto.pop3 import (
    NEED_DATA,
    CloseConnection,
    LoginAttempt,
    POP3Limits,
    POP3Options,
    POP3ServerConnection,
    ProtocolError,
    Retrieve,
    StartTLS,
    State,
    Update,
    stuff,
    valid_login_name,
)

MESSAGES = [
    b"Subject: one\r\n\r\nbody line\r\n.starts with a dot\r\n..two dots\r\n.\r\nend\r\n",
    b"Subject: two\r\nX-A: b\r\n\r\nl1\r\nl2\r\nl3\r\n",
    b"Subject: three, no body, no final CRLF",
]
LISTING = [(len(m), f"uid{i + 1}") for i, m in enumerate(MESSAGES)]
USER, PASSWORD = "bill@winview.test", "pw word"


@dataclass
class Harness:
    """Drives an engine with a scripted I/O layer and records what it saw."""

    options: POP3Options = field(default_factory=lambda: POP3Options("pop.test", plaintext_auth_ok=True))
    limits: POP3Limits = field(default_factory=POP3Limits)
    chunk: int = 1 << 20
    in_use: bool = False
    engine: POP3ServerConnection = field(init=False)
    logins: list[LoginAttempt] = field(default_factory=list)
    updates: list[tuple[int, ...]] = field(default_factory=list)
    closed_reason: str | None = None
    tls_starts: int = 0

    def __post_init__(self) -> None:
        self.engine = POP3ServerConnection(self.options, self.limits)

    def feed(self, data: bytes) -> bytes:
        e = self.engine
        e.receive_data(data)
        while True:
            ev = e.next_event()
            if ev is NEED_DATA:
                break
            match ev:
                case LoginAttempt():
                    self.logins.append(ev)
                    if ev.username == USER and ev.password == PASSWORD:
                        if self.in_use:
                            e.reject_login(P.IN_USE, counts_as_failure=False)
                        else:
                            e.accept_login(LISTING)
                    else:
                        e.reject_login(P.AUTH_FAILED)
                case Retrieve():
                    data_ = MESSAGES[ev.index]
                    e.begin_transfer()
                    for i in range(0, len(data_), self.chunk):
                        if not e.transfer_data(data_[i:i + self.chunk]):
                            break
                    e.end_transfer()
                case Update():
                    self.updates.append(ev.deleted)
                    e.update_done(P.UPDATED)
                case StartTLS():
                    self.tls_starts += 1
                    e.tls_established()
                case CloseConnection():
                    self.closed_reason = ev.reason
        return e.data_to_send()

    def lines(self, *commands: str) -> list[str]:
        """Status lines (+OK / -ERR / SASL "+ ") produced by ``commands`` sent pipelined."""
        out = self.feed("".join(c + "\r\n" for c in commands).encode())
        return status_lines(out)


def status_lines(out: bytes) -> list[str]:
    text = out.decode("utf-8", "replace")
    return [ln for ln in text.split("\r\n") if ln.startswith(("+OK", "-ERR", "+ "))]


LOGIN = ("USER " + USER, "PASS " + PASSWORD)
PLAIN_OK = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
PLAIN_BAD = base64.b64encode(f"\0{USER}\0nope".encode()).decode()
PLAIN_OTHER_AUTHZ = base64.b64encode(f"eve@winview.test\0{USER}\0{PASSWORD}".encode()).decode()

# (id, commands, expected status-line prefixes in order)
CASES: list[tuple[str, tuple[str, ...], list[str]]] = [
    ("user-pass-ok", LOGIN, ["+OK send PASS", "+OK Logged in, maildrop has 3 messages (141 octets)"]),
    ("wrong-password", ("USER " + USER, "PASS nope"), ["+OK send PASS", "-ERR [AUTH] Authentication failed"]),
    ("unknown-user-same-reply", ("USER who@winview.test", "PASS x"), ["+OK send PASS", "-ERR [AUTH] Authentication failed"]),
    ("pass-without-user", ("PASS " + PASSWORD,), ["-ERR Send USER first"]),
    ("user-needed-again-after-failure", ("USER " + USER, "PASS nope", "PASS " + PASSWORD),
     ["+OK", "-ERR [AUTH]", "-ERR Send USER first"]),
    ("user-no-arg", ("USER",), ["-ERR Syntax error"]),
    ("slash-in-name", ("USER ../../etc@x.test",), ["-ERR [AUTH] Invalid login name"]),
    ("dotdot-in-name", ("USER a..b@x.test",), ["-ERR [AUTH] Invalid login name"]),
    ("backslash-in-name", ("USER a\\b@x.test",), ["-ERR [AUTH] Invalid login name"]),
    ("control-in-name", ("USER a\x01b@x.test",), ["-ERR [AUTH] Invalid login name"]),
    ("name-too-long", ("USER " + "a" * 314 + "@x.test",), ["-ERR [AUTH] Invalid login name"]),
    ("transaction-cmd-before-login", ("STAT", "LIST", "RETR 1", "DELE 1", "NOOP", "RSET", "UIDL", "TOP 1 1"),
     ["-ERR Command not valid in this state"] * 8),
    ("unknown-command", ("FOO",), ["-ERR Unknown command"]),
    ("apop-refused", ("APOP bill@winview.test 0123",), ["-ERR APOP is not supported"]),
    ("quit-in-authorization", ("QUIT",), ["+OK serpentmail POP3 server signing off"]),
    ("capa-before-login", ("CAPA",), ["+OK Capability list follows"]),
    ("auth-plain-initial", ("AUTH PLAIN " + PLAIN_OK,), ["+OK Logged in"]),
    ("auth-plain-continuation", ("AUTH PLAIN", PLAIN_OK), ["+ ", "+OK Logged in"]),
    ("auth-plain-cancel", ("AUTH PLAIN", "*"), ["+ ", "-ERR Authentication cancelled"]),
    ("auth-plain-bad-password", ("AUTH PLAIN " + PLAIN_BAD,), ["-ERR [AUTH] Authentication failed"]),
    ("auth-plain-bad-base64", ("AUTH PLAIN !!!",), ["-ERR Malformed SASL response"]),
    ("auth-plain-empty", ("AUTH PLAIN =",), ["-ERR Malformed SASL response"]),
    ("auth-plain-other-authzid", ("AUTH PLAIN " + PLAIN_OTHER_AUTHZ,), ["-ERR [AUTH] Authentication failed"]),
    ("auth-unknown-mech", ("AUTH CRAM-MD5",), ["-ERR Unsupported SASL mechanism"]),
    ("auth-bare-lists", ("AUTH",), ["+OK Supported SASL mechanisms follow"]),
    ("stls-unavailable", ("STLS",), ["-ERR STLS not available"]),
    ("stat", (*LOGIN, "STAT"), ["+OK", "+OK", "+OK 3 141"]),
    ("list-all", (*LOGIN, "LIST"), ["+OK", "+OK", "+OK 3 messages (141 octets)"]),
    ("list-one", (*LOGIN, "LIST 2"), ["+OK", "+OK", "+OK 2 36"]),
    ("list-out-of-range", (*LOGIN, "LIST 4", "LIST 0"), ["+OK", "+OK", "-ERR No such message", "-ERR No such message"]),
    ("list-bad-arg", (*LOGIN, "LIST x", "LIST -1", "LIST 99999999999"), ["+OK", "+OK", "-ERR Syntax", "-ERR Syntax", "-ERR Syntax"]),
    ("uidl-one", (*LOGIN, "UIDL 3"), ["+OK", "+OK", "+OK 3 uid3"]),
    ("dele-then-touch", (*LOGIN, "DELE 1", "DELE 1", "RETR 1", "LIST 1", "TOP 1 0", "UIDL 1", "STAT"),
     ["+OK", "+OK", "+OK message 1 deleted", "-ERR Message already deleted", "-ERR Message already deleted",
      "-ERR Message already deleted", "-ERR Message already deleted", "-ERR Message already deleted", "+OK 2 "]),
    ("rset-unmarks", (*LOGIN, "DELE 1", "DELE 2", "RSET", "STAT"),
     ["+OK", "+OK", "+OK", "+OK", "+OK maildrop has 3 messages (141 octets)", "+OK 3 141"]),
    ("noop", (*LOGIN, "NOOP", "NOOP x"), ["+OK", "+OK", "+OK", "-ERR Syntax"]),
    ("top-bad-args", (*LOGIN, "TOP 1", "TOP 1 x", "TOP 1 -1"), ["+OK", "+OK", "-ERR Syntax", "-ERR Syntax", "-ERR Syntax"]),
    ("auth-cmds-after-login", (*LOGIN, "USER x@y.test", "PASS x", "AUTH PLAIN", "STLS"),
     ["+OK", "+OK"] + ["-ERR Command not valid in this state"] * 4),
    ("lowercase-commands", ("user " + USER, "pass " + PASSWORD, "stat"), ["+OK", "+OK", "+OK 3 141"]),
]


@pytest.mark.parametrize(("commands", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_session_table(commands: tuple[str, ...], expected: list[str]) -> None:
    h = Harness()
    got = h.lines(*commands)
    assert len(got) == len(expected), got
    for line, prefix in zip(got, expected, strict=True):
        assert line.startswith(prefix), (line, prefix)


def test_invalid_login_names_never_reach_the_io_layer() -> None:
    h = Harness()
    h.lines("USER a/b@x.test", "USER a..b@x.test")
    bad_plain = base64.b64encode(b"\0../x@y.test\0pw").decode()
    h.lines("AUTH PLAIN " + bad_plain)
    assert h.logins == []
    # three refusals are three failures: the session is closed
    assert h.engine.closed and h.closed_reason == "too many authentication failures"


def test_valid_login_name_rules() -> None:
    assert valid_login_name("bill@winview.test")
    assert valid_login_name("a" * 310 + "@x.test")  # 317 octets
    assert not valid_login_name("")
    assert not valid_login_name("é" * 161)  # 322 octets in UTF-8
    assert not valid_login_name("a\x7fb@x.test")
    assert not valid_login_name("a\tb@x.test")


def test_three_failures_close_the_connection() -> None:
    h = Harness()
    got = h.lines("USER " + USER, "PASS a", "USER " + USER, "PASS b", "USER " + USER, "PASS c", "STAT")
    assert got == ["+OK send PASS", "-ERR [AUTH] Authentication failed"] * 3 + [
        "-ERR [AUTH] Too many failed logins, closing connection"]
    assert h.engine.closed and h.closed_reason == "too many authentication failures"
    assert len(h.logins) == 3


def test_in_use_is_reported_and_does_not_count_as_a_failure() -> None:
    h = Harness(in_use=True)
    got = h.lines(*LOGIN, *LOGIN, *LOGIN, *LOGIN)
    assert got == ["+OK send PASS", "-ERR [IN-USE] Mailbox is locked by another POP3 session"] * 4
    assert not h.engine.closed
    assert h.engine.state is State.AUTHORIZATION


def test_plaintext_refused_before_tls_then_allowed_after_stls() -> None:
    h = Harness(options=POP3Options("pop.test", tls_available=True))
    capa = h.feed(b"CAPA\r\n").decode()
    assert "STLS\r\n" in capa and "USER\r\n" not in capa and "SASL" not in capa
    got = h.lines("USER " + USER, "PASS " + PASSWORD, "AUTH PLAIN " + PLAIN_OK)
    assert got[0] == ("-ERR [AUTH] Plaintext authentication is not allowed on an unencrypted connection; "
                      "issue STLS first or use the POP3S port")
    assert got[1] == got[0] and got[2] == got[0]
    assert h.logins == []
    # STLS: the pipelined plaintext after it is discarded (RFC 2595 §4)
    out = h.feed(b"STLS\r\nUSER " + USER.encode() + b"\r\n")
    assert out == b"+OK Begin TLS negotiation\r\n"
    assert h.tls_starts == 1 and h.engine.buffered == 0
    capa = h.feed(b"CAPA\r\n").decode()
    assert "STLS" not in capa and "USER\r\n" in capa and "SASL PLAIN\r\n" in capa
    assert h.lines(*LOGIN)[-1].startswith("+OK Logged in")
    assert h.lines("STLS")[0] == "-ERR Command not valid in this state"


def test_stls_twice_is_refused() -> None:
    h = Harness(options=POP3Options("pop.test", tls_available=True))
    h.feed(b"STLS\r\n")
    assert h.lines("STLS") == ["-ERR TLS already active"]


def test_implicit_tls_allows_login_and_offers_no_stls() -> None:
    h = Harness(options=POP3Options("pop.test", tls_available=False, tls_active=True))
    capa = h.feed(b"CAPA\r\n").decode()
    assert "STLS" not in capa and "USER\r\n" in capa
    assert h.lines(*LOGIN)[-1].startswith("+OK Logged in")


def test_capa_exact_and_in_transaction() -> None:
    h = Harness(options=POP3Options("pop.test", tls_available=True, plaintext_auth_ok=True))
    assert h.feed(b"CAPA\r\n") == (
        b"+OK Capability list follows\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\nAUTH-RESP-CODE\r\n"
        b"USER\r\nSASL PLAIN\r\nSTLS\r\nIMPLEMENTATION serpentmail\r\n.\r\n")
    h.lines(*LOGIN)
    assert h.feed(b"CAPA\r\n") == (
        b"+OK Capability list follows\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\nAUTH-RESP-CODE\r\n"
        b"IMPLEMENTATION serpentmail\r\n.\r\n")


def test_list_and_uidl_multiline_exact() -> None:
    h = Harness()
    h.lines(*LOGIN, "DELE 2")
    assert h.feed(b"LIST\r\n") == b"+OK 2 messages (105 octets)\r\n1 67\r\n3 38\r\n.\r\n"
    assert h.feed(b"UIDL\r\n") == b"+OK unique-id listing follows\r\n1 uid1\r\n3 uid3\r\n.\r\n"


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 1 << 20])
def test_retr_byte_stuffs_and_terminates(chunk: int) -> None:
    h = Harness(chunk=chunk)
    h.lines(*LOGIN)
    assert h.feed(b"RETR 1\r\n") == (
        b"+OK 67 octets\r\nSubject: one\r\n\r\nbody line\r\n..starts with a dot\r\n...two dots\r\n"
        b"..\r\nend\r\n.\r\n")
    # no final CRLF in the stored message: the terminator adds one (RFC 1939 §3)
    assert h.feed(b"RETR 3\r\n") == b"+OK 38 octets\r\nSubject: three, no body, no final CRLF\r\n.\r\n"


def test_retr_of_message_starting_with_dot() -> None:
    assert stuff(b".x\r\n.y\r\nz.\r\n", bol=True) == b"..x\r\n..y\r\nz.\r\n"
    assert stuff(b".x", bol=False) == b".x"


def _reference_stuff(piece: bytes, bol: bool) -> bytes:
    """RFC 1939 §3 by the letter: a line that starts with "." gets one more."""
    lines = piece.split(b"\n")
    return b"\n".join(b"." + line if line[:1] == b"." and (i > 0 or bol) else line
                      for i, line in enumerate(lines))


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.sampled_from([b".", b"\n", b"\r\n", b"x", b"..", b"\n.", b"a.b"]), max_size=80).map(b"".join),
       st.booleans())
def test_stuff_matches_the_rfc_definition(piece: bytes, bol: bool) -> None:
    """Whether the dot walk proves "nothing to stuff", finds a line to stuff, or runs out of
    budget on dotty text, the result is RFC 1939 §3 byte-stuffing."""
    assert stuff(piece, bol) == _reference_stuff(piece, bol)


@pytest.mark.parametrize("shift", range(-3, 4))
@pytest.mark.parametrize("window", [1, 3])  # the line-start dot in the first or a later window
def test_stuff_finds_a_line_start_dot_at_and_past_the_dense_window_edges(shift: int, window: int) -> None:
    from serpentmail.proto.pop3 import _DENSE_WINDOW, _DOT_SLACK

    dense = b"a.b" * 40  # dotty enough to switch to window searches at once
    trigger = 1 + 3 * _DOT_SLACK  # the dot that starts the first window (32 KiB, then 64 KiB)
    edge = trigger + _DENSE_WINDOW * window + shift  # where "\n." goes: around a window's end
    filler = bytearray(dense + b"x" * (edge + 10))
    filler[edge:edge + 2] = b"\n."
    piece = bytes(filler)
    assert stuff(piece, False) == _reference_stuff(piece, False)
    assert stuff(piece, False) != piece


def test_stuff_with_many_dots_before_the_first_line_start_dot() -> None:
    piece = b"a.b." * 100 + b"\r\n.x\r\n"  # more dots than the walk's budget, then one to stuff
    assert stuff(piece, True) == b"a.b." * 100 + b"\r\n..x\r\n"
    assert stuff(b"x.y" * 100, False) == b"x.y" * 100


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 1 << 20])
@pytest.mark.parametrize(("cmd", "expected"), [
    ("TOP 2 0", b"+OK top of message follows\r\nSubject: two\r\nX-A: b\r\n\r\n.\r\n"),
    ("TOP 2 2", b"+OK top of message follows\r\nSubject: two\r\nX-A: b\r\n\r\nl1\r\nl2\r\n.\r\n"),
    ("TOP 2 999999", b"+OK top of message follows\r\nSubject: two\r\nX-A: b\r\n\r\nl1\r\nl2\r\nl3\r\n.\r\n"),
    ("TOP 1 2", b"+OK top of message follows\r\nSubject: one\r\n\r\nbody line\r\n..starts with a dot\r\n.\r\n"),
    ("TOP 3 5", b"+OK top of message follows\r\nSubject: three, no body, no final CRLF\r\n.\r\n"),
])
def test_top(chunk: int, cmd: str, expected: bytes) -> None:
    h = Harness(chunk=chunk)
    h.lines(*LOGIN)
    assert h.feed(cmd.encode() + b"\r\n") == expected


def test_top_of_message_with_empty_header_section() -> None:
    e = POP3ServerConnection(POP3Options("t", plaintext_auth_ok=True))
    e.receive_data(b"USER " + USER.encode() + b"\r\nPASS x\r\nTOP 1 1\r\n")
    ev = e.next_event()
    assert isinstance(ev, LoginAttempt)
    e.accept_login([(20, "u")])
    ev = e.next_event()
    assert isinstance(ev, Retrieve) and ev.lines == 1
    e.begin_transfer()
    assert e.transfer_data(b"\r\nfirst\r\nsecond\r\n") is False
    e.end_transfer()
    assert e.data_to_send().endswith(b"+OK top of message follows\r\n\r\nfirst\r\n.\r\n")


def test_quit_from_transaction_emits_update_with_marked_messages() -> None:
    h = Harness()
    got = h.lines(*LOGIN, "DELE 3", "DELE 1", "QUIT", "STAT")
    assert got[-1] == "+OK serpentmail POP3 server signing off"
    assert h.updates == [(0, 2)]
    assert h.engine.closed and h.closed_reason == "quit"


def test_update_failure_is_reported_with_sys_temp() -> None:
    e = POP3ServerConnection(POP3Options("t", plaintext_auth_ok=True))
    e.receive_data(b"USER a@b.test\r\nPASS x\r\nDELE 1\r\nQUIT\r\n")
    assert isinstance(e.next_event(), LoginAttempt)
    e.accept_login([(1, "u")])
    ev = e.next_event()
    assert isinstance(ev, Update) and ev.deleted == (0,)
    e.update_done(P.UPDATE_FAILED)
    assert e.data_to_send().endswith(b"-ERR [SYS/TEMP] Some deleted messages were not removed; please try again later\r\n")
    assert isinstance(e.next_event(), CloseConnection)


def test_retrieve_failure_reply() -> None:
    e = POP3ServerConnection(POP3Options("t", plaintext_auth_ok=True))
    e.receive_data(b"USER a@b.test\r\nPASS x\r\nRETR 1\r\nNOOP\r\n")
    assert isinstance(e.next_event(), LoginAttempt)
    e.accept_login([(1, "u")])
    assert isinstance(e.next_event(), Retrieve)
    assert e.next_event() is NEED_DATA  # paused: NOOP waits for the RETR answer
    e.fail_retrieve(P.SYS_TEMP)
    assert e.next_event() is NEED_DATA
    assert status_lines(e.data_to_send())[-2:] == ["-ERR [SYS/TEMP] Temporary system problem, please try again later", "+OK"]


def test_pipelined_commands_answered_in_order() -> None:
    h = Harness()
    out = h.feed(f"USER {USER}\r\nPASS {PASSWORD}\r\nSTAT\r\nRETR 2\r\nUIDL 2\r\nTOP 2 1\r\nLIST 2\r\n".encode())
    assert out == (
        b"+OK send PASS\r\n+OK Logged in, maildrop has 3 messages (141 octets)\r\n+OK 3 141\r\n"
        b"+OK 36 octets\r\n" + MESSAGES[1] + b".\r\n+OK 2 uid2\r\n"
        b"+OK top of message follows\r\nSubject: two\r\nX-A: b\r\n\r\nl1\r\n.\r\n+OK 2 36\r\n")


def test_split_command_bytes_and_bare_lf() -> None:
    h = Harness()
    assert h.feed(b"NO") == b""
    assert h.feed(b"OP\r") == b""
    assert h.feed(b"\n") == b"-ERR Command not valid in this state\r\n"
    assert h.feed(b"CAPA\n").startswith(b"+OK Capability")


def test_line_too_long_then_session_continues() -> None:
    h = Harness(limits=POP3Limits(max_line_length=64))
    assert h.feed(b"USER " + b"a" * 100) == b"-ERR Command line too long\r\n"
    assert h.feed(b"a" * 100) == b""
    assert h.feed(b"\r\nQUIT\r\n") == b"+OK serpentmail POP3 server signing off\r\n"
    h2 = Harness(limits=POP3Limits(max_line_length=64))
    assert h2.feed(b"X" * 70 + b"\r\nQUIT\r\n") == b"-ERR Command line too long\r\n+OK serpentmail POP3 server signing off\r\n"


def test_invalid_utf8_and_nul() -> None:
    h = Harness()
    assert status_lines(h.feed(b"USER \xff\xfe\r\nUSER a\x00b\r\n")) == ["-ERR Invalid characters in command"] * 2


def test_error_limit_closes() -> None:
    h = Harness(limits=POP3Limits(max_errors=3))
    got = h.lines("A", "B", "C", "D")
    assert got == ["-ERR Unknown command"] * 3 + ["-ERR Too many errors, closing connection"]
    assert h.engine.closed and h.closed_reason == "too many errors"
    assert h.feed(b"CAPA\r\n") == b""


def test_close_from_io_side_applies_nothing() -> None:
    h = Harness()
    h.lines(*LOGIN, "DELE 1")
    h.engine.close(P.IDLE_TIMEOUT)
    assert h.engine.data_to_send() == b"-ERR Disconnected for inactivity\r\n"
    assert h.feed(b"QUIT\r\n") == b""
    assert h.updates == []


def test_misuse_raises_protocol_error() -> None:
    e = POP3ServerConnection(POP3Options("t"))
    with pytest.raises(ProtocolError):
        e.accept_login([])
    with pytest.raises(ProtocolError):
        e.begin_transfer()
    with pytest.raises(ProtocolError):
        e.transfer_data(b"x")
    with pytest.raises(ProtocolError):
        e.update_done(P.UPDATED)


def test_reply_text_cannot_inject_lines() -> None:
    assert P.POP3Reply(False, "a\r\nb", "SYS/TEMP").to_bytes() == b"-ERR [SYS/TEMP] a  b\r\n"


_COMMANDS = st.sampled_from([
    "USER " + USER, "PASS " + PASSWORD, "PASS x", "USER", "AUTH PLAIN", "AUTH PLAIN " + PLAIN_OK, "AUTH", "*",
    PLAIN_OK, "STLS", "CAPA", "STAT", "LIST", "LIST 1", "LIST 9", "UIDL", "UIDL 2", "RETR 1", "RETR 2", "RETR 3",
    "TOP 1 0", "TOP 2 1", "TOP 3 9", "DELE 1", "DELE 2", "RSET", "NOOP", "QUIT", "APOP x y", "", " ", "LIST 0",
])
_CHUNKS = st.lists(st.one_of(
    st.binary(max_size=64),
    _COMMANDS.map(lambda c: c.encode() + b"\r\n"),
    st.text(max_size=20).map(lambda t: t.encode("utf-8", "surrogatepass") + b"\r\n"),
), max_size=30)


@settings(max_examples=300, deadline=None)
@given(chunks=_CHUNKS, tls=st.booleans(), plaintext=st.booleans(), chunk=st.integers(1, 50),
       in_use=st.booleans())
def test_arbitrary_input_only_produces_replies(chunks: list[bytes], tls: bool, plaintext: bool, chunk: int,
                                               in_use: bool) -> None:
    h = Harness(options=POP3Options("t", tls_available=tls, plaintext_auth_ok=plaintext),
                limits=POP3Limits(max_line_length=128), chunk=chunk, in_use=in_use)
    out = b"".join(h.feed(c) for c in chunks)
    for line in status_lines(out):
        assert line.startswith(("+OK", "-ERR", "+ "))
    if h.engine.closed:
        assert h.feed(b"STAT\r\n") == b""
    assert not h.engine.awaiting_decision
