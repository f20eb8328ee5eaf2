"""POP3 access to one Maildir: the maildrop lock, the login snapshot and UPDATE.

Invariants:

* One POP3 session per maildrop (RFC 1939 §8): :func:`open_mailbox` takes an exclusive,
  non-blocking ``flock`` on ``<maildir>/pop3.lock``. flock locks belong to the open file
  description, so a second session in the same server process is refused as well, and the
  kernel drops the lock when a process dies: a crash never locks a user out.
* The snapshot is ``new/`` + ``cur/`` at login, oldest first (by the time, microseconds and
  counter in the Maildir unique name, then the name). Sizes come from the ``,S=<octets>``
  field our delivery writes (a ``stat`` only for names without it); bodies are never read at
  login, so a 20,000-message maildrop logs in with one directory scan.
* The unique-id (RFC 1939 §7 UIDL) is the Maildir unique name: the part before the ``:2,``
  info and before ``,S=``-style fields. It does not change when a message moves from ``new/``
  to ``cur/`` or gains flags, nor across restarts. Names that are not 1-70 characters in
  0x21-0x7E are replaced by a stable hash of the name.
* UPDATE (RFC 1939 §6): marked messages are unlinked, the others move ``new/`` -> ``cur/``
  with the ``:2,S`` (seen) flag by ``rename``; then both directories are fsync'd. Each step is
  atomic on its own, so a failure half-way leaves every message either in place or gone —
  never half-written — and the session reports ``-ERR [SYS/TEMP]``.
* Everything here blocks (directory scans, fsync): the server calls it from worker threads.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .maildir import fsync_dir

log = logging.getLogger("serpentmail.mailbox")

LOCK_NAME = "pop3.lock"
_INFO_SEP = ":2,"
_SIZE_FIELD = re.compile(r",S=(\d+)")
_ORDER = re.compile(r"^(\d+)\.(\S*)")
_USEC = re.compile(r"M(\d+)")
_SEQ = re.compile(r"Q(\d+)")
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
_MAX_UID = 70  # RFC 1939 §7: 1 to 70 characters in the range 0x21 to 0x7E


class MailboxInUse(Exception):
    """Another session holds the maildrop lock (RFC 2449 §8.1.1 [IN-USE])."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One message of the snapshot."""

    sub: str  # "new" or "cur"
    name: str  # the file name inside ``sub``
    size: int
    uid: str


def unique_part(name: str) -> str:
    """The Maildir unique name inside a file name: before ``:2,`` info and ``,X=`` fields."""
    base = name.split(":", 1)[0]
    return base.split(",", 1)[0]


def uid_for(name: str) -> str:
    """The RFC 1939 §7 unique-id of a Maildir file name (stable across moves and flags)."""
    unique = unique_part(name)
    if 0 < len(unique) <= _MAX_UID and all("!" <= ch <= "~" for ch in unique):
        return unique
    # Stable, printable and short; "~" cannot start a unique name our delivery writes.
    return "~" + hashlib.sha256(unique.encode("utf-8", "surrogateescape")).hexdigest()[:40]


def _order_key(name: str) -> tuple[int, int, int, str]:
    m = _ORDER.match(name)
    if m is None:
        return (0, 0, 0, name)
    rest = m.group(2).split(".", 1)[0]
    usec = _USEC.search(rest)
    seq = _SEQ.search(rest)
    return (int(m.group(1)), int(usec.group(1)) if usec else 0, int(seq.group(1)) if seq else 0, name)


