"""The sans-IO SMTP client engine (RFC 5321 client role, with PIPELINING, SIZE, 8BITMIME,
SMTPUTF8, CHUNKING, STARTTLS and AUTH PLAIN/LOGIN).

The engine never touches a socket, a file or the clock. The I/O layer calls a command method
(:meth:`SMTPClientConnection.ehlo`, :meth:`mail`, :meth:`rcpt`, ...), which queues the command
bytes and records that a reply is expected; it sends :meth:`data_to_send`, feeds what the
server says to :meth:`receive_data` and pulls :class:`ServerReply` events with
:meth:`next_event`. :attr:`expecting` lists the commands still waiting for a reply, oldest
first, so the I/O layer knows how many replies to read and which timeout applies.

Several commands may be queued before any reply is read: that is PIPELINING (RFC 2920 §3.1),
and replies are matched to commands strictly in order (RFC 2920 §3.2).

A few multi-step exchanges are continued by the engine itself, queueing the next command as
soon as the reply that calls for it arrives (the I/O layer just flushes the new bytes):

* EHLO refused with 500/502/504/550 → HELO (RFC 5321 §4.1.4: a client "SHOULD" fall back);
* AUTH LOGIN's two ``334`` challenges → the base64 username and password.

Invariants:

* Reply lines are parsed strictly as ``ddd`` followed by ``-`` (continuation), SP or line end
  (RFC 5321 §4.2); anything else raises :class:`ReplyError`, which the I/O layer treats as a
  temporary failure of that server. Lines may end with CRLF or a bare LF (servers in the wild
  do this; RFC 5321 §4.2 asks receivers to be tolerant of reply text, not of commands).
* Message content is dot-stuffed in bulk with bytes operations (``replace`` over whole
  chunks, RFC 5321 §4.5.2), never a Python loop per line; a chunk boundary inside ``CRLF.``
  is handled by carrying the last two octets. The content always ends with CRLF before the
  terminating ``.`` line, so the final dot can never be glued to the last line.
* Command arguments never contain CR or LF (:class:`ValueError` otherwise): a recipient
  address cannot smuggle a second command.
"""

from __future__ import annotations

import base64
import re
from collections import deque
from dataclasses import dataclass, field

# RFC 5321 §4.5.3.1.5 sets 512 octets as the minimum reply line length; be generous with
# real servers but bounded, so a peer cannot make us buffer without limit.
MAX_REPLY_LINE = 8192
MAX_REPLY_LINES = 1000

_REPLY_LINE = re.compile(rb"^([2-5][0-9][0-9])([ -]|$)(.*)$", re.DOTALL)
_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?: |$)")
# RFC 5321 §4.1.4: after these replies to EHLO, the client may try HELO instead.
_EHLO_FALLBACK_CODES = frozenset({500, 501, 502, 504, 550})


class ReplyError(ValueError):
    """The server sent something that is not an SMTP reply."""


class ProtocolError(Exception):
    """The I/O layer used the engine wrongly (a bug, never caused by a peer)."""


@dataclass(frozen=True, slots=True)
class ServerReply:
    """One complete (possibly multi-line) reply and the command it answers."""

    command: str  # "GREETING", "EHLO", "HELO", "MAIL", "RCPT", "DATA", "DOT", "BDAT", ...
    code: int
    enhanced: str  # "" when the server sent no enhanced status code (RFC 2034)
    lines: tuple[str, ...]  # the text of each line, enhanced code removed
    argument: str = ""  # e.g. the recipient for RCPT

    # Its own __init__, made per reply: mypyc compiles it, while the one @dataclass
    # generates stays a Python function.
    def __init__(self, command: str, code: int, enhanced: str, lines: tuple[str, ...], argument: str = "") -> None:
        object.__setattr__(self, "command", command)
        object.__setattr__(self, "code", code)
        object.__setattr__(self, "enhanced", enhanced)
        object.__setattr__(self, "lines", lines)
        object.__setattr__(self, "argument", argument)

    # RFC 5321 §4.2.1 reply-code classes, as on replies.Reply.
    @property
    def is_positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    @property
    def text(self) -> str:
        return " ".join(line for line in self.lines if line)

    def __str__(self) -> str:
        # The "code x.y.z text" form used in RecipientResult.reply and DSN Diagnostic-Code.
        return " ".join(p for p in (str(self.code), self.enhanced, self.text) if p)


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()


