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
* The open mailbox holds descriptors of ``new/`` and ``cur/``: RETR opens, and UPDATE unlinks
  and renames, relative to them (one path component for the kernel to resolve, no pathlib
  per message), and UPDATE fsyncs each touched directory once, through them.
* Everything here blocks (directory scans, fsync): the server calls it from worker threads,
  except :meth:`Mailbox.open_message_fd` (one ``open`` of a name in an open directory).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO, NamedTuple

log = logging.getLogger("serpentmail.mailbox")

LOCK_NAME = "pop3.lock"
_INFO_SEP = ":2,"
_SIZE_FIELD = re.compile(r",S=(\d+)")
_ORDER = re.compile(r"^(\d+)\.(\S*)")
_USEC = re.compile(r"M(\d+)")
_SEQ = re.compile(r"Q(\d+)")
# The names our delivery writes ("<sec>.M<usec>P<pid>Q<n>.<host>"): one match gives the same
# (sec, usec, n) as _order_key's three searches, because nothing before "Q" can hold a Q.
_ORDER_FAST = re.compile(r"(\d+)\.M(\d+)P\d+Q(\d+)")
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_MAX_UID = 70  # RFC 1939 §7: 1 to 70 characters in the range 0x21 to 0x7E


class MailboxInUse(Exception):
    """Another session holds the maildrop lock (RFC 2449 §8.1.1 [IN-USE])."""


class Entry(NamedTuple):
    """One message of the snapshot (a tuple: 20,000 of them are built at each login)."""

    sub: str  # "new" or "cur"
    name: str  # the file name inside ``sub``
    size: int
    uid: str


def unique_part(name: str) -> str:
    """The Maildir unique name inside a file name: before ``:2,`` info and ``,X=`` fields."""
    base = name.split(":", 1)[0]
    return base.split(",", 1)[0]


def _uid_of_unique(unique: str) -> str:
    # 0x21-0x7E: ASCII, printable (0x20-0x7E) and no space.
    if 0 < len(unique) <= _MAX_UID and unique.isascii() and unique.isprintable() and " " not in unique:
        return unique
    # Stable, printable and short; "~" cannot start a unique name our delivery writes.
    return "~" + hashlib.sha256(unique.encode("utf-8", "surrogateescape")).hexdigest()[:40]


def uid_for(name: str) -> str:
    """The RFC 1939 §7 unique-id of a Maildir file name (stable across moves and flags)."""
    return _uid_of_unique(unique_part(name))


def _order_key(name: str) -> tuple[int, int, int, str]:
    m = _ORDER_FAST.match(name)
    if m is not None:
        return (int(m.group(1)), int(m.group(2)), int(m.group(3)), name)
    m = _ORDER.match(name)
    if m is None:
        return (0, 0, 0, name)
    rest = m.group(2).split(".", 1)[0]
    usec = _USEC.search(rest)
    seq = _SEQ.search(rest)
    return (int(m.group(1)), int(usec.group(1)) if usec else 0, int(seq.group(1)) if seq else 0, name)


def delivered_at(name: str) -> int:
    """The delivery time (seconds) a Maildir name starts with; 0 for a name without one."""
    return _order_key(name)[0]


