"""Delivery status notifications (bounces and delay warnings), RFC 3464 / RFC 3462 (6522).

:func:`build_dsn` turns the outcome of a queued message into one ``multipart/report;
report-type=delivery-status`` message (RFC 6522 §3) with three parts:

1. ``text/plain``: what happened, in plain words ("Couldn't find host named example.test",
   "user does not exist"), then the remote server's own reply;
2. ``message/delivery-status`` (RFC 3464 §2): per-message fields (Reporting-MTA,
   Arrival-Date) and one block per recipient (Final-Recipient, Action, Status, Remote-MTA,
   Diagnostic-Code, Last-Attempt-Date, Will-Retry-Until);
3. the original: the whole message as ``message/rfc822`` when it is small enough, otherwise
   only its header section as ``text/rfc822-headers`` (RFC 6522 §4).

Invariants: pure (no I/O, clock passed in), output uses CRLF line endings, every line is
under 998 octets (RFC 5322 §2.1.1), nothing from the remote reply can inject a header or a
MIME boundary (CR/LF stripped, boundary random). The DSN is sent with the null reverse-path
``<>`` by the caller (RFC 5321 §4.5.5), and callers never build one for a message whose own
sender is null (no bounce loops).
"""

from __future__ import annotations

import email.utils
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Action = Literal["failed", "delayed"]

_REPLY_RE = re.compile(r"^\s*([245])(\d\d)(?:[ -]+([245])\.(\d{1,3})\.(\d{1,3}))?\s*(.*)$", re.DOTALL)
_MAX_LINE = 900


@dataclass(frozen=True, slots=True)
class DSNRecipient:
    """One recipient line of a DSN: what the queue knows about it."""

    address: str
    reply: str  # the RecipientResult reply ("550 5.1.1 user unknown" or plain text)
    remote_mta: str | None = None
    diagnostic_type: str = "smtp"
    last_attempt: float | None = None
    expired: bool = False  # the queue gave up after max_lifetime (temporary failures)


def status_of(reply: str, action: Action, *, expired: bool = False) -> str:
    """The RFC 3463 status for a recipient: the enhanced code of its reply when there is one,
    otherwise the class of the basic code (RFC 3463 §3.1 "x.0.0"), otherwise a default."""
    m = _REPLY_RE.match(reply)
    if m and m.group(3):
        return f"{m.group(3)}.{m.group(4)}.{m.group(5)}"
    if m:
        return f"{m.group(1)}.0.0"
    if expired:
        return "4.4.7"  # RFC 3463 §3.5: delivery time expired
    return "4.0.0" if action == "delayed" else "5.0.0"


def _oneline(text: str, limit: int = _MAX_LINE) -> str:
    """No CR/LF (header injection), bounded length (RFC 5322 §2.1.1)."""
    flat = " ".join(text.replace("\r", " ").replace("\n", " ").split())
    return flat[:limit]


def _domain(address: str) -> str:
    return address.rpartition("@")[2]


def plain_reason(rcpt: DSNRecipient, action: Action, lifetime_text: str = "") -> str:
    """What happened, in the words a person expects (the mission's words where it has them)."""
    status = status_of(rcpt.reply, action, expired=rcpt.expired)
    low = rcpt.reply.lower()
    domain = _domain(rcpt.address)
    if action == "delayed":
        return "not delivered yet; still trying"
    if rcpt.expired:
        return f"could not be delivered{(' for ' + lifetime_text) if lifetime_text else ''}; giving up"
    if status == "5.1.10" or "null mx" in low:
        return f"the domain {domain} does not accept mail (null MX)"
    if status == "5.1.2" or "host or domain name not found" in low or "nxdomain" in low:
        return f"Couldn't find host named {domain}"
    if status == "5.1.1" or "user does not exist" in low or "user unknown" in low:
        return "user does not exist"
    if "loops back to myself" in low:
        return "mail for this domain loops back to myself"
    if status.startswith("5.2.2"):
        return "the mailbox is full"
    if status.startswith("5.3.4") or status.startswith("5.2.3"):
        return "the message is too big for the destination"
    return "the destination refused it"


def _fmt_date(ts: float) -> str:
    return email.utils.formatdate(ts, localtime=False, usegmt=True)


def _addr_type(address: str) -> str:
    # RFC 6533 §3: non-ASCII addresses use the "utf-8" address type.
    return "rfc822" if address.isascii() else "utf-8"


