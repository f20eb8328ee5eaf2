"""Durable Maildir writes and the group committer.

The one durable-write recipe of the project (qmail's Maildir, and the queue uses it too):

1. write the content to a temp file on the same filesystem (``data_dir/tmp``);
2. fsync the file;
3. hard-link it into place (each recipient's ``new/`` under its final name), or rename it
   there when it has a single destination (``keep_spool``: one call instead of two);
4. fsync every directory that gained an entry;
5. only then acknowledge (the SMTP 250), and unlink the temp name if it was linked.

A crash before step 4 can leave a file in ``tmp/`` (cleaned at start) but never a partial file
in ``new/``: the link or rename only happens after the content is on disk. A message for
several local mailboxes is written once and hard-linked N times.

Steps 2-4 run in :class:`Committer` threads. Jobs that arrive while a batch is being synced
wait for the next batch, so concurrent sessions share directory fsyncs (group commit); every
job's callback runs only after its own batch is durable. The one exception is a server with a
single session and nothing waiting in the committer: there is no batch to share, and handing
the job to a thread and waking the event loop afterwards cost more than the fsyncs, so the
session runs the same recipe itself (:meth:`Committer.commit_now`).

Files are reused rather than deleted where the server itself empties them (a delivered queue
item's data and envelope): :class:`Recycler` keeps them, blanked, for the spool pools. On ext4
without a journal, creating a file scans every inode freed in the last minutes (the kernel's
``recently_deleted`` check), so a queue that deletes two files per message made each new file
cost up to a millisecond of kernel time; the profile is bench/profiles/submission-inode-scan.txt.
A kept file keeps its blocks too (:func:`.fsutil.blank` zeroes it in place): a reused spool is
written over from the start and cut to its length when it is committed (:meth:`SpoolFile.trim`).

With a :class:`~.journal.Journal` (the server's default), a job marked ``journal`` of up to
1 MiB (a local delivery, or a queue file of the scheduler's process) takes the journal's path
instead of steps 2 and 4: its bytes are appended to the journal with one flush, then it is
renamed or linked into place; see :mod:`.journal`. A queue item's job (``place=False``) is
not even put in place: the checkpoint links it if it is still queued by then (:func:`_defer`),
and a delivered item's spools come back to their pool as they are (:meth:`SpoolPool.give`).

Stored messages keep the CRLF line endings they arrived with, so the file is byte-for-byte
what the client sent (plus our trace headers) and POP3 can send it without conversion.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..log import log_event
from .fsutil import blank, fsync_dir
from .journal import (
    CHECKPOINT_SECONDS,
    OP_CLOSE,
    OP_LINK,
    OP_RENAME,
    OP_UNLINK,
    Entry,
    FileOp,
    Journal,
    JournalFull,
    as_strs,
)

log = logging.getLogger(__name__)

_create_files: Callable[[bytes, list[bytes]], list[int]] | None
try:  # the spool pool's refill in one call (src/serpentmail/_commit.c), when built
    from .._commit import create_files as _create_files
except ImportError:
    _create_files = None

SUBDIRS = ("tmp", "new", "cur")
_seq = itertools.count(1)
_PID = [os.getpid()]  # cached (a syscall per message otherwise); refreshed in a forked child
os.register_at_fork(after_in_child=lambda: _PID.__setitem__(0, os.getpid()))
_HOST = socket.gethostname().replace("/", "\\057").replace(":", "\\072") or "localhost"


def maildir_for(data_dir: Path, user_id: int) -> Path:
    """The mailbox directory of a user: derived from the stored id, never from client text."""
    return data_dir / "mail" / str(int(user_id))


def ensure_maildir(path: Path) -> None:
    for sub in SUBDIRS:
        (path / sub).mkdir(parents=True, exist_ok=True, mode=0o700)


def unique_name() -> str:
    """A Maildir unique name (cr.yp.to/proto/maildir.html): time, microseconds, pid, counter."""
    now = time.time()
    sec = int(now)
    usec = int((now - sec) * 1_000_000)
    return f"{sec}.M{usec}P{_PID[0]}Q{next(_seq)}.{_HOST}"


# What a spool file keeps in memory of what it was written (SpoolFile.kept): a journaled
# record is made from these pieces instead of being read back from the file. Below the
# journal's record limit (journal.MAX_RECORD, 1 MiB): the pieces stay in memory until the
# commit, and a session receiving a bigger message should not hold that much of it; such a
# message is read back, as every one was before.
KEEP_MAX = 256 << 10


class SpoolFile:
    """A temp file being written on the event loop (page-cache writes, no fsync here).

    It keeps the pieces it was written (``kept``: the same ``bytes`` objects, no copy) up to
    :data:`KEEP_MAX` octets, for the journal's record (:func:`_read_spool`): one ``pread`` and
    one copy of the message fewer per delivery, and for the committer thread one less trip
    back into the interpreter's lock. Released once the record is made or the file is closed."""

    __slots__ = ("_path", "closed", "fd", "kept", "name", "size", "spath", "stale")

    def __init__(self, tmp_dir: str | Path, *, reuse: str | None = None, made: int = -1) -> None:
        """A new file in ``tmp_dir``; with ``reuse``, the existing file of that name (opened
        here, or already open as ``made``: just created, by :meth:`SpoolPool.make`)."""
        # The path is kept as a string (spath; path makes a Path of it): a Path is made and
        # read by Python code, which mypyc does not compile, and a pool makes one per message.
        folder = tmp_dir if isinstance(tmp_dir, str) else os.fspath(tmp_dir)
        self._path: Path | None = None
        if reuse is None:
            self.name = unique_name()  # the message's id and Maildir unique name
            self.spath = f"{folder}/{self.name}"
            self.fd = os.open(self.spath, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            self.stale = 0  # octets of an earlier use still in the file past what was written
        elif made >= 0:
            self.name = reuse
            self.spath = f"{folder}/{reuse}"
            self.fd = made
            self.stale = 0
        else:
            self.name = reuse
            self.spath = f"{folder}/{reuse}"
            self.fd = os.open(self.spath, os.O_RDWR | os.O_CLOEXEC)
            try:
                self.stale = os.fstat(self.fd).st_size
            except BaseException:
                os.close(self.fd)
                raise
        self.size = 0
        self.closed = False
        self.kept: list[bytes] | None = []

    @property
    def path(self) -> Path:
        """The file's temp path (as first made: :attr:`name` changes when a pool hands it out),
        made at the first use: a queue item's spools are opened and placed by it."""
        path = self._path
        if path is None:
            path = self._path = Path(self.spath)
        return path

    @classmethod
    def reuse(cls, path: Path) -> SpoolFile:
        """A blanked file (from :class:`Recycler`) opened as a new spool. It is not truncated,
        so its blocks stay allocated and are written over; :meth:`trim` cuts what is left."""
        return cls(path.parent, reuse=path.name)

    def trim(self) -> None:
        """Cut a reused file to what was written: call before it is flushed or put in place."""
        if self.stale > self.size:
            os.ftruncate(self.fd, self.size)
        self.stale = 0

    def write(self, data: bytes | memoryview) -> None:
        kept = self.kept
        if kept is not None:
            # Only bytes, which nobody can change afterwards (a memoryview's buffer could be).
            if type(data) is bytes and self.size + len(data) <= KEEP_MAX:
                kept.append(data)
            else:
                self.kept = None
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
            self.size += n

    def discard(self) -> None:
        """Abandon the file (transaction reset, refused message)."""
        self.kept = None
        if not self.closed:
            self.closed = True
            os.close(self.fd)
        try:
            os.unlink(self.spath)
        except FileNotFoundError:
            pass


@dataclass(slots=True)
class CommitJob:
    """Make a spool file durable and visible under one or more final names."""

    spool: SpoolFile
    links: list[str]  # final paths (e.g. <maildir>/new/<unique>,S=<size>), as strings:
    # made per message, and a Path is made and read by Python code, not compiled
    on_done: Callable[[BaseException | None], None]
    keep_spool: bool = False  # True: the temp file itself is the final file (renamed, not linked)
    journal: bool = False  # may go through the committer's journal
    done: bool = field(default=False)
    epoch: int | None = None  # set when journaled: the journal's epoch at the append
    place: bool = True  # False: a journaled job's file stays where it is (see _defer)

    # Its own __init__ (as CallJob's and journal.Entry's): mypyc compiles it to C, while the
    # one @dataclass generates stays a Python function, run once per message.
    def __init__(self, spool: SpoolFile, links: Sequence[str | os.PathLike[str]],
                 on_done: Callable[[BaseException | None], None], *,
                 keep_spool: bool = False, journal: bool = False, place: bool = True) -> None:
        self.spool = spool
        self.links = as_strs(links)
        self.on_done = on_done
        self.keep_spool = keep_spool
        self.journal = journal
        self.done = False
        self.epoch = None
        self.place = place


@dataclass(slots=True)
class CallJob:
    """Run ``fn`` in the committer thread after the commit jobs of its batch (see
    :meth:`Committer.call`); ``on_done(result, error)`` is called there."""

    fn: Callable[[], Any]
    on_done: Callable[[Any, BaseException | None], None]

    def __init__(self, fn: Callable[[], Any], on_done: Callable[[Any, BaseException | None], None]) -> None:
        self.fn = fn
        self.on_done = on_done


class Committer:
    """Threads that run commit jobs in batches (group commit). See the module docstring.

    One thread by default: while it syncs a batch, the next batch gathers in the queue, so a
    busier server gets bigger batches (fewer directory fsyncs per message) instead of two
    threads splitting the work into half-size batches that each pay a directory fsync.
    """

    def __init__(self, threads: int = 1, journal: Journal | None = None) -> None:
        self._q: queue.SimpleQueue[CommitJob | CallJob | None] = queue.SimpleQueue()
        self.journal = journal
        self._threads = [threading.Thread(target=self._run, name=f"committer-{i}", daemon=True) for i in range(threads)]
        self._stop = threading.Event()
        if journal is not None:
            self._threads.append(threading.Thread(target=self._checkpoints, name="checkpointer", daemon=True))
        for t in self._threads:
            t.start()

    def submit(self, job: CommitJob) -> None:
        self._q.put(job)

    def call(self, job: CallJob) -> None:
        """Run other file work (a queue item's removal) in the committer thread, after the
        commits of the batch it lands in: no thread of its own to wake, and its answer reaches
        the event loop with the batch's (one wake-up). For short work only: it holds up the
        next batch."""
        self._q.put(job)

    def idle(self) -> bool:
        """Nothing is waiting for the committer threads (a batch may still be syncing)."""
        return self._q.empty()

    def commit_now(self, spool: SpoolFile, links: Sequence[str | os.PathLike[str]], *, keep_spool: bool = False,
                   journal: bool = False) -> None:
        """Run the recipe for one file on the calling thread; raise on failure.

        For a caller with nobody to share a batch with (see the module docstring): the same
        steps, the same cleanup on failure, without the thread hand-off and loop wake-up."""
        errors: list[BaseException | None] = []
        self._commit([CommitJob(spool, links, errors.append, keep_spool=keep_spool, journal=journal)], wake=False)
        if errors[0] is not None:
            raise errors[0]

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            if t.name != "checkpointer":
                self._q.put(None)
        for t in self._threads:
            t.join(timeout=30)
        if self.journal is not None:
            self.journal.close()  # a last checkpoint: a clean stop leaves nothing to replay

    def _checkpoints(self) -> None:
        """The checkpointer thread: each journal record made redundant within about
        :data:`CHECKPOINT_SECONDS` (sooner when the journal is half full)."""
        journal = self.journal
        assert journal is not None
        while not self._stop.wait(CHECKPOINT_SECONDS / 4):
            journal.flush_removals()  # queued by the event loop (QueueStore.remove_now); never raises
            since = journal.pending_since
            if since is None:
                continue
            if time.monotonic() - since >= CHECKPOINT_SECONDS or journal.end - journal.start > journal.size // 2:
                try:
                    journal.checkpoint()
                except OSError as exc:  # its records stay in the journal; tried again next round
                    log_event(log, "journal checkpoint failed", logging.ERROR, error=str(exc))

    def _run(self) -> None:
        while True:
            job = self._q.get()
            if job is None:
                return
            batch = [job]
            stop = False
            while len(batch) < 256:
                try:
                    nxt = self._q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            commits = [j for j in batch if isinstance(j, CommitJob)]
            calls = [j for j in batch if isinstance(j, CallJob)]
            if commits:
                self._commit(commits, wake=not calls)
            for call in calls:
                try:
                    result = call.fn()
                except BaseException as exc:  # the caller decides; never kill the committer
                    call.on_done(None, exc)
                else:
                    call.on_done(result, None)
            if calls:
                _LoopWaker.flush_all()
            if stop:
                return

    def _commit(self, batch: list[CommitJob], *, wake: bool = True) -> None:
        journal = self.journal
        if journal is not None:
            small = [j for j in batch if j.journal and j.spool.size <= journal.max_record]
            if small:
                self._commit_journaled(journal, small)  # what it could not take stays not done
                batch = [j for j in batch if not j.done]
            if not batch:
                if wake:
                    _LoopWaker.flush_all()
                return
        self._commit_recipe(batch, wake=wake)

    def _commit_journaled(self, journal: Journal, jobs: list[CommitJob]) -> None:
        """The journal's path (module docstring of :mod:`.journal`): one record per job and one
        flush for all, then the renames. Jobs the journal could not take (its write failed, or
        they did not fit even after a checkpoint) are left not ``done``, for the recipe."""
        ready: list[CommitJob] = []
        for job in jobs:
            if job.place:
                try:
                    job.spool.trim()  # a reused file longer than this message: cut first
                except OSError as exc:  # reported to the session as 451, detail logged there
                    _cleanup_failed(job)
                    job.done = True
                    job.on_done(exc)
                    continue
            ready.append(job)
        jobs = ready
        if not jobs:
            return
        try:
            entries = [Entry(_read_spool(j.spool), j.links) for j in jobs]
        except OSError:
            return
        then = _placing(jobs)
        results: list[tuple[CommitJob, BaseException | None]] | None = None
        for attempt in (0, 1):
            with journal.lock:
                try:
                    # The renames run right after the records are durable, in the same call
                    # where that can be done; placed while the lock is held: a checkpoint
                    # covers only placed records.
                    errors = journal.append(entries, then, len(jobs))
                except JournalFull:
                    pass
                except Exception as exc:  # never lose the batch: the recipe takes it
                    log_event(log, "journal write failed, using fsync instead", logging.ERROR, error=str(exc))
                    return
                else:
                    results = [(job, _placed(job, errors[k]) if job.place else _defer(journal, job))
                               for k, job in enumerate(jobs)]
                    for job in jobs:
                        job.epoch = journal.epoch
            if results is not None:  # (no break inside the with: mypyc cannot compile one)
                break
            if attempt == 0:
                try:
                    journal.checkpoint()
                except OSError as exc:
                    log_event(log, "journal checkpoint failed, using fsync instead", logging.ERROR, error=str(exc))
                    return
        if results is None:  # full even after a checkpoint
            return
        for job, err in results:
            job.done = True
            job.on_done(err)

    def _commit_recipe(self, batch: list[CommitJob], *, wake: bool = True) -> None:
        errors: dict[int, BaseException] = {}
        dirs: dict[str, None] = {}
        for i, job in enumerate(batch):
            spool = job.spool
            spool.kept = None  # the recipe needs the file only
            try:
                spool.trim()
                os.fsync(spool.fd)
                _put_in_place(job)
                for target in job.links:
                    dirs[os.path.dirname(target) or "."] = None
            except BaseException as exc:  # reported to the session as 451, detail logged there
                errors[i] = exc
                _cleanup_failed(job)
        dir_error: BaseException | None = None
        for d in dirs:
            try:
                fsync_dir(d)
            except OSError as exc:
                dir_error = exc
        for i, job in enumerate(batch):
            err = errors.get(i) or dir_error
            if not job.keep_spool and i not in errors:
                try:
                    os.unlink(job.spool.spath)
                except OSError:
                    pass  # a leftover temp file is harmless and cleaned at start
            job.done = True
            job.on_done(err)
        if wake:
            _LoopWaker.flush_all()


def _read_spool(spool: SpoolFile) -> list[bytes]:
    """The spool's content for its journal record, as pieces: the ones it kept when written
    (released here: a record is made once), else read back from the file."""
    kept, spool.kept = spool.kept, None
    if kept is not None and sum(len(piece) for piece in kept) == spool.size:
        # Many small pieces (a client sending a line per packet) go as one: few iovecs per write.
        return kept if len(kept) <= 64 else [b"".join(kept)]
    data = os.pread(spool.fd, spool.size, 0)
    if len(data) != spool.size:
        raise OSError(f"spool {spool.path} is shorter than written")
    return [data]


def _defer(journal: Journal, job: CommitJob) -> BaseException | None:
    """A journaled job whose file stays where it is, open, under its temp name: the next
    checkpoint links it into place unless its owner removes it first (:meth:`.Journal.defer`;
    a queue item, which is nearly always delivered before that, so it never gets a name of
    its own). Call with the journal's lock held."""
    try:
        job.spool.trim()
    except OSError as exc:  # reported to the session as 451, detail logged there
        _cleanup_failed(job)
        return exc
    journal.defer(job.spool, functools.partial(_link_in_place, job.spool.spath, job.links))
    return None


def _link_in_place(path: str, targets: list[str]) -> None:
    """A deferred job's final names: hard links, so that its temp name, which readers were
    given, stays valid until its owner lets it go."""
    for target in targets:
        try:
            os.link(path, target)
        except FileExistsError:
            if not os.path.samefile(path, target):
                raise


def _put_in_place(job: CommitJob) -> None:
    """Close the job's file and give it its final names: renamed for a single destination
    (``keep_spool``), else hard-linked into each (the temp name is removed by the caller)."""
    spool = job.spool
    spool.kept = None
    os.close(spool.fd)
    spool.closed = True
    for target in job.links:
        if job.keep_spool:
            os.replace(spool.spath, target)
        else:
            os.link(spool.spath, target)


def _placing(jobs: list[CommitJob]) -> list[FileOp]:
    """What puts the journaled jobs' files in place once their records are durable (no fsync:
    the journal holds their bytes), as :meth:`.Journal.append` runs it: each file closed, then
    renamed into its one mailbox (``keep_spool``) or linked into each and its temp name removed.
    Jobs whose file stays where it is (``place`` false) have none."""
    ops: list[FileOp] = []
    for k, job in enumerate(jobs):
        if not job.place:
            continue
        spool = job.spool
        # (str.encode as os.fsencode does on POSIX: os.fsencode is Python code, not compiled)
        source = spool.spath.encode("utf-8", "surrogateescape")
        ops.append((OP_CLOSE, k, spool.fd, b""))
        for target in job.links:
            ops.append((OP_RENAME if job.keep_spool else OP_LINK, k, source, target.encode("utf-8", "surrogateescape")))
        if not job.keep_spool:
            ops.append((OP_UNLINK, k, source, b""))
    return ops


def _placed(job: CommitJob, err: int) -> BaseException | None:
    """A journaled job once its operations ran (:func:`_placing`): the error of the first one
    that failed, reported to the session as 451 (detail logged there), and its files removed."""
    spool = job.spool
    spool.kept = None
    spool.closed = True  # by its first operation (a failed close frees the descriptor too)
    if not err:
        return None
    _cleanup_failed(job)
    return OSError(err, os.strerror(err), spool.spath)


class _LoopWaker:
    """Coalesces the committer's "this job is durable" callbacks into one event-loop wake-up per
    batch (one ``call_soon_threadsafe`` instead of one per message: fewer self-pipe writes and
    thread switches). Used by :func:`commit_async` and :func:`commit_then`; results are
    delivered in order, each as ``callback(error or None)`` on the loop."""

    _instances: ClassVar[dict[int, _LoopWaker]] = {}
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, loop: object) -> None:
        self.loop = loop
        self.pending: list[tuple[Callable[[BaseException | None], None], BaseException | None]] = []

    @classmethod
    def for_loop(cls, loop: object) -> _LoopWaker:
        with cls._lock:
            waker = cls._instances.get(id(loop))
            if waker is None or waker.loop is not loop:
                # Forget closed loops (test suites make many) so they can be collected.
                for key, w in list(cls._instances.items()):
                    if w.loop.is_closed() and not w.pending:  # type: ignore[attr-defined]
                        del cls._instances[key]
                waker = cls._instances[id(loop)] = cls(loop)
            return waker

    def add(self, callback: Callable[[BaseException | None], None], err: BaseException | None) -> None:
        with self._lock:
            self.pending.append((callback, err))

    @classmethod
    def flush_all(cls) -> None:
        with cls._lock:
            ready = [(w, w.pending) for w in cls._instances.values() if w.pending]
            for w, _ in ready:
                w.pending = []
        for w, items in ready:
            try:
                w.loop.call_soon_threadsafe(_settle_all, items)  # type: ignore[attr-defined]
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                with cls._lock:
                    cls._instances.pop(id(w.loop), None)


