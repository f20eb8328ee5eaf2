"""The sans-IO SMTP server engine (RFC 5321 with PIPELINING, SIZE, 8BITMIME, SMTPUTF8,
ENHANCEDSTATUSCODES, CHUNKING, STARTTLS and AUTH).

The engine never touches a socket, a file or the clock. The I/O layer feeds it bytes with
:meth:`SMTPServerConnection.receive_data`, pulls events with :meth:`next_event`, sends whatever
:meth:`data_to_send` returns, and answers the events that need a policy decision
(:class:`MailFrom`, :class:`RcptTo`, :class:`MessageComplete`, :class:`AuthAttempt`) with
:meth:`respond`. Until a decision is answered the engine stays paused, which is what keeps
pipelined commands answered in order (RFC 2920 §3).

Invariants:

* Only ``<CRLF>.<CRLF>`` ends DATA (RFC 5321 §4.1.1.4). A bare LF or bare CR anywhere in a
  command line or in DATA is refused (the one CR/LF policy of the project lives here), so no
  message can be smuggled inside another.
* DATA is processed in bulk with bytes operations (``find``/``replace``/``count``) over whole
  buffers, never a Python loop per line.
* After STARTTLS the input buffer is discarded and the session restarts (RFC 3207 §4.2).
* Every limit is checked here, from :class:`SessionLimits`.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum, auto

from . import replies as R
from .address import Address, AddressError, parse_path
from .replies import Reply


@dataclass(frozen=True, slots=True)
class SessionLimits:
    """Every limit of an SMTP session, in one place (each configurable under ``[limits]``)."""

    max_message_size: int = 25_000_000  # "25MB", as the config documents it
    max_recipients: int = 100
    # RFC 5321 §4.5.3.1.4 sets 512 octets as the minimum; extensions push lines longer, so we
    # allow 2048 as Postfix's line_length_limit does.
    max_line_length: int = 2048
    max_errors: int = 20
    max_hops: int = 50  # RFC 5321 §6.3: loop detection by counting Received fields


@dataclass(frozen=True, slots=True)
class SessionOptions:
    """What this listener offers: decided by the server, fixed for the engine."""

    hostname: str
    tls_available: bool = False  # STARTTLS can be offered
    tls_active: bool = False  # implicit TLS (port 465) or after STARTTLS
    auth_enabled: bool = False  # submission ports offer AUTH
    auth_requires_tls: bool = True  # RFC 8314 / RFC 4954 §4: no plaintext passwords
    mail_requires_auth: bool = False  # RFC 6409 §4.3: submission requires authentication


# --- events ------------------------------------------------------------------------------
# Each event class writes its own __init__: mypyc compiles that one to C, whereas the __init__
# that @dataclass generates stays a Python function (run by the interpreter for every event,
# about ten times slower). @dataclass still provides __eq__ and __repr__.


@dataclass(slots=True)
class Helo:
    name: str
    extended: bool

    def __init__(self, name: str, extended: bool) -> None:
        self.name = name
        self.extended = extended


@dataclass(slots=True)
class MailFrom:
    """Needs a decision: respond with SENDER_OK or a refusal."""

    address: Address
    size: int | None
    body: str | None
    smtputf8: bool

    def __init__(self, address: Address, size: int | None, body: str | None, smtputf8: bool) -> None:
        self.address = address
        self.size = size
        self.body = body
        self.smtputf8 = smtputf8


@dataclass(slots=True)
class RcptTo:
    """Needs a decision: respond with RECIPIENT_OK or a refusal."""

    address: Address

    def __init__(self, address: Address) -> None:
        self.address = address


@dataclass(slots=True)
class DataStart:
    """The message content begins (after 354 for DATA, with the first BDAT chunk)."""

    chunking: bool

    def __init__(self, chunking: bool) -> None:
        self.chunking = chunking


@dataclass(slots=True)
class DataChunk:
    """Message content: dot-stuffing already removed, CRLF line endings preserved."""

    data: bytes

    def __init__(self, data: bytes) -> None:
        self.data = data


@dataclass(slots=True)
class MessageComplete:
    """Needs a decision: the reply to the final dot or to ``BDAT ... LAST``."""

    size: int
    hops: int
    header_names: frozenset[str]

    def __init__(self, size: int, hops: int, header_names: frozenset[str]) -> None:
        self.size = size
        self.hops = hops
        self.header_names = header_names


@dataclass(slots=True)
class TransactionReset:
    """The current transaction is abandoned (RSET, refused message, new EHLO, STARTTLS)."""

    def __init__(self) -> None:
        pass


@dataclass(slots=True)
class StartTLS:
    """Flush output, run the TLS handshake, then call :meth:`tls_established`."""

    def __init__(self) -> None:
        pass


@dataclass(slots=True)
class AuthAttempt:
    """Needs a decision: respond with AUTH_OK (the user is then authenticated) or AUTH_FAILED."""

    mechanism: str
    authzid: str
    username: str
    password: str = field(repr=False)

    def __init__(self, mechanism: str, authzid: str, username: str, password: str) -> None:
        self.mechanism = mechanism
        self.authzid = authzid
        self.username = username
        self.password = password


@dataclass(slots=True)
class CloseConnection:
    """Flush output and close the connection."""

    reason: str

    def __init__(self, reason: str) -> None:
        self.reason = reason


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()
# The 220 banner and the reply to QUIT, per host name (a server has one or two): made once.
_GREETINGS: dict[str, bytes] = {}
_CLOSINGS: dict[str, Reply] = {}
# The events that wait for the caller's decision (respond()); a tuple built once: an
# ``A | B`` union in an isinstance() call would be built again at each call.
_DECISIONS = (MailFrom, RcptTo, MessageComplete, AuthAttempt)

Event = (
    Helo
    | MailFrom
    | RcptTo
    | DataStart
    | DataChunk
    | MessageComplete
    | TransactionReset
    | StartTLS
    | AuthAttempt
    | CloseConnection
)


class ProtocolError(Exception):
    """The I/O layer used the engine wrongly (a bug, never caused by a peer)."""


class _Phase(Enum):
    COMMAND = auto()  # reading command lines
    DATA = auto()  # reading DATA content up to CRLF.CRLF
    BDAT = auto()  # reading a counted BDAT chunk
    AUTH = auto()  # reading a SASL continuation line
    CLOSED = auto()


_HTTP_VERBS = frozenset({"GET", "POST", "HEAD", "PUT", "DELETE", "CONNECT", "OPTIONS", "PATCH", "TRACE"})
_HTTP_LINE = re.compile(r"^[A-Z]+ \S+ HTTP/\d")
_HEADER_NAME = re.compile(rb"^([!-9;-~]+)[ \t]*:", re.MULTILINE)
_LONG_LINE_FLUSH = 64 * 1024  # emit content of a very long DATA line in pieces this big
_MAX_HEADER_TRACK = 1024 * 1024  # stop tracking header fields after this many octets
_DOT_WINDOW = 4096  # see _find_line_dot


def _has_bare_newline_py(chunk: bytes) -> bool:
    """A CR or LF that is not part of a CRLF (RFC 5321 §2.3.8; SMTP smuggling). Each of CR and
    LF occurs at least as often as CRLF, so they all pair up exactly when their total is
    twice the CRLF count: two scans (the deletion and the count), not three."""
    return len(chunk) - len(chunk.translate(None, b"\r\n")) != 2 * chunk.count(b"\r\n")


_has_bare_newline: Callable[[bytes], bool]
try:  # the same check in one pass of memchr, when setup.py could build it
    from .._scan import bare_newline as _has_bare_newline
except ImportError:
    _has_bare_newline = _has_bare_newline_py


def _take(buf: bytearray, n: int) -> bytes:
    """The first ``n`` octets of ``buf`` as bytes, removed from it. One copy: ``bytes(buf[:n])``
    first copies into a new bytearray, and for a 100 KiB chunk that costs from twice to ten
    times as much, depending on whether glibc gives the heap's top back between the copies
    (``python3 -m bench.micro scan``)."""
    piece = bytes(memoryview(buf)[:n])
    del buf[:n]
    return piece


def _find_line_dot(buf: bytearray) -> int:
    """``buf.find(b"\r\n.")``, fast when dots are few. CPython searches for a 3-octet string
    at about 1.2 GB/s but for one octet with memchr, tens of times faster: so the next dot is
    found with memchr and the 3-octet search runs only over a window that starts at it. Every
    "\r\n." has its dot at or after the one found, so no occurrence is skipped. Where dots
    come close together (text), each window doubles, so a long text costs a few windows
    more than one plain search; where they are far apart, windows stay small."""
    pos, window = 2, _DOT_WINDOW
    while True:
        dot = buf.find(b".", pos)
        if dot < 0:
            return -1
        hit = buf.find(b"\r\n.", dot - 2, dot + window)
        if hit >= 0:
            return hit
        dense = dot - pos < window // 4
        pos = dot + window  # the window covered every "\r\n." whose dot is before this
        window = window * 2 if dense else _DOT_WINDOW


def _is_number(text: str) -> bool:
    """A decimal number of at most 20 ASCII digits (SIZE=, BDAT sizes)."""
    return 0 < len(text) <= 20 and text.isascii() and text.isdigit()


class SMTPServerConnection:
    """One SMTP session, server side. See the module docstring for the contract."""

    def __init__(self, options: SessionOptions, limits: SessionLimits | None = None) -> None:
        self.options = options
        self.limits = limits or SessionLimits()
        self.tls_active = options.tls_active
        self.helo: str | None = None
        self.extended = False
        self.authenticated_as: str | None = None
        self.sender: Address | None = None
        self.smtputf8 = False
        self.body_8bit = False  # RFC 6152: BODY=8BITMIME declared for this transaction
        self.recipients: list[Address] = []
        self.errors = 0
        self._buf = bytearray()
        self._out: list[bytes] = []
        self._events: deque[Event] = deque()
        self._phase = _Phase.COMMAND
        self._pending: Event | None = None
        self._discarding_line = False
        # message content state
        self._bol = True
        self._msg_size = 0
        self._msg_too_big = False
        self._bare_newline = False
        self._cr_pending = False  # BDAT content so far ends with a CR (its LF may come next)
        self._hdr: bytearray | None = None
        self._hops = 0
        self._header_names: frozenset[str] = frozenset()
        self._bdat_remaining = 0
        self._bdat_last = False
        self._bdat_failed: Reply | None = None
        self._bdat_started = False
        self._auth_mech = ""
        self._auth_step = 0
        self._auth_user = ""

    # --- public API --------------------------------------------------------------------

    def greeting(self) -> bytes:
        """The 220 banner (RFC 5321 §4.3.1), made once per host name."""
        host = self.options.hostname
        banner = _GREETINGS.get(host)
        if banner is None:
            banner = _GREETINGS[host] = f"220 {host} ESMTP serpentmail\r\n".encode("ascii", "replace")
        return banner

    def receive_data(self, data: bytes) -> None:
        if self._phase is not _Phase.CLOSED:
            self._buf += data

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    @property
    def buffered(self) -> int:
        """Octets received but not yet processed (the I/O layer pauses reading past a bound)."""
        return len(self._buf)

    @property
    def header_names(self) -> frozenset[str] | None:
        """Lower-cased field names of the message being received, once its header section is
        complete (None before): lets the I/O layer add missing fields as the message streams."""
        return None if self._hdr is not None else self._header_names

    @property
    def in_transaction(self) -> bool:
        return self.sender is not None or self._phase in (_Phase.DATA, _Phase.BDAT)

    @property
    def awaiting_decision(self) -> bool:
        return self._pending is not None

    @property
    def closed(self) -> bool:
        return self._phase is _Phase.CLOSED

    def next_event(self) -> Event | _NeedData:
        """The next event, or NEED_DATA when the engine needs more bytes (or a decision)."""
        while not self._events:
            if self._pending is not None or self._phase is _Phase.CLOSED:
                return NEED_DATA
            if not self._step():
                return NEED_DATA
        ev = self._events.popleft()
        if isinstance(ev, _DECISIONS):
            self._pending = ev
        return ev

    def respond(self, reply: Reply) -> None:
        """Answer the pending decision event with ``reply``."""
        ev = self._pending
        if ev is None:
            raise ProtocolError("respond() called with no decision pending")
        self._pending = None
        match ev:
            case MailFrom():
                if reply.is_positive:
                    self.sender = ev.address
                    self.smtputf8 = ev.smtputf8
                    self.body_8bit = ev.body == "8BITMIME"
            case RcptTo():
                if reply.is_positive:
                    self.recipients.append(ev.address)
            case MessageComplete():
                self._end_transaction()
            case AuthAttempt():
                if reply.code == 235:
                    self.authenticated_as = ev.username
        self._reply(reply)

    def tls_established(self) -> None:
        """The handshake after STARTTLS succeeded: restart the session (RFC 3207 §4.2).

        The plaintext buffer was already discarded when STARTTLS was answered; anything
        buffered since arrived over TLS and is kept.
        """
        self.tls_active = True
        self.helo = None
        self.extended = False
        self._end_transaction()

    def close(self, reply: Reply | None = None) -> None:
        """Close from the I/O side (idle timeout, shutdown): queue ``reply`` and stop."""
        if reply is not None:
            self._out.append(reply.to_bytes())
        self._phase = _Phase.CLOSED

    # --- internals ---------------------------------------------------------------------

    def _reply(self, reply: Reply) -> None:
        self._out.append(reply.to_bytes())
        if reply.code >= 400 and reply.code != 421:
            self.errors += 1
            if self.errors >= self.limits.max_errors and self._phase is not _Phase.CLOSED:
                self._close(R.TOO_MANY_ERRORS, "too many errors")

    def _close(self, reply: Reply, reason: str) -> None:
        self._out.append(reply.to_bytes())
        self._phase = _Phase.CLOSED
        self._events.append(CloseConnection(reason))

    def _end_transaction(self) -> None:
        self.sender = None
        self.smtputf8 = False
        self.body_8bit = False
        self.recipients = []
        self._bdat_started = False
        self._bdat_failed = None
        self._reset_message_state()

    def _reset_message_state(self) -> None:
        self._bol = True
        self._msg_size = 0
        self._msg_too_big = False
        self._bare_newline = False
        self._cr_pending = False
        self._hdr = bytearray()
        self._hops = 0
        self._header_names = frozenset()

    def _abort_transaction(self) -> None:
        if self.sender is not None or self._bdat_started:
            self._events.append(TransactionReset())
        self._end_transaction()

    def _step(self) -> bool:
        """Make progress on the buffer; False when more data is needed."""
        match self._phase:
            case _Phase.COMMAND | _Phase.AUTH:
                return self._step_line()
            case _Phase.DATA:
                return self._step_data()
            case _Phase.BDAT:
                return self._step_bdat()
        return False

    # --- command lines -----------------------------------------------------------------

    def _step_line(self) -> bool:
        buf = self._buf
        lf = buf.find(b"\n")
        if lf < 0:
            if len(buf) > self.limits.max_line_length:
                # RFC 5321 §4.5.3.1.4: too long; discard up to the next line end.
                buf.clear()
                if not self._discarding_line:
                    self._discarding_line = True
                    self._reply(R.LINE_TOO_LONG)
                    if self._phase is _Phase.AUTH:
                        self._phase = _Phase.COMMAND
                return True
            return False
        raw = bytes(buf[:lf + 1])
        del buf[: lf + 1]
        if self._discarding_line:
            self._discarding_line = False
            return True
        refusal: Reply | None = None
        line = ""
        if len(raw) > self.limits.max_line_length:
            refusal = R.LINE_TOO_LONG
        elif not raw.endswith(b"\r\n") or b"\r" in raw[:-2]:
            if self._phase is _Phase.COMMAND and raw.split(b" ", 1)[0].upper().decode("ascii", "replace") in _HTTP_VERBS:
                # An HTTP client (often ending lines in bare LF): close at once, as for CRLF.
                self._close(R.NOT_SMTP, "HTTP request on SMTP port")
                return True
            refusal = R.BARE_LF_COMMAND
        else:
            try:
                line = raw[:-2].decode("utf-8")
            except UnicodeDecodeError:
                refusal = R.SYNTAX_ERROR.with_text("Invalid UTF-8 in command")
            else:
                if "\x00" in line:
                    refusal = R.SYNTAX_ERROR.with_text("NUL in command")
        if refusal is not None:
            self._reply(refusal)
            # A bad line inside a SASL exchange ends the exchange (RFC 4954 §4): the next line
            # is a command again, never read as a password.
            if self._phase is _Phase.AUTH:
                self._phase = _Phase.COMMAND
            return True
        if self._phase is _Phase.AUTH:
            self._auth_continue(line)
        else:
            self._command(line)
        return True

    def _command(self, line: str) -> None:
        verb, _, arg = line.partition(" ")
        verb = verb.upper()
        match verb:
            case "EHLO" | "HELO":
                self._cmd_helo(arg.strip(), extended=verb == "EHLO")
            case "MAIL":
                self._cmd_mail(arg)
            case "RCPT":
                self._cmd_rcpt(arg)
            case "DATA":
                self._cmd_data(arg)
            case "BDAT":
                self._cmd_bdat(arg)
            case "RSET":
                self._abort_transaction()
                self._reply(R.RESET_OK)
            case "NOOP":
                self._reply(R.NOOP_OK)
            case "QUIT":
                host = self.options.hostname
                bye = _CLOSINGS.get(host)
                if bye is None:
                    bye = _CLOSINGS[host] = R.CLOSING.with_text(f"{host} closing connection")
                self._close(bye, "quit")
            case "VRFY":
                # RFC 5321 §3.5.3: 252 when we will not disclose whether a user exists.
                self._reply(R.VRFY_CANNOT if arg.strip() else R.PARAM_SYNTAX)
            case "EXPN":
                self._reply(R.NOT_IMPLEMENTED)
            case "HELP":
                self._reply(R.HELP)
            case "STARTTLS":
                self._cmd_starttls(arg)
            case "AUTH":
                self._cmd_auth(arg)
            case _ if verb in _HTTP_VERBS or _HTTP_LINE.match(line):
                self._close(R.NOT_SMTP, "HTTP request on SMTP port")
            case _:
                self._reply(R.SYNTAX_ERROR)

    def _ehlo_keywords(self) -> list[str]:
        opts = self.options
        kw = [
            "PIPELINING",  # RFC 2920
            f"SIZE {self.limits.max_message_size}",  # RFC 1870
            "8BITMIME",  # RFC 6152
            "SMTPUTF8",  # RFC 6531
            "ENHANCEDSTATUSCODES",  # RFC 2034
            "CHUNKING",  # RFC 3030
        ]
        if opts.tls_available and not self.tls_active:
            kw.append("STARTTLS")  # RFC 3207
        if opts.auth_enabled and self.authenticated_as is None and (self.tls_active or not opts.auth_requires_tls):
            kw.append("AUTH PLAIN LOGIN")  # RFC 4954
        return kw

    def _cmd_helo(self, arg: str, *, extended: bool) -> None:
        if not arg or " " in arg:
            self._reply(R.HELO_REQUIRED_ARG if extended else R.HELO_REQUIRED_ARG.with_text("Syntax: HELO hostname"))
            return
        # RFC 5321 §4.1.4: EHLO/HELO resets any transaction in progress.
        self._abort_transaction()
        self.helo = arg
        self.extended = extended
        self._events.append(Helo(arg, extended))
        if extended:
            self._out.append(R.ehlo_reply(self.options.hostname, f"Hello {arg}", self._ehlo_keywords()))
        else:
            self._reply(R.Reply(250, "", f"{self.options.hostname} Hello {arg}"))

    def _check_ready_for_mail(self) -> Reply | None:
        if self.helo is None:
            return R.NEED_HELO
        opts = self.options
        if opts.mail_requires_auth and self.authenticated_as is None:
            if opts.auth_requires_tls and not self.tls_active:
                return R.MUST_STARTTLS
            return R.AUTH_REQUIRED
        return None

    def _cmd_mail(self, arg: str) -> None:
        refusal = self._check_ready_for_mail()
        if refusal is not None:
            self._reply(refusal)
            return
        if self.sender is not None:
            self._reply(R.NESTED_MAIL)
            return
        if not arg[:5].upper() == "FROM:":
            self._reply(R.PARAM_SYNTAX.with_text("Syntax: MAIL FROM:<address>"))
            return
        try:
            addr, params = parse_path(arg[5:], allow_null=True)
        except AddressError:
            self._reply(R.BAD_SENDER_SYNTAX)
            return
        size: int | None = None
        body: str | None = None
        smtputf8 = False
        for name, value in params.items():
            match name:
                case "SIZE":  # RFC 1870 §6
                    # ASCII digits only: str.isdigit() also accepts superscript and Arabic-Indic digits.
                    if value is None or not _is_number(value):
                        self._reply(R.PARAM_SYNTAX.with_text("Bad SIZE parameter"))
                        return
                    size = int(value)
                case "BODY":  # RFC 6152 §3
                    if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                        self._reply(R.PARAM_SYNTAX.with_text("Unsupported BODY type"))
                        return
                    body = value.upper()
                case "SMTPUTF8":  # RFC 6531 §3.4
                    if value is not None:
                        self._reply(R.PARAM_SYNTAX.with_text("SMTPUTF8 takes no value"))
                        return
                    smtputf8 = True
                case "AUTH" if self.options.auth_enabled:  # RFC 4954 §5: accepted, not trusted
                    pass
                case _:
                    self._reply(R.UNKNOWN_PARAM)
                    return
        if size is not None and size > self.limits.max_message_size:
            self._reply(R.MESSAGE_TOO_BIG)
            return
        if not addr.is_ascii and not smtputf8:
            self._reply(R.SMTPUTF8_REQUIRED)
            return
        self._events.append(MailFrom(addr, size, body, smtputf8))

    def _cmd_rcpt(self, arg: str) -> None:
        if self.sender is None:
            self._reply(R.NEED_MAIL if self.helo is not None else R.NEED_HELO)
            return
        if not arg[:3].upper() == "TO:":
            self._reply(R.PARAM_SYNTAX.with_text("Syntax: RCPT TO:<address>"))
            return
        try:
            addr, params = parse_path(arg[3:], allow_null=False, allow_bare_postmaster=True)
        except AddressError:
            self._reply(R.BAD_RECIPIENT_SYNTAX)
            return
        if params:
            self._reply(R.UNKNOWN_PARAM)
            return
        if not addr.is_ascii and not self.smtputf8:
            self._reply(R.SMTPUTF8_REQUIRED)
            return
        if len(self.recipients) >= self.limits.max_recipients:
            self._reply(R.TOO_MANY_RECIPIENTS)
            return
        self._events.append(RcptTo(addr))

    def _cmd_data(self, arg: str) -> None:
        if arg.strip():
            self._reply(R.PARAM_SYNTAX.with_text("DATA takes no arguments"))
            return
        if self._bdat_started:
            self._reply(R.BAD_SEQUENCE.with_text("DATA not allowed after BDAT"))
            return
        if self.sender is None:
            self._reply(R.NEED_MAIL if self.helo is not None else R.NEED_HELO)
            return
        if not self.recipients:
            # RFC 2920 §3.1: DATA with no valid recipients gets 554.
            self._reply(R.Reply(554, "5.5.1", "No valid recipients"))
            return
        self._reset_message_state()
        self._phase = _Phase.DATA
        self._events.append(DataStart(chunking=False))
        self._out.append(R.START_DATA.to_bytes())

    def _cmd_bdat(self, arg: str) -> None:
        # RFC 3030 §2: BDAT <size> [LAST]; the chunk follows immediately.
        parts = arg.split()
        if not parts or len(parts) > 2 or not _is_number(parts[0]) or (
            len(parts) == 2 and parts[1].upper() != "LAST"
        ):
            # We cannot know how many octets follow, so the session cannot continue safely.
            self._close(R.PARAM_SYNTAX.with_text("Syntax: BDAT size [LAST]; closing connection"), "bad BDAT")
            return
        self._bdat_remaining = int(parts[0])
        self._bdat_last = len(parts) == 2
        self._phase = _Phase.BDAT
        if self._bdat_failed is None:
            if self.sender is None:
                self._bdat_failed = R.NEED_MAIL if self.helo is not None else R.NEED_HELO
            elif not self.recipients:
                self._bdat_failed = R.Reply(554, "5.5.1", "No valid recipients")
            elif not self._bdat_started:
                self._bdat_started = True
                self._reset_message_state()
                self._events.append(DataStart(chunking=True))

    def _cmd_starttls(self, arg: str) -> None:
        if arg.strip():
            self._reply(R.PARAM_SYNTAX.with_text("STARTTLS takes no arguments"))
        elif self.tls_active:
            self._reply(R.ALREADY_TLS)
        elif not self.options.tls_available:
            self._reply(R.TLS_NOT_AVAILABLE)
        else:
            self._out.append(R.READY_TLS.to_bytes())
            # RFC 3207 §4.2 / CVE-2011-0411: pipelined plaintext after STARTTLS is discarded.
            self._buf.clear()
            self._abort_transaction()
            self._events.append(StartTLS())

    # --- AUTH (RFC 4954) ---------------------------------------------------------------

    def _cmd_auth(self, arg: str) -> None:
        opts = self.options
        if not opts.auth_enabled:
            self._reply(R.AUTH_NOT_AVAILABLE)
            return
        if opts.auth_requires_tls and not self.tls_active:
            self._reply(R.MUST_STARTTLS)
            return
        if self.helo is None:
            self._reply(R.NEED_HELO)
            return
        if self.authenticated_as is not None:
            self._reply(R.ALREADY_AUTH)
            return
        if self.sender is not None:
            self._reply(R.BAD_SEQUENCE.with_text("AUTH not permitted during a mail transaction"))
            return
        parts = arg.split()
        if not parts or len(parts) > 2:
            self._reply(R.PARAM_SYNTAX.with_text("Syntax: AUTH mechanism [initial-response]"))
            return
        mech = parts[0].upper()
        initial = parts[1] if len(parts) == 2 else None
        if mech not in ("PLAIN", "LOGIN"):
            self._reply(R.AUTH_MECH_UNKNOWN)
            return
        self._auth_mech = mech
        self._auth_step = 0
        self._auth_user = ""
        if initial is None:
            self._phase = _Phase.AUTH
            # RFC 4954 §4: empty challenge for PLAIN; LOGIN asks "Username:".
            self._out.append(b"334 \r\n" if mech == "PLAIN" else b"334 VXNlcm5hbWU6\r\n")
            return
        self._auth_continue(initial)

    def _auth_continue(self, line: str) -> None:
        self._phase = _Phase.COMMAND
        if line == "*":
            self._reply(R.AUTH_CANCELLED)
            return
        try:
            # RFC 4954 §4: "=" is an empty initial response.
            decoded = b"" if line == "=" else base64.b64decode(line.encode("ascii"), validate=True)
            text = decoded.decode("utf-8")
        except (binascii.Error, UnicodeError, ValueError):
            self._reply(R.AUTH_MALFORMED)
            return
        if self._auth_mech == "PLAIN":
            # RFC 4616 §2: [authzid] NUL authcid NUL passwd
            fields = text.split("\x00")
            if len(fields) != 3 or not fields[1]:
                self._reply(R.AUTH_MALFORMED)
                return
            self._events.append(AuthAttempt("PLAIN", fields[0], fields[1], fields[2]))
            return
        # LOGIN: username, then password, each base64 on its own line.
        if self._auth_step == 0:
            if not text or "\x00" in text:
                self._reply(R.AUTH_MALFORMED)
                return
            self._auth_user = text
            self._auth_step = 1
            self._phase = _Phase.AUTH
            self._out.append(b"334 UGFzc3dvcmQ6\r\n")
            return
        self._events.append(AuthAttempt("LOGIN", "", self._auth_user, text))

    # --- message content -----------------------------------------------------------------

    def _content(self, data: bytes) -> None:
        """Account for and emit a piece of message content (already unstuffed)."""
        if not data:
            return
        self._msg_size += len(data)
        if self._msg_size > self.limits.max_message_size:
            self._msg_too_big = True
        if self._hdr is not None:
            self._track_headers(data)
        if not self._msg_too_big:
            self._events.append(DataChunk(data))

    def _track_headers(self, data: bytes) -> None:
        hdr = self._hdr
        assert hdr is not None
        start = max(0, len(hdr) - 3)
        hdr += data
        if hdr.startswith(b"\r\n"):
            end = 0
        else:
            end = hdr.find(b"\r\n\r\n", start)
            if end < 0 and len(hdr) < _MAX_HEADER_TRACK:
                return
            end = len(hdr) if end < 0 else end + 2
        block = bytes(hdr[:end])
        names = {m.group(1).decode("ascii", "replace").lower() for m in _HEADER_NAME.finditer(block)}
        self._header_names = frozenset(names)
        self._hops = block.lower().count(b"\nreceived:") + (1 if block[:9].lower() == b"received:" else 0)
        self._hdr = None

    def _finish_message(self) -> None:
        if self._hdr is not None:  # header section never ended: the whole message is headers
            self._track_headers(b"\r\n\r\n")
        self._phase = _Phase.COMMAND
        refusal: Reply | None = None
        if self._msg_too_big:
            refusal = R.MESSAGE_TOO_BIG
        elif self._bare_newline:
            refusal = R.BARE_LF_DATA
        elif self._hops > self.limits.max_hops:
            refusal = R.TOO_MANY_HOPS
        if refusal is not None:
            self._abort_transaction()
            self._reply(refusal)
            return
        self._events.append(MessageComplete(self._msg_size, self._hops, self._header_names))

    def _step_data(self) -> bool:
        buf = self._buf
        n = len(buf)
        if n == 0:
            return False
        if self._bol:
            # The terminator may sit at the very start of the buffer.
            if buf[:3] == b".\r\n":
                del buf[:3]
                self._finish_message()
                return True
            if n < 3 and b".\r\n".startswith(bytes(buf)):
                return False
        # One scan finds both the terminator and any line that starts with a dot: in most
        # messages the first "\r\n." is the terminator itself, and then nothing before it
        # needs unstuffing (a second scan of a 100 KiB message costs about 80 us).
        first = _find_line_dot(buf)
        if first < 0:
            end, stuffed = -1, False
        elif buf[first + 3:first + 5] == b"\r\n":
            end, stuffed = first, False
        else:
            end, stuffed = buf.find(b"\r\n.\r\n", first), True
        if end >= 0:
            self._emit_lines(_take(buf, end + 2), stuffed)
            del buf[:3]
            self._finish_message()
            return True
        cut = buf.rfind(b"\r\n")
        if cut >= 0:
            self._emit_lines(_take(buf, cut + 2), stuffed)
            self._bol = True
            return True
        if n > _LONG_LINE_FLUSH:
            # A very long line: emit all but the last octet (which may be the CR of a CRLF).
            piece = _take(buf, n - 1)
            if self._bol and piece[:1] == b".":
                piece = piece[1:]
            self._check_newlines(piece)
            self._content(piece)
            self._bol = False
            return True
        return False

    def _emit_lines(self, chunk: bytes, stuffed: bool = True) -> None:
        """Emit complete lines (``chunk`` ends with CRLF), undoing dot-stuffing (§4.5.2).
        ``stuffed`` False: the caller's scan saw no CRLF followed by a dot in ``chunk``."""
        self._check_newlines(chunk)
        if self._bol and chunk[:1] == b".":
            chunk = chunk[1:]
        if stuffed and b"\r\n." in chunk:
            chunk = chunk.replace(b"\r\n.", b"\r\n")
        self._content(chunk)

    def _check_newlines(self, chunk: bytes) -> None:
        """Note a CR or LF that is not part of a CRLF (RFC 5321 §2.3.8; SMTP smuggling)."""
        if not self._bare_newline and _has_bare_newline(chunk):
            self._bare_newline = True

    def _check_chunk_newlines(self, piece: bytes) -> None:
        """:meth:`_check_newlines` for BDAT content, which arrives cut anywhere (a CRLF may
        straddle two chunks). Without BINARYMIME, which is not offered, BDAT content is lines
        like DATA's (RFC 3030 §3), and refusing a bare CR or LF here too means no message we
        relay can carry one to a server that reads it as the end of the data."""
        if self._bare_newline or not piece:
            return
        if self._cr_pending:
            if piece[:1] != b"\n":
                self._bare_newline = True
                return
            piece = piece[1:]
        self._cr_pending = piece.endswith(b"\r")
        self._check_newlines(piece[:-1] if self._cr_pending else piece)

    def _step_bdat(self) -> bool:
        buf = self._buf
        if self._bdat_remaining:
            if not buf:
                return False
            take = min(self._bdat_remaining, len(buf))
            piece = _take(buf, take)
            self._bdat_remaining -= take
            if self._bdat_failed is None:
                self._check_chunk_newlines(piece)
                self._content(piece)
            if self._bdat_remaining:
                return True
        # chunk fully read (RFC 3030 §2: reply after the whole chunk)
        self._phase = _Phase.COMMAND
        if self._bdat_failed is not None:
            failed = self._bdat_failed
            # With no transaction (no MAIL yet) there is nothing to fail: only this chunk is
            # refused, so a later MAIL ... BDAT starts clean.
            if self._bdat_last or self.sender is None:
                self._bdat_failed = None
                self._abort_transaction()
            self._reply(failed)
            return True
        if self._bdat_last:
            if self._cr_pending:  # the message's last octet is a CR
                self._bare_newline = True
            self._finish_message()
        elif self._msg_too_big:
            # RFC 3030 §2: a failed chunk fails the transaction; later chunks get the same reply.
            self._bdat_failed = R.MESSAGE_TOO_BIG
            self._reply(R.MESSAGE_TOO_BIG)
        else:
            self._reply(R.BDAT_CHUNK_OK.with_text(f"{self._msg_size} octets received"))
        return True