def build_dsn(
    *,
    reporting_mta: str,
    original_sender: str,
    original_id: str,
    arrival: float,
    recipients: Sequence[DSNRecipient],
    action: Action,
    now: float,
    original_headers: bytes,
    original_message: bytes | None = None,
    will_retry_until: float | None = None,
    lifetime_text: str = "",
    boundary: str | None = None,
    message_id: str | None = None,
) -> bytes:
    """The bytes of one DSN for ``recipients`` of one message (see the module docstring).

    ``original_message`` (the whole message) is attached as ``message/rfc822`` when given;
    otherwise ``original_headers`` as ``text/rfc822-headers``.
    """
    if not recipients:
        raise ValueError("a DSN needs at least one recipient")
    boundary = boundary or f"=_serpentmail_{secrets.token_hex(12)}"
    message_id = message_id or f"<{original_id}.{secrets.token_hex(4)}@{reporting_mta}>"
    daemon = f"MAILER-DAEMON@{reporting_mta}"
    if action == "failed":
        subject = "Undelivered Mail Returned to Sender"
    else:
        subject = "Delayed Mail (still being retried)"

    crlf = "\r\n"
    head = [
        f"From: Mail Delivery System <{daemon}>",
        f"To: <{_oneline(original_sender)}>",
        f"Subject: {subject}",
        f"Date: {_fmt_date(now)}",
        f"Message-ID: {message_id}",
        "Auto-Submitted: auto-replied",  # RFC 3834 §5: automatic responses are marked
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "Content-Transfer-Encoding: 7bit",
    ]

    # Part 1: the human-readable explanation.
    if action == "failed":
        intro = [
            f"This is the mail system at host {reporting_mta}.",
            "",
            "I'm sorry to have to inform you that your message could not",
            "be delivered to one or more recipients. It's attached below.",
            "",
        ]
    else:
        until = f" until {_fmt_date(will_retry_until)}" if will_retry_until else ""
        intro = [
            f"This is the mail system at host {reporting_mta}.",
            "",
            "####################################################################",
            "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #",
            "####################################################################",
            "",
            "Your message could not be delivered yet to the recipients below.",
            f"Delivery will be retried{until}.",
            "",
        ]
    lines = list(intro)
    for r in recipients:
        reason = plain_reason(r, action, lifetime_text)
        lines.append(f"<{_oneline(r.address)}>: {reason}")
        if r.reply:
            said = f"{r.remote_mta} said" if r.remote_mta else "the reason given"
            lines.append(f"    ({said}: {_oneline(r.reply, 800)})")
        lines.append("")
    text = crlf.join(lines) + crlf
    text_8bit = not text.isascii()

    # Part 2: message/delivery-status (RFC 3464 §2.2 per-message, §2.3 per-recipient).
    status_lines = [
        f"Reporting-MTA: dns; {reporting_mta}",
        f"X-Serpentmail-Queue-ID: {original_id}",
        f"Arrival-Date: {_fmt_date(arrival)}",
    ]
    blocks = [crlf.join(status_lines)]
    for r in recipients:
        b = [
            f"Final-Recipient: {_addr_type(r.address)}; {_oneline(r.address)}",
            f"Action: {action}",
            f"Status: {status_of(r.reply, action, expired=r.expired)}",
        ]
        if r.remote_mta:
            b.append(f"Remote-MTA: dns; {_oneline(r.remote_mta)}")
        if r.reply:
            dtype = r.diagnostic_type or "smtp"
            if dtype.lower() != "smtp" and not dtype.lower().startswith("x-"):
                dtype = "X-" + dtype
            b.append(f"Diagnostic-Code: {dtype}; {_oneline(r.reply)}")
        if r.last_attempt is not None:
            b.append(f"Last-Attempt-Date: {_fmt_date(r.last_attempt)}")
        if action == "delayed" and will_retry_until is not None:
            b.append(f"Will-Retry-Until: {_fmt_date(will_retry_until)}")
        blocks.append(crlf.join(b))
    status_body = (crlf + crlf).join(blocks) + crlf
    status_8bit = not status_body.isascii()

    parts: list[bytes] = []
    parts.append(
        (
            "Content-Description: Notification" + crlf
            + "Content-Type: text/plain; charset=utf-8" + crlf
            + f"Content-Transfer-Encoding: {'8bit' if text_8bit else '7bit'}" + crlf + crlf
            + text
        ).encode("utf-8")
    )
    # RFC 6533 §6: delivery-status with UTF-8 addresses is message/global-delivery-status.
    status_type = "message/global-delivery-status" if status_8bit else "message/delivery-status"
    parts.append(
        (
            "Content-Description: Delivery report" + crlf
            + f"Content-Type: {status_type}" + crlf + crlf
            + status_body
        ).encode("utf-8")
    )
    if original_message is not None:
        attached = _crlf(original_message)
        ctype = "message/rfc822"
        desc = "Undelivered Message" if action == "failed" else "Delayed Message"
    else:
        attached = _crlf(original_headers)
        ctype = "text/rfc822-headers"
        desc = "Undelivered Message Headers" if action == "failed" else "Delayed Message Headers"
    cte = "7bit" if attached.isascii() else "8bit"
    parts.append(
        (f"Content-Description: {desc}{crlf}Content-Type: {ctype}{crlf}"
         f"Content-Transfer-Encoding: {cte}{crlf}{crlf}").encode()
        + attached
    )
    delim = f"--{boundary}{crlf}".encode()
    body = b"This is a MIME-encapsulated message." + crlf.encode() + crlf.encode()
    for p in parts:
        body += delim + p
        if not p.endswith(b"\r\n"):
            body += b"\r\n"
    body += f"{crlf}--{boundary}--{crlf}".encode()
    return (crlf.join(head) + crlf + crlf).encode("utf-8") + body


def _crlf(data: bytes) -> bytes:
    """Normalize line endings to CRLF (stored messages already use CRLF; be safe)."""
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


def dsn_is_8bit(data: bytes) -> bool:
    return not data.isascii()