def _settle_all(items: list[tuple[Callable[[BaseException | None], None], BaseException | None]]) -> None:
    for callback, err in items:
        callback(err)


def _settle_future(fut: Any, err: BaseException | None, result: Any = None) -> None:
    if fut.done():
        return
    if err is None:
        fut.set_result(result)
    else:
        fut.set_exception(err)


def _cleanup_failed(job: CommitJob) -> None:
    spool = job.spool
    if not spool.closed:
        spool.closed = True
        try:
            os.close(spool.fd)
        except OSError:
            pass
    for target in job.links:
        try:
            os.unlink(target)
        except OSError:
            pass
    try:
        os.unlink(spool.spath)
    except OSError:
        pass


def clean_tmp(tmp_dir: Path, older_than: float = 0.0) -> int:
    """Remove leftover temp files (from a crash) older than ``older_than`` seconds."""
    removed = 0
    now = time.time()
    try:
        entries = list(os.scandir(tmp_dir))
    except FileNotFoundError:
        return 0
    for entry in entries:
        try:
            if entry.is_file() and now - entry.stat().st_mtime >= older_than:
                os.unlink(entry.path)
                removed += 1
        except OSError:
            pass
    return removed


def final_name(unique: str, size: int) -> str:
    """``<unique>,S=<size>``: the size in the name lets POP3 list without a stat (Dovecot style)."""
    return f"{unique},S={size}"


