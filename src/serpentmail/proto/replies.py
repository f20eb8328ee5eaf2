"""SMTP replies as typed values.

Every reply the server sends is a :class:`Reply` constant (or one derived from a constant with
:meth:`Reply.with_text`), so reply codes live in one module next to the RFC section that defines
them. Every reply carries an enhanced status code (RFC 2034, RFC 3463).

Invariant: reply text never contains CR or LF supplied by a peer; multi-line replies are built
from a tuple of lines, each sent as ``code-enhanced text`` except the last (RFC 5321 §4.2.1).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply: a three-digit code, an enhanced status code and human text."""

    code: int
    enhanced: str
    text: str
    # The wire form, rendered when the reply is made: most replies are constants sent again
    # and again. (Not an lru_cache keyed by the reply: that calls the dataclass's generated
    # __hash__, a Python function, for each reply sent.)
    wire: bytes = field(init=False, repr=False, compare=False, hash=False)

    # Its own __init__, not the one @dataclass would generate: mypyc compiles this one to C,
    # the generated one stays a Python function.
    def __init__(self, code: int, enhanced: str, text: str) -> None:
        object.__setattr__(self, "code", code)
        object.__setattr__(self, "enhanced", enhanced)
        object.__setattr__(self, "text", text)
        object.__setattr__(self, "wire", _render(self))

    # The reply-code classes of RFC 5321 §4.2.1 (smtp_client.ServerReply has the same three;
    # a shared base class declaring ``code`` would not compile with mypyc, see setup.py).
    @property
    def is_positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def with_text(self, text: str) -> Reply:
        return Reply(self.code, self.enhanced, text)

    def to_bytes(self) -> bytes:
        """The wire form (rendered once, when the reply was made)."""
        return self.wire

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}".strip()


def _render(reply: Reply) -> bytes:
    # RFC 5321 §4.2.1: continuation lines use "code-", the last line "code ".
    # RFC 2034 §4: the enhanced code follows the reply code on every line.
    lines = _clean(reply.text).split("\n")
    enhanced = f"{reply.enhanced} " if reply.enhanced else ""
    out = []
    for i, line in enumerate(lines):
        sep = " " if i == len(lines) - 1 else "-"
        out.append(f"{reply.code}{sep}{enhanced}{line}".rstrip())
    return ("\r\n".join(out) + "\r\n").encode("utf-8", "replace")


def _clean(text: str) -> str:
    """Keep reply text printable: no CR, no NUL, lines split only on LF we put there."""
    if text.isascii() and text.isprintable():  # the usual case: nothing to remove
        return text
    return "".join(ch for ch in text.replace("\r", "") if ch == "\n" or ch >= " ")


def ehlo_reply(hostname: str, greeting: str, keywords: list[str]) -> bytes:
    """The multi-line EHLO reply (RFC 5321 §4.1.1.1); extension lines carry no enhanced code."""
    lines = [f"{hostname} {greeting}", *keywords]
    out = [f"250-{line}" for line in lines[:-1]] + [f"250 {lines[-1]}"]
    return ("\r\n".join(out) + "\r\n").encode("ascii", "replace")


# --- 2xx -----------------------------------------------------------------------------------
# RFC 5321 §4.2.3 and RFC 3463 §3: x.0.0 for generic success.
GREETING = Reply(220, "", "ESMTP serpentmail ready")  # §4.2: 220 greeting has no enhanced code
CLOSING = Reply(221, "2.0.0", "Bye")
OK = Reply(250, "2.0.0", "OK")
SENDER_OK = Reply(250, "2.1.0", "Sender OK")  # RFC 3463 §3.2: X.1.0 other address status
RECIPIENT_OK = Reply(250, "2.1.5", "Recipient OK")  # RFC 3463: X.1.5 destination valid
QUEUED = Reply(250, "2.0.0", "OK: queued")
RESET_OK = Reply(250, "2.0.0", "Reset state")
NOOP_OK = Reply(250, "2.0.0", "OK")
VRFY_CANNOT = Reply(252, "2.5.2", "Cannot VRFY user, but will accept message and attempt delivery")
HELP = Reply(214, "2.0.0", "See RFC 5321; commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP STARTTLS AUTH")
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")  # RFC 4954 §6
READY_TLS = Reply(220, "2.0.0", "Ready to start TLS")  # RFC 3207 §4
START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")  # §4.2: 354 is intermediate
BDAT_CHUNK_OK = Reply(250, "2.0.0", "Chunk accepted")