class Mailbox:
    """A locked maildrop and its login snapshot. Use :func:`open_mailbox`."""

    def __init__(self, path: Path, lock_fd: int, entries: list[Entry]) -> None:
        self.path = path
        self.entries = entries
        # "<maildir>/new/" and "<maildir>/cur/" as strings: one concatenation per RETR
        # instead of two pathlib joins.
        self._dirs = {sub: os.path.join(path, sub, "") for sub in ("new", "cur")}
        self._lock_fd: int | None = lock_fd

    @property
    def listing(self) -> list[tuple[int, str]]:
        """(size, unique-id) per message, for the engine."""
        return [(e.size, e.uid) for e in self.entries]

    @property
    def locked(self) -> bool:
        return self._lock_fd is not None

    def message_path(self, index: int) -> Path:
        e = self.entries[index]
        return self.path / e.sub / e.name

    def open_message(self, index: int) -> BinaryIO:
        """Open message ``index`` (0-based) for reading (a worker-thread call)."""
        return open(self.message_path(index), "rb")  # the caller closes it

    def open_message_fd(self, index: int) -> int:
        """Open message ``index`` (0-based) read-only and return the descriptor (the caller
        closes it). ``O_NONBLOCK`` so that something that is not a regular file (a FIFO
        planted under a message's name) cannot block the caller in ``open``; the caller
        checks ``S_ISREG`` with ``fstat`` before reading."""
        e = self.entries[index]
        return os.open(self._dirs[e.sub] + e.name, _OPEN_FLAGS)

    def apply(self, deleted: Iterable[int]) -> None:
        """RFC 1939 §6 UPDATE. Raises OSError after trying every step if any step failed."""
        marked = set(deleted)
        first_error: OSError | None = None
        touched: set[Path] = set()
        for i, e in enumerate(self.entries):
            src = self.path / e.sub / e.name
            try:
                if i in marked:
                    try:
                        os.unlink(src)
                    except FileNotFoundError:
                        pass  # already gone: the wanted outcome
                    touched.add(src.parent)
                elif e.sub == "new":
                    # Maildir: a message that has been seen moves to cur/ with the S flag.
                    name = e.name if _INFO_SEP in e.name else e.name + _INFO_SEP + "S"
                    try:
                        os.rename(src, self.path / "cur" / name)
                    except FileNotFoundError:
                        continue
                    touched.add(src.parent)
                    touched.add(self.path / "cur")
            except OSError as exc:
                log.error("UPDATE step failed mailbox=%s file=%s/%s: %r", self.path, e.sub, e.name, exc)
                first_error = first_error or exc
        for d in sorted(touched):
            try:
                fsync_dir(d)
            except OSError as exc:
                log.error("fsync failed dir=%s: %r", d, exc)
                first_error = first_error or exc
        if first_error is not None:
            raise first_error

    def close(self) -> None:
        """Release the maildrop lock (nothing is applied). Safe to call twice."""
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)  # closing the only descriptor releases the flock

    def __enter__(self) -> Mailbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_mailbox(path: Path) -> Mailbox:
    """Lock the maildrop at ``path`` and take its snapshot. Raises :class:`MailboxInUse`."""
    for sub in ("tmp", "new", "cur"):
        (path / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise MailboxInUse(str(path)) from None
    except BaseException:
        os.close(fd)
        raise
    try:
        entries = scan(path)
    except BaseException:
        os.close(fd)
        raise
    return Mailbox(path, fd, entries)


def scan(path: Path) -> list[Entry]:
    """The messages of ``new/`` and ``cur/``, oldest first, without reading any body."""
    found: list[tuple[tuple[int, int, int, str], Entry]] = []
    seen: set[str] = set()
    # cur/ first: if a crash ever left the same unique name in both, the cur/ copy wins.
    for sub in ("cur", "new"):
        with os.scandir(path / sub) as it:
            for de in it:
                name = de.name
                if name.startswith("."):
                    continue
                unique = unique_part(name)
                if unique in seen:
                    continue
                m = _SIZE_FIELD.search(name.split(":", 1)[0])
                if m is not None:
                    size = int(m.group(1))
                else:
                    try:
                        st = de.stat()
                    except FileNotFoundError:
                        continue
                    if not de.is_file():
                        continue
                    size = st.st_size
                seen.add(unique)
                found.append((_order_key(unique), Entry(sub, name, size, uid_for(name))))
    found.sort(key=lambda pair: pair[0])
    return [e for _, e in found]
