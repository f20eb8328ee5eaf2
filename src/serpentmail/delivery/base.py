"""The courier plug point: what the scheduler hands a courier and what it gets back.

A courier delivers one message to a group of recipients that share a destination (a local
mailbox set, or one remote domain) and reports a result per recipient. Couriers never see an
SMTP session; their input is a committed queue item.

Status rules (RFC 5321 §4.2.1, RFC 3463): ``delivered`` is final; ``failed`` is permanent (a
5xx, NXDOMAIN, null MX) and leads to a bounce; ``deferred`` is temporary (4xx, timeouts,
connection refused, SERVFAIL, any unexpected error) and is retried later.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

Status = Literal["delivered", "deferred", "failed"]


@dataclass(frozen=True, slots=True)
class RecipientResult:
    recipient: str
    status: Status
    # The reply or reason, as "code enhanced text" for SMTP replies (e.g. "550 5.1.1 user
    # unknown") or plain text for local problems ("Host or domain name not found").
    reply: str
    remote_mta: str | None = None  # the exchanger that answered, for the DSN Remote-MTA field
    diagnostic_type: str = "smtp"  # RFC 3464 §2.3.6: "smtp" for SMTP replies, "x-local" otherwise

    # Its own __init__ (as Envelope's), made per delivery: mypyc compiles it, while the one
    # @dataclass generates stays a Python function.
    def __init__(self, recipient: str, status: Status, reply: str, remote_mta: str | None = None,
                 diagnostic_type: str = "smtp") -> None:
        object.__setattr__(self, "recipient", recipient)
        object.__setattr__(self, "status", status)
        object.__setattr__(self, "reply", reply)
        object.__setattr__(self, "remote_mta", remote_mta)
        object.__setattr__(self, "diagnostic_type", diagnostic_type)


@dataclass(frozen=True, slots=True)
class Envelope:
    """What a courier needs to know about the message."""

    queue_id: str
    sender: str  # "" for the null reverse-path
    data_path: Path  # the message file (trace headers included, no Return-Path)
    size: int
    smtputf8: bool = False
    body_8bit: bool = False
    # An open descriptor of that file while the queue holds one for the whole attempt (a
    # journaled item's spool), read with pread instead of opening the path; -1: none.
    data_fd: int = -1

    def __init__(self, queue_id: str, sender: str, data_path: Path, size: int, smtputf8: bool = False,
                 body_8bit: bool = False, data_fd: int = -1) -> None:
        object.__setattr__(self, "queue_id", queue_id)
        object.__setattr__(self, "sender", sender)
        object.__setattr__(self, "data_path", data_path)
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "smtputf8", smtputf8)
        object.__setattr__(self, "body_8bit", body_8bit)
        object.__setattr__(self, "data_fd", data_fd)


class Courier(Protocol):
    async def deliver(self, envelope: Envelope, recipients: list[str]) -> list[RecipientResult]:
        """Deliver to ``recipients`` (all in one domain); one result per recipient, in order."""
        ...