def deliver_bytes(data_dir: Path, maildirs: list[Path], content: bytes) -> list[Path]:
    """Synchronously deliver ``content`` to each maildir with the durable recipe (for couriers
    and tools running in a worker thread). Returns the final paths."""
    tmp = data_dir / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    spool = SpoolFile(tmp)
    try:
        spool.write(content)
        os.fsync(spool.fd)
        os.close(spool.fd)
        spool.closed = True
        name = final_name(spool.path.name, spool.size)
        out: list[Path] = []
        for md in maildirs:
            ensure_maildir(md)
            target = md / "new" / name
            os.link(spool.path, target)
            out.append(target)
        for md in {p.parent for p in out}:
            fsync_dir(md)
        return out
    finally:
        spool.discard()


async def commit_async(committer: Committer, spool: SpoolFile, links: Sequence[str | os.PathLike[str]], *, keep_spool: bool = False,
                       journal: bool = False) -> int | None:
    """Run the durable recipe for ``spool`` in ``committer`` and wait for it; raise on failure.
    Returns the journal epoch the job was appended in (None: it took the recipe).

    The future is settled on the event loop once the committer's batch holding this job is
    durable (one wake-up per batch, see :class:`_LoopWaker`)."""
    (epoch,) = await commit_all_async(committer, [(spool, links)], keep_spool=keep_spool, journal=journal)
    return epoch


