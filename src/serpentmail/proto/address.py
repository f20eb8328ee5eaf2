"""Envelope address parsing for SMTP (RFC 5321 §4.1.2, RFC 6531 §3.3).

``parse_path`` takes the text after ``MAIL FROM:`` / ``RCPT TO:`` and returns the address and
its ESMTP parameters. Source routes (``<@a,@b:user@dom>``) are stripped as RFC 5321 §3.6.1 and
Appendix C allow; what remains is a single mailbox whose domain decides whether it is local.
No other rewriting is done: ``user%other@ours`` stays a local part ``user%other`` in our domain,
so it can never cause relaying.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

MAX_LOCAL_PART = 64  # RFC 5321 §4.5.3.1.1
MAX_DOMAIN = 255  # RFC 5321 §4.5.3.1.2
MAX_PATH = 256  # RFC 5321 §4.5.3.1.3

# RFC 5321 §4.1.2 atext (RFC 5322 §3.2.3), plus UTF-8 for SMTPUTF8 (RFC 6531 §3.3).
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff]"
_DOT_STRING = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*")
_QUOTED = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff]|\\[\x20-\x7e])*"')
_LABEL = r"[A-Za-z0-9\u0080-\U0010ffff](?:[A-Za-z0-9\-\u0080-\U0010ffff]*[A-Za-z0-9\u0080-\U0010ffff])?"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")
_LITERAL = re.compile(r"\[[\x21-\x5a\x5e-\x7e]+\]")
_PARAM = re.compile(r"[A-Za-z0-9][A-Za-z0-9\-]*(?:=[\x21-\x3c\x3e-\x7e\u0080-\U0010ffff]+)?")


class AddressError(ValueError):
    """The path is not a syntactically valid RFC 5321 path."""


@dataclass(frozen=True, slots=True)
class Address:
    """A mailbox ``local@domain``; the null path is ``Address("", "")``."""

    local: str
    domain: str
    text: str = field(init=False, repr=False, compare=False)  # str(self), made once

    # Its own __init__, not the one @dataclass would generate: mypyc compiles this one to C,
    # the generated one stays a Python function (an address is made per MAIL and RCPT).
    def __init__(self, local: str, domain: str) -> None:
        object.__setattr__(self, "local", local)
        object.__setattr__(self, "domain", domain)
        object.__setattr__(self, "text", f"{local}@{domain}" if domain else local)

    @property
    def is_null(self) -> bool:
        return not self.local and not self.domain

    @property
    def is_ascii(self) -> bool:
        return self.text.isascii()

    def __str__(self) -> str:
        return self.text

    @property
    def key(self) -> str:
        """The comparison key: domain case-insensitive, local part case-insensitive too."""
        return self.text.lower()


NULL = Address("", "")


def parse_mailbox(text: str) -> Address:
    """Parse ``local@domain`` (no angle brackets). Raises AddressError."""
    if len(text) > MAX_PATH:
        raise AddressError("address too long")
    if text.startswith('"'):
        m = _QUOTED.match(text)
        if not m or m.end() >= len(text) or text[m.end()] != "@":
            raise AddressError("bad quoted local part")
        local, domain = text[: m.end()], text[m.end() + 1 :]
    else:
        local, sep, domain = text.rpartition("@")
        if not sep:
            raise AddressError("missing @domain")
        if not _DOT_STRING.fullmatch(local):
            raise AddressError("bad local part")
    if not local or len(local.encode()) > MAX_LOCAL_PART:
        raise AddressError("bad local part length")
    if not (_DOMAIN.fullmatch(domain) or _LITERAL.fullmatch(domain)):
        raise AddressError("bad domain")
    if len(domain.encode()) > MAX_DOMAIN:
        raise AddressError("domain too long")
    return Address(local, domain.rstrip(".").lower() if not domain.startswith("[") else domain)


def split_path_and_params(arg: str) -> tuple[str, list[str]]:
    """Split ``<path> PARAM=VAL ...`` into the path text (with brackets) and parameters."""
    arg = arg.strip(" ")
    if not arg.startswith("<"):
        # RFC 5321 requires angle brackets; be lenient like Postfix for a bare address
        # without spaces (strict_rfc821_envelopes=no), which many scripts send.
        path, _, rest = arg.partition(" ")
        return f"<{path}>", rest.split()
    end = _find_closing_bracket(arg)
    if end < 0:
        raise AddressError("missing '>'")
    return arg[: end + 1], arg[end + 1 :].split()


def _find_closing_bracket(arg: str) -> int:
    in_quote = False
    escaped = False
    for i, ch in enumerate(arg):
        if escaped:
            escaped = False
        elif ch == "\\" and in_quote:
            escaped = True
        elif ch == '"':
            in_quote = not in_quote
        elif ch == ">" and not in_quote:
            return i
    return -1


def parse_path(arg: str, *, allow_null: bool, allow_bare_postmaster: bool = False) -> tuple[Address, dict[str, str | None]]:
    """Parse a reverse-path or forward-path with its parameters.

    Returns the address and a dict of upper-cased parameter names to values (None when a
    parameter has no ``=value``). Raises AddressError for bad syntax.
    """
    path, raw_params = split_path_and_params(arg)
    inner = path[1:-1]
    if inner == "":
        if not allow_null:
            raise AddressError("null path not allowed here")
        addr = NULL
    else:
        # RFC 5321 §4.1.2 / Appendix C: A-d-l ":" Mailbox — strip the source route.
        if inner.startswith("@"):
            colon = inner.find(":")
            if colon < 0:
                raise AddressError("bad source route")
            inner = inner[colon + 1 :]
        if allow_bare_postmaster and inner.lower() == "postmaster":
            addr = Address("postmaster", "")
        else:
            addr = parse_mailbox(inner)
    params: dict[str, str | None] = {}
    for p in raw_params:
        if not _PARAM.fullmatch(p):
            raise AddressError(f"bad parameter {p!r}")
        name, eq, value = p.partition("=")
        params[name.upper()] = value if eq else None
    return addr, params