class Mailbox:
    """A locked maildrop and its login snapshot. Use :func:`open_mailbox`."""

    def __init__(self, path: Path, lock_fd: int, entries: list[Entry], dir_fds: dict[str, int] | None = None) -> None:
        self.path = path
        self.entries = entries
        self._lock_fd: int | None = lock_fd
        # Descriptors of new/ and cur/, owned by this mailbox (closed with the lock).
        self._dir_fds: dict[str, int] = dir_fds if dir_fds is not None else _open_dirs(path)

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
        return open(self.open_message_fd(index), "rb", closefd=True)  # the caller closes it

    def open_message_fd(self, index: int) -> int:
        """Open message ``index`` (0-based) read-only and return the descriptor (the caller
        closes it). ``O_NONBLOCK`` so that something that is not a regular file (a FIFO
        planted under a message's name) cannot block the caller in ``open``; the caller
        checks ``S_ISREG`` with ``fstat`` before reading."""
        e = self.entries[index]
        return os.open(e.name, _OPEN_FLAGS, dir_fd=self._dir_fds[e.sub])

    def apply(self, deleted: Iterable[int]) -> None:
        """RFC 1939 §6 UPDATE. Raises OSError after trying every step if any step failed."""
        marked = set(deleted)
        first_error: OSError | None = None
        fds = self._dir_fds
        new_fd, cur_fd = fds["new"], fds["cur"]
        touched: set[str] = set()
        for i, e in enumerate(self.entries):
            try:
                if i in marked:
                    try:
                        os.unlink(e.name, dir_fd=fds[e.sub])
                    except FileNotFoundError:
                        pass  # already gone: the wanted outcome
                    touched.add(e.sub)
                elif e.sub == "new":
                    # Maildir: a message that has been seen moves to cur/ with the S flag.
                    name = e.name if _INFO_SEP in e.name else e.name + _INFO_SEP + "S"
                    try:
                        os.rename(e.name, name, src_dir_fd=new_fd, dst_dir_fd=cur_fd)
                    except FileNotFoundError:
                        continue
                    touched.add("new")
                    touched.add("cur")
            except OSError as exc:
                log.error("UPDATE step failed mailbox=%s file=%s/%s: %r", self.path, e.sub, e.name, exc)
                first_error = first_error or exc
        # One fsync per touched directory, not per file: it makes every unlink and rename in
        # it durable at once.
        for sub in sorted(touched):
            try:
                os.fsync(fds[sub])
            except OSError as exc:
                log.error("fsync failed dir=%s: %r", self.path / sub, exc)
                first_error = first_error or exc
        if first_error is not None:
            raise first_error

    def close(self) -> None:
        """Release the maildrop lock (nothing is applied). Safe to call twice."""
        fd, self._lock_fd = self._lock_fd, None
        dir_fds, self._dir_fds = self._dir_fds, {}
        for dfd in dir_fds.values():
            os.close(dfd)
        if fd is not None:
            os.close(fd)  # closing the only descriptor releases the flock

    def __enter__(self) -> Mailbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open_dirs(path: Path) -> dict[str, int]:
    fds: dict[str, int] = {}
    try:
        for sub in ("new", "cur"):
            fds[sub] = os.open(path / sub, _DIR_FLAGS)
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        raise
    return fds


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
        dir_fds = _open_dirs(path)
    except BaseException:
        os.close(fd)
        raise
    try:
        entries = scan(path, dir_fds)
    except BaseException:
        for dfd in dir_fds.values():
            os.close(dfd)
        os.close(fd)
        raise
    return Mailbox(path, fd, entries, dir_fds)


def scan(path: Path, dir_fds: dict[str, int] | None = None) -> list[Entry]:
    """The messages of ``new/`` and ``cur/``, oldest first, without reading any body.

    Per name: two ``partition`` calls, one regex search for the size and one match for the
    order (see :data:`_ORDER_FAST`); a ``stat`` only for a name without ``,S=``."""
    keyed: list[tuple[tuple[int, int, int, str], Entry]] = []
    seen: set[str] = set()
    size_search = _SIZE_FIELD.search
    # cur/ first: if a crash ever left the same unique name in both, the cur/ copy wins.
    for sub in ("cur", "new"):
        # scandir of a descriptor (it reads a dup of it) lists the directory this mailbox
        # holds open, the one RETR and UPDATE will use.
        with os.scandir(dir_fds[sub]) if dir_fds is not None else os.scandir(path / sub) as it:
            for de in it:
                name = de.name
                if name[:1] == ".":
                    continue
                base = name.partition(":")[0]
                unique = base.partition(",")[0]
                if unique in seen:
                    continue
                m = size_search(base)
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
                keyed.append((_order_key(unique), Entry(sub, name, size, _uid_of_unique(unique))))
    keyed.sort(key=_first)
    return [e for _, e in keyed]


def _first(pair: tuple[tuple[int, int, int, str], Entry]) -> tuple[int, int, int, str]:
    return pair[0]