async def commit_all_async(committer: Committer, jobs: Sequence[tuple[SpoolFile, Sequence[str | os.PathLike[str]]]], *,
                           keep_spool: bool = False, journal: bool = False, place: bool = True) -> list[int | None]:
    """:func:`commit_async` for several files at once (a queue item's data file and its
    envelope): one future for all of them instead of a task per file and a gather. Returns once
    every job has ended: their journal epochs, in order, or raises the first job's error (the
    others have ended too, so the caller may clean up every file)."""
    import asyncio

    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    waker = _LoopWaker.for_loop(loop)
    left = len(jobs)
    first_error: list[BaseException] = []

    def settled(err: BaseException | None) -> None:  # on the event loop, once per job
        nonlocal left
        if err is not None and not first_error:
            first_error.append(err)
        left -= 1
        if left == 0:
            _settle_future(fut, first_error[0] if first_error else None)

    def done(err: BaseException | None) -> None:  # runs in a committer thread
        waker.add(settled, err)

    made = [CommitJob(spool, links, done, keep_spool=keep_spool, journal=journal, place=place) for spool, links in jobs]
    if not made:
        return []
    for job in made:
        committer.submit(job)
    await fut
    return [job.epoch for job in made]


async def call_async(committer: Committer, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` in ``committer``'s thread (:meth:`Committer.call`) and return its result, or
    raise its error, once the batch it was part of has been answered on the event loop."""
    import asyncio

    fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    call_then(committer, fn, lambda result, err: _settle_future(fut, err, result))  # on the event loop
    return await fut


def call_then(committer: Committer, fn: Callable[[], Any], callback: Callable[[Any, BaseException | None], None]) -> None:
    """Run ``fn`` in ``committer``'s thread (:meth:`Committer.call`); ``callback(result,
    error)`` runs on the running event loop, with the answers of the batch it was part of."""
    import asyncio

    waker = _LoopWaker.for_loop(asyncio.get_running_loop())

    def done(result: Any, err: BaseException | None) -> None:  # runs in the committer thread
        waker.add(functools.partial(callback, result), err)

    committer.call(CallJob(fn, done))


def commit_then(committer: Committer, spool: SpoolFile, links: Sequence[str | os.PathLike[str]],
                callback: Callable[[BaseException | None], None], *, keep_spool: bool = False,
                journal: bool = False) -> CommitJob:
    """Run the durable recipe for ``spool`` in ``committer``; ``callback(error or None)`` runs
    on the running event loop once the batch holding the job is durable (or failed). For a
    caller that needs no coroutine (a session answering once its message is on disk)."""
    import asyncio

    waker = _LoopWaker.for_loop(asyncio.get_running_loop())

    def done(err: BaseException | None) -> None:  # runs in a committer thread
        waker.add(callback, err)

    job = CommitJob(spool, links, done, keep_spool=keep_spool, journal=journal)
    committer.submit(job)
    return job


class Recycler:
    """Blanked files kept for reuse instead of deleted (see the module docstring).

    :meth:`put` moves a file the server no longer needs into the recycling directory under this
    process's own prefix and blanks it there (:func:`.fsutil.blank`: a queue item's content
    does not linger, and its blocks stay allocated for the next use);
    :meth:`take` hands one back for a spool pool. At most ``limit`` are kept; past that, files
    are deleted as before. With ``share`` (several worker processes: each removes the queue
    items it delivered, but the one that removes more than it receives should not delete files
    another could use), a process holding more than half its
    limit renames further files to a ``shared-`` name, which it never touches again, and a
    process with none of its own claims one by renaming it to its own prefix: a rename succeeds
    for one claimant only, so no file is ever in two hands. Every file here is garbage by
    definition: the start-up cleaning removes them, and a new Recycler first removes the ones
    its predecessor under the same ``prefix`` (a restarted worker) left. Thread-safe (the queue
    removes files in worker threads, pools refill in others).
    """

    SHARED: ClassVar[str] = "shared-"

    def __init__(self, directory: Path, prefix: str = "r", limit: int = 256, *, share: bool = False) -> None:
        self.dir = directory
        self.prefix = f"{prefix}-"
        self.limit = limit
        self.share = share
        self._free: collections.deque[Path] = collections.deque()
        self._seq = itertools.count(1)
        self._lock = threading.Lock()
        self._offered: list[str] = []  # shared names seen at the last scan, not yet tried
        self._next_scan = 0.0
        self._recount_in = 0  # surplus files until the shared ones are counted again
        self._offering = True
        directory.mkdir(parents=True, exist_ok=True)
        with os.scandir(directory) as it:
            for entry in it:
                if entry.name.startswith(self.prefix):
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)

    def __len__(self) -> int:
        return len(self._free)

    def put(self, path: Path, *, blank_first: bool = False) -> None:
        """Take ``path`` out of its directory (a rename: the same commit point as an unlink) and
        keep it, blanked (deleted instead when the limit is reached). ``blank_first``: blank it
        before the rename, for a file nobody can read any more (a queue item's data once its
        envelope is gone); otherwise it is blanked right after. Raises like ``os.unlink``
        (``FileNotFoundError`` when ``path`` is already gone)."""
        held = len(self._free)
        # A file with a second name (a hard link) is not only ours: it is never blanked here.
        if held >= self.limit or os.stat(path).st_nlink != 1:
            os.unlink(path)
            return
        target = self._private_name()
        if blank_first:
            blank(path)
        try:
            os.rename(path, target)
        except OSError:
            if not os.path.lexists(path):
                raise  # gone meanwhile: FileNotFoundError, as os.unlink would say
            os.unlink(path)  # our directory is unusable (removed by hand?): delete as before
            return
        if not blank_first:
            try:
                blank(target)
            except OSError:
                with contextlib.suppress(OSError):
                    os.unlink(target)
                return
        if self.share and held >= self.limit // 2:
            if self._may_offer():
                with contextlib.suppress(OSError):
                    os.rename(target, self.dir / f"{self.SHARED}{target.name}")
                    return
            else:
                with contextlib.suppress(OSError):
                    os.unlink(target)
                return
        with self._lock:
            self._free.append(target)

    def take(self) -> Path | None:
        with self._lock:
            if self._free:
                return self._free.popleft()
        return self._claim() if self.share else None

    def _may_offer(self) -> bool:
        """Fewer than ``limit`` shared files wait (counted once every 32 surplus files)."""
        with self._lock:
            if self._recount_in <= 0:
                with os.scandir(self.dir) as it:
                    waiting = sum(1 for e in it if e.name.startswith(self.SHARED))
                self._offering = waiting < self.limit
                self._recount_in = 32
            self._recount_in -= 1
            return self._offering

    def _private_name(self) -> Path:
        return self.dir / f"{self.prefix}{next(self._seq)}"

    def _claim(self) -> Path | None:
        """A file another process offered, renamed to this process's prefix; None if none."""
        with self._lock:
            if not self._offered:
                now = time.monotonic()
                if now < self._next_scan:
                    return None
                self._next_scan = now + 0.02  # not a scan per file of a pool's refill
                with os.scandir(self.dir) as it:
                    self._offered = [e.name for e in it if e.name.startswith(self.SHARED)]
            while self._offered:
                target = self._private_name()
                try:
                    os.rename(self.dir / self._offered.pop(), target)
                except FileNotFoundError:
                    continue  # another process claimed it first
                return target
        return None


class SpoolPool:
    """Empty temp files made ahead of need in a worker thread.

    Creating a file is a blocking metadata operation (about half a millisecond on the
    reference disk) that would otherwise run on the event loop for every message. ``take()``
    hands out a ready file (oldest first) and tops the pool up in a thread when it runs low;
    when it is empty the file is made inline, as before. Spares are ordinary temp files: the
    start-up cleaning of their directory removes any a crash left behind, and :meth:`close`
    removes them at stop.
    """

    def __init__(self, tmp_dir: Path, size: int = 32, recycler: Recycler | None = None) -> None:
        self.tmp_dir = tmp_dir
        self._tmp = os.fspath(tmp_dir)  # for SpoolFile, as a string
        self.recycler = recycler
        self.size = size
        self._spares: collections.deque[SpoolFile] = collections.deque()
        self._refilling = False
        self._generation = 0  # bumped by close(), so a refill begun before it keeps nothing
        self._closed = False  # give() keeps nothing after close()
        self._lock = threading.Lock()
        self._requests: queue.SimpleQueue[int | None] | None = None  # to the refill thread
        self._filler: threading.Thread | None = None
        self._owner = 0  # the process that started it (a forked child starts its own)

    def __len__(self) -> int:
        return len(self._spares)

    def take(self) -> SpoolFile:
        """A fresh, empty spool file (call on the event loop)."""
        spool = self._spares.popleft() if self._spares else None
        if spool is not None:
            # Named when used, not when made: Maildir names carry the time. The file stays
            # where it was made (a rename per message cost more than it saved).
            spool.name = unique_name()
        if len(self._spares) < self.size // 2 and not self._refilling and self.size > 0:
            self._refilling = True
            self._ask_refill()
        return spool if spool is not None else SpoolFile(self._tmp)

    def _ask_refill(self) -> None:
        """Hand a refill to the pool's own thread (started at the first one). Not the event
        loop's executor: asyncio.to_thread and the executor's futures are Python code, not
        compiled, about 1% of a message's CPU at one session with a refill every 16 files."""
        requests = self._requests
        if requests is None or self._owner != os.getpid():  # none yet, or started before a fork
            requests = self._requests = queue.SimpleQueue()
            self._owner = os.getpid()
            self._filler = threading.Thread(target=self._filling, args=(requests,), name="spool-pool", daemon=True)
            self._filler.start()
        requests.put(self._generation)

    def _filling(self, requests: queue.SimpleQueue[int | None]) -> None:
        """The pool's thread: one refill per request, until :meth:`close` sends None. It adds
        each file to the pool as it makes it."""
        while True:
            generation = requests.get()
            if generation is None:
                return
            try:
                self._fill(self.size - len(self._spares), generation)
            except OSError:
                pass  # the next take() makes its own file and tries again
            finally:
                self._refilling = False

    def _fill(self, n: int, generation: int) -> None:
        for spool in self.make(n):
            with self._lock:
                if generation != self._generation:  # closed since this refill began
                    spool.discard()
                else:
                    self._spares.append(spool)

    def make(self, n: int) -> list[SpoolFile]:
        """``n`` empty spool files, reused ones first (runs in a worker thread). The new ones
        are created in one call where the C module is built (``_commit.create_files``): one
        return into the interpreter's lock for the whole refill instead of one per file, each
        of them waited for while the event loop holds it."""
        out: list[SpoolFile] = []
        try:
            fresh = 0
            for _ in range(n):
                old = self.recycler.take() if self.recycler is not None else None
                if old is not None:
                    try:
                        out.append(SpoolFile.reuse(old))
                        continue
                    except OSError:
                        with contextlib.suppress(OSError):
                            os.unlink(old)
                if _create_files is None:
                    out.append(SpoolFile(self._tmp))
                else:
                    fresh += 1
            if fresh and _create_files is not None:
                names = [unique_name() for _ in range(fresh)]
                fds = _create_files(os.fsencode(self.tmp_dir), [os.fsencode(name) for name in names])
                out += [SpoolFile(self._tmp, reuse=name, made=fd) for name, fd in zip(names, fds, strict=True) if fd >= 0]
                if not out:
                    raise OSError(-fds[0], f"cannot create a spool file in {self.tmp_dir}: {os.strerror(-fds[0])}")
        except OSError:
            if not out:
                raise
        return out

    def give(self, spool: SpoolFile) -> None:
        """Take back a spool file that nothing reads or names any more (a delivered queue
        item's, still open under its temp name only; any thread): written over by its next
        user and cut to length at its commit, with no system call to make it ready but a
        seek. Discarded instead when the pool is full or closed."""
        with self._lock:
            keep = not spool.closed and not self._closed and len(self._spares) < 2 * self.size
            if keep:
                try:
                    os.lseek(spool.fd, 0, os.SEEK_SET)
                except OSError:
                    keep = False
            if keep:
                spool.stale = max(spool.stale, spool.size)
                spool.size = 0
                spool.kept = []
                self._spares.append(spool)
                return
        spool.discard()

    def close(self) -> None:
        """Remove the unused spares (server stop); a refill still running discards its files,
        and the refill thread ends (waited for: its files are gone when this returns)."""
        with self._lock:
            self._generation += 1
            self._closed = True
            spares, self._spares = self._spares, type(self._spares)()
        for sp in spares:
            sp.discard()
        requests, filler = self._requests, self._filler
        self._requests = self._filler = None  # a pool taken from again gets a new thread
        if requests is not None:
            requests.put(None)
        if filler is not None and filler is not threading.current_thread():
            filler.join(timeout=10)