# --- 4xx -----------------------------------------------------------------------------------
SERVICE_SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, closing transmission channel")
IDLE_TIMEOUT = Reply(421, "4.4.2", "Idle timeout, closing connection")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing connection")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later")
TOO_MANY_CONNECTIONS_IP = Reply(421, "4.7.0", "Too many connections from your address, try again later")
NOT_SMTP = Reply(421, "4.7.0", "This is an SMTP server; closing connection")
LOCAL_ERROR = Reply(451, "4.3.0", "Local error in processing, please try again later")
TEMP_LOOKUP_FAILURE = Reply(451, "4.3.0", "Temporary lookup failure, please try again later")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")  # RFC 5321 §4.5.3.1.10
INSUFFICIENT_STORAGE = Reply(452, "4.3.1", "Insufficient system storage")
TLS_NOT_AVAILABLE = Reply(454, "4.7.0", "TLS not available due to temporary reason")
AUTH_THROTTLED = Reply(454, "4.7.0", "Too many failed logins; try again later")
RATE_LIMITED = Reply(450, "4.7.1", "Message rate limit exceeded; try again later")
RECIPIENT_RATE_LIMITED = Reply(452, "4.7.1", "Recipient limit for this message exceeded")

# --- 5xx -----------------------------------------------------------------------------------
SYNTAX_ERROR = Reply(500, "5.5.2", "Syntax error, command unrecognized")
LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")  # RFC 5321 §4.5.3.1.4
BARE_LF_COMMAND = Reply(500, "5.5.2", "Bare <LF> or <CR> received; command lines must end with <CR><LF>")
BARE_LF_DATA = Reply(550, "5.5.2", "Message rejected: bare <LF> or <CR> received; lines must end with <CR><LF>")
PARAM_SYNTAX = Reply(501, "5.5.4", "Syntax error in parameters or arguments")
BAD_SENDER_SYNTAX = Reply(501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT_SYNTAX = Reply(501, "5.1.3", "Bad recipient address syntax")
HELO_REQUIRED_ARG = Reply(501, "5.5.4", "Syntax: EHLO hostname")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Command not implemented")
BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
NEED_HELO = Reply(503, "5.5.1", "Send EHLO/HELO first")
NEED_MAIL = Reply(503, "5.5.1", "Need MAIL command first")
NEED_RCPT = Reply(503, "5.5.1", "Need RCPT command first")
NESTED_MAIL = Reply(503, "5.5.1", "Sender already specified")
ALREADY_TLS = Reply(503, "5.5.1", "TLS already active")
ALREADY_AUTH = Reply(503, "5.5.1", "Already authenticated")
UNKNOWN_PARAM = Reply(555, "5.5.4", "Unsupported MAIL/RCPT parameter")  # RFC 5321 §4.1.1.11
UNKNOWN_USER = Reply(550, "5.1.1", "Recipient address rejected: user unknown")  # RFC 3463 X.1.1
RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied")
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")  # RFC 1870 §6
TOO_MANY_HOPS = Reply(554, "5.4.6", "Too many hops: mail forwarding loop detected")  # RFC 5321 §6.3
TRANSACTION_FAILED = Reply(554, "5.0.0", "Transaction failed")
SMTPUTF8_REQUIRED = Reply(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")  # RFC 6531 §3.7.4.1
SENDER_NOT_OWNED = Reply(553, "5.7.1", "Sender address rejected: not owned by authenticated user")
NULL_SENDER_REFUSED = Reply(553, "5.7.1", "Null sender not permitted on submission")
# RFC 4954 §6 and RFC 3207 §4
MUST_STARTTLS = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_MALFORMED = Reply(501, "5.5.2", "Malformed authentication data")
AUTH_CANCELLED = Reply(501, "5.0.0", "Authentication cancelled")
AUTH_MECH_UNKNOWN = Reply(504, "5.5.4", "Unrecognized authentication mechanism")
AUTH_NOT_AVAILABLE = Reply(502, "5.5.1", "Authentication not available on this port")