@dataclass(slots=True)
class Extensions:
    """What the server announced in its EHLO reply (RFC 5321 §4.1.1.1)."""

    keywords: dict[str, str] = field(default_factory=dict)  # KEYWORD -> parameters

    def __contains__(self, keyword: str) -> bool:
        return keyword.upper() in self.keywords

    @property
    def size_limit(self) -> int | None:
        """RFC 1870 §4: the declared maximum size; None when absent, 0 means no fixed limit."""
        if "SIZE" not in self.keywords:
            return None
        value = self.keywords["SIZE"].strip()
        return int(value) if value.isdigit() else 0

    @property
    def auth_mechanisms(self) -> frozenset[str]:
        return frozenset(self.keywords.get("AUTH", "").upper().split())


class DotStuffer:
    """Bulk dot-stuffing for DATA content (RFC 5321 §4.5.2), chunk by chunk.

    Each chunk is transformed with one ``bytes.replace``; the last two octets of the previous
    chunk are prepended so a ``CRLF.`` spanning a chunk boundary is still found (the prefix
    can never itself receive an inserted dot, since the dot that triggers stuffing is the
    third octet of the pattern, so the prefix is stripped again at a fixed length).
    """

    def __init__(self) -> None:
        self._tail = b"\r\n"  # the start of the message counts as the start of a line
        self.octets_in = 0

    def feed(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""
        self.octets_in += len(chunk)
        joined = self._tail + chunk
        stuffed = joined.replace(b"\r\n.", b"\r\n..")[len(self._tail):]
        self._tail = joined[-2:]
        return stuffed

    def end(self) -> bytes:
        """The terminator: a CRLF first when the content did not end with one, then ``.``."""
        return b".\r\n" if self._tail == b"\r\n" else b"\r\n.\r\n"


def dot_stuff(message: bytes) -> bytes:
    """The whole DATA payload for ``message``, terminator included (a convenience)."""
    ds = DotStuffer()
    return ds.feed(message) + ds.end()


def _arg(value: str) -> str:
    if "\r" in value or "\n" in value or "\x00" in value:
        raise ValueError("CR, LF or NUL in an SMTP command argument")
    return value


class SMTPClientConnection:
    """One SMTP session, client side. See the module docstring for the contract."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._out: list[bytes] = []
        self._lines: list[tuple[int, str]] = []  # lines of the reply being assembled
        self._expect: deque[tuple[str, str]] = deque([("GREETING", "")])
        self._events: deque[ServerReply] = deque()
        self.extensions = Extensions()
        self.extended = False  # EHLO accepted (False after a HELO fallback)
        self.server_name = ""  # the name in the server's EHLO/HELO reply
        self._helo_name = ""
        self._login: list[bytes] = []  # AUTH LOGIN answers still to send
        self.closed = False

    # --- bytes in and out ------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        self._buf += data

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    @property
    def expecting(self) -> tuple[str, ...]:
        """The commands whose replies have not arrived yet, oldest first."""
        return tuple(cmd for cmd, _ in self._expect)

    def next_event(self) -> ServerReply | _NeedData:
        """The next complete reply, or NEED_DATA. Raises :class:`ReplyError` on garbage."""
        while not self._events:
            if not self._parse_line():
                return NEED_DATA
        return self._events.popleft()

    # --- commands --------------------------------------------------------------------

    def ehlo(self, name: str) -> None:
        self._helo_name = _arg(name)
        self._send("EHLO", f"EHLO {name}")

    def helo(self, name: str) -> None:
        self._helo_name = _arg(name)
        self._send("HELO", f"HELO {name}")

    def starttls(self) -> None:
        self._send("STARTTLS", "STARTTLS")

    def tls_established(self) -> None:
        """RFC 3207 §4.2: after the handshake everything learnt before is forgotten."""
        self._buf.clear()
        self.extensions = Extensions()
        self.extended = False

    def auth_plain(self, username: str, password: str, authzid: str = "") -> None:
        # RFC 4616 §2: [authzid] NUL authcid NUL passwd, sent as the initial response (RFC 4954 §4).
        token = f"{authzid}\x00{username}\x00{password}".encode()
        self._send("AUTH", "AUTH PLAIN " + base64.b64encode(token).decode("ascii"))

    def auth_login(self, username: str, password: str) -> None:
        # The LOGIN mechanism (draft-murchison-sasl-login): two 334 challenges.
        self._login = [base64.b64encode(username.encode()), base64.b64encode(password.encode())]
        self._send("AUTH", "AUTH LOGIN")

    def mail(self, sender: str, *, size: int | None = None, body: str | None = None,
             smtputf8: bool = False) -> None:
        params = []
        if size is not None:
            params.append(f"SIZE={size}")  # RFC 1870 §6
        if body:
            params.append(f"BODY={body}")  # RFC 6152 §2, RFC 3030 §3 (BINARYMIME)
        if smtputf8:
            params.append("SMTPUTF8")  # RFC 6531 §3.4
        tail = "".join(" " + p for p in params)
        self._send("MAIL", f"MAIL FROM:<{_arg(sender)}>{tail}")

    def rcpt(self, recipient: str) -> None:
        self._send("RCPT", f"RCPT TO:<{_arg(recipient)}>", recipient)

    def data(self) -> None:
        self._send("DATA", "DATA")

    def send_content(self, data: bytes) -> None:
        """Already dot-stuffed content (see :class:`DotStuffer`); no reply is expected."""
        self._out.append(data)

    def end_data(self, terminator: bytes) -> None:
        """The terminator from :meth:`DotStuffer.end`; its reply is the final one."""
        self._out.append(terminator)
        self._expect.append(("DOT", ""))

    def bdat(self, chunk: bytes, last: bool = False) -> None:
        """RFC 3030 §2: ``BDAT size [LAST]`` followed by exactly ``size`` octets, unstuffed."""
        self._out.append(f"BDAT {len(chunk)}{' LAST' if last else ''}\r\n".encode("ascii"))
        self._out.append(chunk)
        self._expect.append(("BDAT", "LAST" if last else ""))

    def rset(self) -> None:
        self._send("RSET", "RSET")

    def noop(self) -> None:
        self._send("NOOP", "NOOP")

    def quit(self) -> None:
        self._send("QUIT", "QUIT")

    # --- internals -------------------------------------------------------------------

    def _send(self, command: str, line: str, argument: str = "") -> None:
        if self.closed:
            raise ProtocolError("command after the connection closed")
        self._out.append(line.encode("utf-8") + b"\r\n")
        self._expect.append((command, argument))

    def _parse_line(self) -> bool:
        buf = self._buf
        lf = buf.find(b"\n")
        if lf < 0:
            if len(buf) > MAX_REPLY_LINE:
                raise ReplyError("reply line too long")
            return False
        raw = bytes(buf[:lf])
        del buf[: lf + 1]
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        m = _REPLY_LINE.match(raw)
        if m is None:
            raise ReplyError(f"not an SMTP reply line: {raw[:80]!r}")
        code = int(m.group(1))
        if self._lines and self._lines[0][0] != code:
            raise ReplyError("reply code changed inside a multi-line reply")
        self._lines.append((code, m.group(3).decode("utf-8", "replace")))
        if len(self._lines) > MAX_REPLY_LINES:
            raise ReplyError("too many reply lines")
        if m.group(2) == b"-":
            return True
        lines = [text for _, text in self._lines]
        self._lines = []
        self._complete(code, lines)
        return True

    def _complete(self, code: int, lines: list[str]) -> None:
        if not self._expect:
            raise ReplyError(f"unexpected reply {code} with no command outstanding")
        command, argument = self._expect.popleft()
        enhanced = ""
        # RFC 2034 §4: the enhanced code prefixes the text; its class matches the reply's.
        # EHLO replies carry none (the first line is the server's name).
        if command not in ("EHLO", "HELO", "GREETING"):
            m = _ENHANCED.match(lines[0])
            if m and m.group(1) == str(code)[0]:
                enhanced = m.group(0).strip()
                lines = [
                    line[len(enhanced):].lstrip() if line.startswith(enhanced) else line
                    for line in lines
                ]
        reply = ServerReply(command, code, enhanced, tuple(lines), argument)
        match command:
            case "EHLO":
                if 200 <= code < 300:
                    self.extended = True
                    self.server_name = lines[0].split(" ", 1)[0]
                    kw: dict[str, str] = {}
                    for line in lines[1:]:
                        key, _, params = line.strip().partition(" ")
                        if key:
                            kw[key.upper()] = params
                    self.extensions = Extensions(kw)
                elif code in _EHLO_FALLBACK_CODES:
                    self.helo(self._helo_name)
            case "HELO":
                if 200 <= code < 300:
                    self.extended = False
                    self.server_name = lines[0].split(" ", 1)[0]
                    self.extensions = Extensions()
            case "AUTH":
                if code == 334 and self._login:
                    self._out.append(self._login.pop(0) + b"\r\n")
                    self._expect.appendleft(("AUTH", ""))
                elif code != 334:
                    self._login = []
            case "QUIT":
                self.closed = True
        if code == 421:
            # RFC 5321 §3.8: the server is closing the channel; nothing else will come.
            self.closed = True
        self._events.append(reply)
