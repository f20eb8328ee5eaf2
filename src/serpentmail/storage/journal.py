"""The delivery journal: one device flush before the 250 instead of two.

Maildir's recipe (:mod:`.maildir`) makes a message durable with two flushes in a row: the
file's fsync, then its directory's after the rename. On the reference disk each flush is a few
hundred microseconds, and at one session they are most of the time between the client's final
dot and our 250. The journal takes their place for local deliveries (and for the queue items
that the process running the queue accepts; see queue/store.py and the replay below):

1. the message is appended to the journal file (header, its Maildir targets, its bytes, a
   CRC-32) by one synchronous write: ``O_DIRECT`` with ``RWF_DSYNC`` where the filesystem
   takes it (see :meth:`Journal._append_direct`), else a write and ``fdatasync``. One flush
   either way (the file's size is fixed when it is made; its first lap also writes the block
   map of the blocks it fills);
2. the temp file is renamed (or linked) into each ``new/``, with no fsync, and the 250 is sent;
3. a checkpoint, at most :data:`CHECKPOINT_SECONDS` later, runs ``syncfs`` on the filesystem
   (every rename and every file of the interval in one flush) and then advances the
   journal's start past the records it made redundant; once everything written is covered,
   the journal starts over at its beginning under a new generation number.

After a crash (start-up, before anything listens: :func:`replay_all`), every record between
the journal's durable start and its first invalid record is checked against the mailboxes: a
file with the right bytes (in ``new/``, or in ``cur/`` under its ``:2,`` name) is left alone,
a missing or damaged one is written again with the durable recipe. The records a crash can
leave behind are the last second's at most. A process crash loses nothing of the page cache,
so there the replay only finishes the renames that had not happened. Deleting a file that a
pending record names would let a replay bring it back, so POP3 deletes such a message only
after the record's checkpoint (:func:`wait_checkpointed`). A record whose rename failed (the
session answered 451) is placed by a replay after a crash: a duplicate at worst, as when a
250 is lost on the way.

Layout (little-endian): block 0 holds the header (magic, generation, start offset, CRC-32);
records follow from :data:`DATA_START`, each a 32-octet head (magic, generation, length of
the targets, length of the content, CRC-32 of targets + content, CRC-32 of the head itself),
the targets (paths relative to the data directory, one per line) and the content; a record
with no content whose targets start with ``-`` says those queue files are being removed. A record
whose generation is not the header's, or whose checksums fail, ends the scan: it is either a
previous lap's or one whose append was cut short (and so never acknowledged).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import json
import logging
import mmap
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..log import log_event
from .fsutil import JournalBusy, fsync_dir, write_durably

# File operations that follow a durable append (Journal.append's ``then``): (kind, job, a, b),
# kind one of these, ``job`` the index of the job it belongs to, ``a`` a descriptor (close) or
# a path, ``b`` the second path of a rename or link. See :func:`run_ops`.
OP_CLOSE, OP_RENAME, OP_LINK, OP_UNLINK = 0, 1, 2, 3
FileOp = tuple[int, int, int | bytes, bytes]

_write_then: Callable[[int, mmap.mmap, int, int, int, list[FileOp], int], tuple[int, list[int]]] | None
try:  # the append and the operations in one call (src/serpentmail/_commit.c), when built
    from .._commit import write_then as _write_then
except ImportError:
    _write_then = None
_gather: Callable[[mmap.mmap, list[bytes], int], int] | None
try:  # a record copied into the direct-write buffer in one call (same module)
    from .._commit import gather as _gather
except ImportError:
    _gather = None

log = logging.getLogger(__name__)

HEADER = struct.Struct("<4sQQI")  # magic, generation, start offset, crc32 of the three
RECORD = struct.Struct("<4sQIQII")  # magic, generation, targets length, content length, body crc, head crc
HEADER_MAGIC = b"SMJH"
RECORD_MAGIC = b"SMJR"
DATA_START = 4096
DEFAULT_SIZE = 64 << 20
CHECKPOINT_SECONDS = 1.0
MAX_RECORD = 1 << 20
# Direct appends (Journal._append_direct): offsets, lengths and the buffer's address are
# multiples of BLOCK (4 KiB covers every common logical block size); the page-aligned buffer
# holds DIRECT_BUFFER octets, and a bigger append is written in pieces of that size.
BLOCK = 4096
DIRECT_BUFFER = 2 << 20
_O_DIRECT = getattr(os, "O_DIRECT", 0)
_RWF_DSYNC = getattr(os, "RWF_DSYNC", 0)
REMOVED = "-"  # a target line starting with this names a file being removed (no content)
QUEUE_PREFIX = "queue/"  # targets under this are queue files, not Maildir messages

_libc: ctypes.CDLL | None = None


def syncfs(fd: int) -> None:
    """Flush the whole filesystem holding ``fd`` (syncfs(2)); raises OSError. Linux only: Python's
    os module has no syncfs; elsewhere this falls back to sync(2), which covers it too."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    fn = getattr(_libc, "syncfs", None)
    if fn is None:
        os.sync()
        return
    if fn(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"syncfs: {os.strerror(err)}")


@dataclass(slots=True)
class Entry:
    """One message to journal: its bytes and where they go (absolute paths under the root)."""

    content: bytes | list[bytes]  # the message, whole or in the pieces it arrived in
    targets: list[str]  # as CommitJob.links: strings, not Paths

    def __init__(self, content: bytes | list[bytes], targets: Sequence[str | os.PathLike[str]]) -> None:  # compiled (see CommitJob)
        self.content = content
        self.targets = as_strs(targets)


def as_strs(paths: Sequence[str | os.PathLike[str]]) -> list[str]:
    """``paths`` as strings. The server's message path makes them as strings: a Path is made
    and read by Python code, which mypyc does not compile, once per message. Callers with
    Paths (tools, tests) may still pass them."""
    if type(paths) is list and all(type(p) is str for p in paths):
        return paths  # type: ignore[return-value]  # (checked just above)
    return [os.fspath(p) for p in paths]


class JournalFull(Exception):
    """The entries do not fit in the space left (the caller checkpoints and tries again)."""


class Journal:
    """One process's journal file (see the module docstring). Thread-safe: appends come from the
    committer thread and, for a lone session, the event loop; checkpoints from their own thread.
    """

    def __init__(self, path: Path, root: Path, size: int = DEFAULT_SIZE) -> None:
        self.path = path
        self.root = root
        self._prefix = os.path.join(os.fspath(root), "")  # "<root>/": see _name
        self.lock = threading.Lock()
        self._checkpointing = threading.Lock()  # one checkpoint at a time: the start only moves on
        # The checkpoint's flush (:func:`syncfs`), an attribute so that a test can run something
        # in the middle of one (this module is compiled: a replaced module function is not seen).
        self.flush_fs: Callable[[int], None] = syncfs
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.stat().st_size < DATA_START + RECORD.size:
            _create(path, size)
        self.fd = _open_locked(path)
        try:
            # Whatever a previous process with this file left is made good before we write over it.
            replay(path, root, fd=self.fd)
        except BaseException:
            os.close(self.fd)
            raise
        self.size = os.fstat(self.fd).st_size
        self.gen, _ = _read_header(self.fd)
        self.start = self.end = DATA_START
        # The appends' descriptor (O_DIRECT), or -1: then they go through ``fd`` and the page
        # cache. ``fd`` keeps the lock, the reads and the header.
        self.wfd = _open_direct(path)
        self._tail = b""  # the journal's bytes from the last block boundary to ``end``
        self._buf: mmap.mmap | None = None  # the aligned buffer of the direct appends
        # Counts the checkpoints that took a snapshot: a record appended in the current epoch
        # is in no snapshot yet, so nothing has made it redundant (see :meth:`append_removal`).
        self.epoch = 0
        # Bigger messages take the Maildir recipe: their own writes dwarf the flushes.
        self.max_record = min(MAX_RECORD, (self.size - DATA_START) // 4)
        self._since: float | None = None  # when the oldest record not yet checkpointed was written
        self._dirs: set[str] = set()  # directories that gained entries since the last checkpoint
        # Records appended but whose files are not in place yet (queue items: see
        # :meth:`defer`): key -> the function that puts them there.
        self.unplaced: dict[object, Callable[[], None]] = {}
        # Guards :attr:`unplaced`, :attr:`removals` and :attr:`epoch` for the event loop, which
        # removes a delivered item without :attr:`lock` (held through every flush): taken
        # after :attr:`lock` where both are, and only ever for a few dictionary operations
        # or, in a checkpoint, the links of the items still deferred.
        self.place_lock = threading.Lock()
        # Removal records waiting to be written (names with the REMOVED mark), see
        # :meth:`queue_removal`.
        self.removals: list[str] = []

    @property
    def pending_since(self) -> float | None:
        return self._since

    def append(self, entries: list[Entry], then: list[FileOp] | None = None, jobs: int = 0) -> list[int]:
        """Write ``entries`` and make them durable (one flush); call with :attr:`lock` held.
        Raises :class:`JournalFull` when they do not fit, OSError when the write fails.

        ``then``: file operations to run once the records are durable (only then), for
        ``jobs`` jobs; returns one errno per job as :func:`run_ops` does (all 0 when there are
        none). A direct append runs them in the same call as its write where the C module is
        built (:data:`_write_then`): the committer thread then takes the interpreter's lock
        back once for the write and the renames, instead of once per system call."""
        return self._write([([self._name(t) for t in e.targets], e.content) for e in entries],
                           [t for e in entries for t in e.targets], sync=True, then=then, jobs=jobs)

    def append_removal(self, targets: Sequence[str | Path]) -> None:
        """Record that ``targets`` are being removed (call with :attr:`lock` held, before
        removing them, and only for files whose records were appended in the current
        :attr:`epoch`). No flush: a process crash keeps it in the page cache, so the replay
        finishes the removal instead of writing the files again; an operating-system crash
        may lose it together with the removal, and the replay then restores the files (the
        work is done twice, nothing is lost). Raises :class:`JournalFull` or OSError."""
        paths = [os.fspath(t) for t in targets]
        self._write([([REMOVED + self._name(t) for t in paths], b"")], paths, sync=False)

    def defer(self, key: object, place: Callable[[], None]) -> None:
        """Leave the files of a record just appended where they are (call with :attr:`lock`
        held, right after :meth:`append`): the owner places them itself, or removes them with
        :meth:`append_removal` and ``unplaced.pop(key)``, and the next checkpoint calls
        ``place()`` for every one still here before its snapshot, so that no checkpoint ever
        makes redundant a record whose file is not on disk (a crash after it would lose it)."""
        self.unplaced[key] = place

    def place_now(self, key: object) -> None:
        """Place a deferred record's files now (any thread, not holding :attr:`lock`); nothing
        if they are placed already. On failure they stay deferred and the error is raised."""
        with self.lock, self.place_lock:
            self._place(key)

    def _place(self, key: object) -> None:
        place = self.unplaced.get(key)
        if place is not None:
            place()
            self.unplaced.pop(key, None)

    def queue_removal(self, targets: Sequence[str | Path]) -> None:
        """:meth:`append_removal` for files that were never placed (a deferred record's, whose
        key the caller has just taken out of :attr:`unplaced`), written with the next append
        or checkpoint instead of now: call with :attr:`place_lock` held (not :attr:`lock`:
        the event loop calls this). Until it is written, a process crash brings the item back
        from its records (delivered twice, never lost), as an operating-system crash does
        with any removal record; a checkpoint writes it before its snapshot, and the
        checkpointer thread within a quarter of a second."""
        self.removals.extend(REMOVED + self._name(t) for t in targets)

    def _take_removals(self) -> list[tuple[list[str], bytes | list[bytes]]]:
        """The queued removal names as one record to write (call with :attr:`lock` held)."""
        with self.place_lock:
            names, self.removals = self.removals, []
        return [(names, b"")] if names else []

    def flush_removals(self) -> None:
        """Write the queued removal records now (no flush); the checkpointer's every round."""
        if self.removals:
            with self.lock:
                self._write_removals()

    def try_flush_removals(self) -> None:
        """:meth:`flush_removals` if :attr:`lock` is free at once (the event loop must not wait
        for a flush in progress: then the next append or round of the checkpointer writes them)."""
        if self.removals and self.lock.acquire(blocking=False):
            try:
                self._write_removals()
            finally:
                self.lock.release()

    def _write_removals(self) -> None:
        recs = self._take_removals()
        if recs:
            try:
                self._write(recs, [], sync=False)
            except (JournalFull, OSError):
                pass  # only a crash's duplicates depend on them: the checkpoint covers the rest

    def _name(self, target: str | Path) -> str:
        # The targets are made from the same data directory as ``root``: cutting its prefix off
        # gives what os.path.relpath gives, at a tenth of its cost (it runs for every file of
        # every record, four per relayed message); anything else takes relpath.
        name = os.fspath(target)
        if name.startswith(self._prefix) and ".." not in name:
            return name[len(self._prefix):]
        return os.path.relpath(target, self.root)

    def _write(self, recs: list[tuple[list[str], bytes | list[bytes]]], targets: list[str], *, sync: bool,
               then: list[FileOp] | None = None, jobs: int = 0) -> list[int]:
        """Append one record per (target names, content) at the end, ``fdatasync`` if ``sync``;
        the queued removal records go first. A content may come in pieces (written one after
        the other, with one checksum over them all)."""
        if self.removals:
            self._write_removals()
        bufs: list[bytes] = []
        total = 0
        for names, content in recs:
            pieces = content if isinstance(content, list) else [content]
            meta = "\n".join(names).encode()
            crc = zlib.crc32(meta)
            size = 0
            for piece in pieces:
                crc = zlib.crc32(piece, crc)
                size += len(piece)
            head = RECORD.pack(RECORD_MAGIC, self.gen, len(meta), size, crc, 0)
            head = head[:-4] + struct.pack("<I", zlib.crc32(head[:-4]))
            bufs += (head, meta, *pieces)
            total += len(head) + len(meta) + size
        if self.end + total > self.size:
            raise JournalFull
        # A stale record of an earlier lap may follow ours: the scan stops at its generation.
        written, errors = self._append_direct(bufs, total, sync, then, jobs) if self.wfd >= 0 else (False, None)
        if written:
            self.end += total
        else:
            _pwrite_all(self.fd, bufs, self.end)
            if sync:
                os.fdatasync(self.fd)
            self.end += total
            if self.wfd >= 0:  # only the file's last block, not a whole one, was left for this append
                self._tail = os.pread(self.fd, self.end % BLOCK, self.end - self.end % BLOCK)
        if errors is None:  # the records are durable: now the operations that follow them
            errors = run_ops(then or [], jobs)
        if self._since is None:
            self._since = time.monotonic()
        for name in targets:
            # The directory as a string: a Path's parent and hash are Python code, run per message.
            self._dirs.add(name[:name.rfind("/") + 1] or ".")
        return errors

    def _append_direct(self, bufs: list[bytes], total: int, sync: bool, then: list[FileOp] | None,
                       jobs: int) -> tuple[bool, list[int] | None]:
        """Write ``bufs`` (``total`` octets) at :attr:`end` through :attr:`wfd`. Returns
        (written, errors): written is False if this filesystem turns out to refuse direct
        writes (nothing was written: the caller writes them through the page cache, as from
        now on every append); errors are those of the file operations ``then``
        (:meth:`append`) when the C module ran them with the write, else None (the caller runs
        them).

        Why: a buffered write and ``fdatasync`` copies the record into the page cache, hands it
        to writeback and waits for it behind whatever else is being written back (the
        mailboxes' own files, a checkpoint's ``syncfs``). A direct write goes to the device at
        once, and ``RWF_DSYNC`` makes it durable in the same call (a write with FUA where the
        device has a volatile cache and the blocks are already mapped; otherwise the kernel
        flushes what O_DSYNC requires), with no copy in the page cache to write back later.
        Per 100 KiB append (``python3 -m bench.micro flush [--busy]``, p50): 182-214 µs
        against 211-237. In the server (``python3 -m bench.ab``, 10 pairs each): inbound
        4 KiB at 1 session x1.033 msg/s and CPU x0.963, at 10 sessions x1.035 and x0.971;
        100 KiB at 1 session x1.020 and x0.957.

        Direct writes cover whole blocks, so the append starts at the block boundary before
        :attr:`end`, with the bytes already there (:attr:`_tail`, kept from the last append),
        and ends with zeros to the next boundary: a scan stops there, as at any stale byte."""
        buf = self._buf
        if buf is None:
            buf = self._buf = mmap.mmap(-1, DIRECT_BUFFER)  # page-aligned, as O_DIRECT requires
        tail = self._tail
        first = self.end - len(tail)
        length = len(tail) + total
        if first + -(-length // BLOCK) * BLOCK > self.size:  # the file ends inside the last block
            return False, None
        whole = length <= DIRECT_BUFFER  # one write, durable by itself
        flags = _RWF_DSYNC if sync and whole else 0
        offset, pos = first, 0
        errors: list[int] | None = None  # set when the operations ran with the last write
        try:
            padded = False  # the zeros to the block boundary are in the buffer already
            if whole and _gather is not None:
                pos = _gather(buf, [tail, *bufs], BLOCK)  # (the one-write case: nearly every record)
                padded = True
            else:
                for piece in (tail, *bufs):
                    view = memoryview(piece)
                    while view:
                        k = min(len(view), DIRECT_BUFFER - pos)
                        buf[pos:pos + k] = view[:k]
                        pos += k
                        view = view[k:]
                        if pos == DIRECT_BUFFER:
                            _pwrite_direct(self.wfd, buf, pos, offset, 0)
                            offset += pos
                            pos = 0
            keep = length % BLOCK
            new_tail = bytes(buf[pos - keep:pos])
            synced = False
            if pos:
                pad = -pos % BLOCK
                if not padded:
                    buf[pos:pos + pad] = bytes(pad)
                if then and flags and _write_then is not None:
                    n, errors = _write_then(self.wfd, buf, pos + pad, offset, flags, then, jobs)
                    if n < 0:
                        raise OSError(-n, os.strerror(-n))
                    if n != pos + pad:
                        raise OSError(f"short journal write ({n} of {pos + pad} octets)")
                else:
                    _pwrite_direct(self.wfd, buf, pos + pad, offset, flags)
                synced = flags != 0
            if sync and not synced:
                os.fdatasync(self.wfd)
        except OSError as exc:
            if exc.errno != errno.EINVAL or offset != first:
                raise
            # Refused outright (an alignment this filesystem or device does not accept):
            # nothing was written, and the page cache takes this append and the next ones.
            log_event(log, "journal: direct writes refused, using the page cache", logging.WARNING,
                      path=str(self.path), error=str(exc))
            os.close(self.wfd)
            self.wfd = -1
            return False, None
        self._tail = new_tail
        return True, errors

    def settle(self) -> None:
        """Wait until a checkpoint that is running has ended (at once if none is)."""
        with self._checkpointing:
            pass

    def checkpoint(self) -> None:
        """Make every record written so far redundant: one ``syncfs`` per filesystem the
        interval's files are on, then the header moves past them (and the journal starts over
        when nothing was written meanwhile). The flush runs without the lock, so appends go on."""
        with self._checkpointing:
            self._checkpoint()

    def _checkpoint(self) -> None:
        with self.lock:
            if self.end == self.start:
                return
            with self.place_lock:
                for key in list(self.unplaced):
                    self._place(key)  # raises OSError: no snapshot, the records stay pending
                self.epoch += 1
            self._write_removals()  # the ones queued before the epoch moved on: in this snapshot
            end, gen, dirs = self.end, self.gen, self._dirs
            self._dirs = set()
        try:
            self.flush_fs(self.fd)
            seen = {os.fstat(self.fd).st_dev}
            for d in dirs:
                try:
                    dev = os.stat(d).st_dev
                except OSError:
                    continue
                if dev not in seen:
                    seen.add(dev)
                    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                    try:
                        self.flush_fs(dfd)
                    finally:
                        os.close(dfd)
        except OSError:
            with self.lock:
                self._dirs |= dirs  # the records stay replayable; the next checkpoint tries again
            raise
        with self.lock:
            if self.gen != gen:
                return
            if self.end == end:  # nothing new: start over at the beginning, a new generation
                self.gen += 1
                self.start = self.end = DATA_START
                self._tail = b""
                self._since = None
            else:
                self.start = end
                self._since = time.monotonic()  # the records written during the flush
            _write_header(self.fd, self.gen, self.start)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.checkpoint()
        if self.wfd >= 0:
            os.close(self.wfd)
            self.wfd = -1
        os.close(self.fd)


def run_ops(ops: list[FileOp], jobs: int) -> list[int]:
    """Run file operations (see :data:`FileOp`) in order, as ``_commit.write_then`` does after
    its write: close, rename, link, or unlink (whose failure is ignored: a leftover temp name is
    harmless). Once an operation of a job fails, that job's others are skipped. Returns one
    errno per job, 0 where all of its operations were done."""
    errors = [0] * jobs
    for kind, job, a, b in ops:
        if errors[job]:
            continue
        try:
            if isinstance(a, int):
                os.close(a)  # OP_CLOSE, the one operation on a descriptor
            elif kind == OP_RENAME:
                os.rename(a, b)
            elif kind == OP_LINK:
                os.link(a, b)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(a)
        except OSError as exc:
            errors[job] = exc.errno or errno.EIO
    return errors


def _pwrite_all(fd: int, bufs: list[bytes] | list[memoryview], offset: int, flags: int = 0) -> None:
    """``pwritev`` of every buffer, at most 1,024 (IOV_MAX) per call, with ``flags``; raises on
    a short write."""
    for i in range(0, len(bufs), 1024):
        part = bufs[i:i + 1024]
        want = sum(len(b) for b in part)
        n = os.pwritev(fd, part, offset, flags)
        if n != want:
            raise OSError(f"short journal write ({n} of {want} octets)")
        offset += n


def _pwrite_direct(fd: int, buf: mmap.mmap, length: int, offset: int, flags: int) -> None:
    """The first ``length`` octets of ``buf`` (whole blocks) at ``offset``."""
    view = memoryview(buf)
    try:
        _pwrite_all(fd, [view[:length]], offset, flags)
    finally:
        view.release()


def _open_direct(path: Path) -> int:
    """``path`` opened again for the appends, with ``O_DIRECT``; -1 where that is refused (a
    filesystem without direct I/O, a system without the flag or without ``RWF_DSYNC``)."""
    if not _O_DIRECT or not _RWF_DSYNC:
        return -1
    try:
        return os.open(path, os.O_WRONLY | os.O_CLOEXEC | _O_DIRECT)
    except OSError:
        return -1


def _create(path: Path, size: int) -> None:
    """A sparse file of ``size`` octets with a valid header, made durable under its final name.

    Not zero-filled: an append into a hole also writes the block map, in the same flush (about
    0.8x the appends per second of a written file on the reference disk), and after the first
    lap every block has been written. Filling 64 MiB at every first start cost more."""
    tmp = path.with_name(path.name + ".new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
        _write_header(fd, 1, DATA_START, sync=False)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _write_header(fd: int, gen: int, start: int, *, sync: bool = True) -> None:
    raw = HEADER.pack(HEADER_MAGIC, gen, start, 0)[:-4]
    os.pwrite(fd, raw + struct.pack("<I", zlib.crc32(raw)), 0)
    if sync:
        os.fdatasync(fd)


def _read_header(fd: int) -> tuple[int, int]:
    raw = os.pread(fd, HEADER.size, 0)
    if len(raw) == HEADER.size:
        magic, gen, start, crc = HEADER.unpack(raw)
        if magic == HEADER_MAGIC and crc == zlib.crc32(raw[:-4]):
            return gen, start
    raise ValueError("not a serpentmail journal (bad header)")


def records(path: Path) -> Iterator[tuple[list[str], bytes]]:
    """The records a replay must check: (targets relative to the root, content), in order."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        gen, off = _read_header(fd)
        while off + RECORD.size <= size:
            head = os.pread(fd, RECORD.size, off)
            magic, rgen, mlen, dlen, body_crc, head_crc = RECORD.unpack(head)
            if magic != RECORD_MAGIC or rgen != gen or head_crc != zlib.crc32(head[:-4]):
                return
            if off + RECORD.size + mlen + dlen > size:
                return
            body = os.pread(fd, mlen + dlen, off + RECORD.size)
            if len(body) != mlen + dlen or zlib.crc32(body) != body_crc:
                return
            yield body[:mlen].decode().split("\n"), body[mlen:]
            off += RECORD.size + mlen + dlen
    finally:
        os.close(fd)


def pending_records(root: Path) -> Iterator[tuple[list[str], bytes]]:
    """:func:`records` of every journal under ``root/journal`` (a file that cannot be read is
    skipped). Cheap when nothing is pending (two reads per journal file): an idle journal's
    header points at no record of its generation."""
    directory = root / "journal"
    if not directory.is_dir():
        return
    for path in sorted(directory.glob("*.log")):
        try:
            yield from records(path)
        except (OSError, ValueError):
            continue


def pending_targets(root: Path) -> set[str]:
    """The targets (relative to ``root``) of every record a journal still lists as pending."""
    return {t for targets, _content in pending_records(root) for t in targets}


def wait_checkpointed(root: Path, targets: set[str], own: Journal | None, timeout: float) -> set[str]:
    """Block until no journal lists any of ``targets`` (relative to ``root``) as pending; return
    the ones still pending after ``timeout`` seconds.

    A file must not be deleted while a record for it is pending: a replay after a crash would
    find it missing and write it again, bringing back a message the user deleted. ``own`` (this
    process's journal) is checkpointed at once; another process's checkpointer moves on within
    about :data:`CHECKPOINT_SECONDS`."""
    waiting = targets & pending_targets(root)
    if waiting and own is not None:
        with contextlib.suppress(OSError):
            own.checkpoint()
        waiting &= pending_targets(root)
    deadline = time.monotonic() + timeout
    while waiting and time.monotonic() < deadline:
        time.sleep(0.05)
        waiting &= pending_targets(root)
    return waiting


@dataclass(slots=True)
class ReplayReport:
    intact: int = 0  # files found with the journal's bytes
    rewritten: int = 0  # found damaged (a crash lost their blocks) and written again
    restored: int = 0  # missing (their rename was lost) and written again
    skipped: int = 0  # their mailbox no longer exists
    removed: int = 0  # queue files whose recorded removal the crash interrupted, removed now


def _open_locked(path: Path) -> int:
    """The journal opened for writing, with an exclusive lock that lives as long as the
    descriptor: a second server started on the same data directory must not touch it."""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise JournalBusy(f"journal {path} is in use by another serpentmail process") from None
    return fd


def replay(path: Path, root: Path, *, fd: int | None = None) -> ReplayReport:
    """Check every pending record of the journal at ``path`` against the files under ``root``,
    write again what is missing or damaged, make it all durable, then mark the records done.
    ``fd``: the journal, already opened and locked by the caller; otherwise it is locked here
    (:class:`JournalBusy` if a live process holds it)."""
    own = fd is None
    if fd is None:
        fd = _open_locked(path)
    try:
        return _replay(path, root, fd)
    finally:
        if own:
            os.close(fd)


def _replay(path: Path, root: Path, fd: int) -> ReplayReport:
    report = ReplayReport()
    # The appends bypass the page cache (O_DIRECT) and the readers (queue listings, POP3's
    # wait for a checkpoint) do not. The kernel drops the cached pages a direct write covers;
    # should one still be older than the disk (a read racing a write), the replay must not
    # trust it. No writer runs now (we hold the lock), so the scan reads what is on disk.
    with contextlib.suppress(OSError, AttributeError):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    try:
        pending = list(records(path))
    except ValueError:
        log_event(log, "journal has no valid header; nothing in it was acknowledged", logging.WARNING, path=str(path))
        pending = []
    gone = {t[len(REMOVED):] for targets, _ in pending for t in targets if t.startswith(REMOVED)}
    for targets, content in pending:
        for rel in targets:
            if rel.startswith(REMOVED) or rel in gone:
                continue
            if rel.startswith(QUEUE_PREFIX):
                _restore_queue_file(root / rel, content, report)
            else:
                _restore(root / rel, content, report)
    for rel in sorted(gone, key=lambda r: "/env/" not in r):
        # The removal was recorded, then the crash came: finish it (envelopes first, as ever).
        with contextlib.suppress(FileNotFoundError):
            os.unlink(root / rel)
            report.removed += 1
    if pending:
        syncfs(fd)  # a process crash leaves the files in the page cache only
    try:
        gen, _ = _read_header(fd)
    except ValueError:
        gen = 0
    _write_header(fd, gen + 1, DATA_START)
    if report.rewritten or report.restored or report.skipped or report.removed:
        log_event(log, "journal replayed", logging.WARNING, path=str(path), intact=report.intact,
                  rewritten=report.rewritten, restored=report.restored, skipped=report.skipped,
                  removed=report.removed)
    return report


def replay_all(root: Path) -> ReplayReport:
    """:func:`replay` for every journal under ``root / "journal"`` (at start, before serving)."""
    total = ReplayReport()
    directory = root / "journal"
    if not directory.is_dir():
        return total
    for path in sorted(directory.glob("*.log")):
        try:
            r = replay(path, root)
        except JournalBusy:
            log_event(log, "journal in use by a running server; left to it", logging.WARNING, path=str(path))
            continue
        total.intact += r.intact
        total.rewritten += r.rewritten
        total.restored += r.restored
        total.skipped += r.skipped
        total.removed += r.removed
    return total


def _restore_queue_file(target: Path, content: bytes, report: ReplayReport) -> None:
    """Make queue file ``target`` (``queue/data/<id>`` or ``queue/env/<id>.json``) whole.

    A data file never changes, so it must hold the journal's bytes. An envelope is rewritten
    by delivery attempts (always with the durable recipe), so any envelope that parses is
    the newest one and is left alone; only a missing or unreadable one is written again."""
    try:
        found: bytes | None = target.read_bytes()  # at most 1 MiB (the journal's record limit)
    except FileNotFoundError:
        found = None
    except OSError:
        found = b""
    if found == content:
        report.intact += 1
        return
    if found and target.name.endswith(".json"):
        try:
            obj = json.loads(found)
        except ValueError:
            obj = None
        # Its own id: after a power cut a file can show blocks of another (a reused file's).
        if isinstance(obj, dict) and obj.get("id") == target.name[:-len(".json")]:
            report.intact += 1
            return
    if found is None:
        report.restored += 1
    else:
        report.rewritten += 1
    tmp_dir = target.parent.parent / "tmp"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_durably(tmp_dir / f"{target.name}.replay", content, target)


def _restore(target: Path, content: bytes, report: ReplayReport) -> None:
    """Make ``target`` (``<maildir>/new/<name>``) hold ``content``, wherever POP3 moved it."""
    new_dir = target.parent
    maildir = new_dir.parent
    if not maildir.is_dir():
        report.skipped += 1
        return
    found = target if target.exists() else None
    if found is None:
        cur = maildir / "cur"
        prefix = target.name + ":"
        with contextlib.suppress(OSError), os.scandir(cur) as it:
            for entry in it:
                if entry.name.startswith(prefix):
                    found = Path(entry.path)
                    break
    if found is not None:
        try:
            with open(found, "rb") as f:
                if f.read(len(content) + 1) == content:
                    report.intact += 1
                    return
        except OSError:
            pass
        report.rewritten += 1
    else:
        report.restored += 1
        found = target
    found.parent.mkdir(parents=True, exist_ok=True)
    tmp = maildir / "tmp" / f"{found.name}.replay"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    write_durably(tmp, content, found)
