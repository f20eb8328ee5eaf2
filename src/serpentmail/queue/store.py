"""The durable outbound spool: one data file and one envelope file per queued message.

Layout under ``data_dir/queue``::

    data/<id>        the message (trace headers included, no Return-Path), never rewritten
    env/<id>.json    the envelope: sender, arrival, size, flags, per-recipient state
    tmp/             envelope rewrites in progress (temp + fsync + rename), new envelopes
                     being committed, and a few empty files kept ready for new envelopes
    control/         requests from the ``queue`` CLI to a running scheduler (flush, retry)

Invariants (see docs/queue-states.md for the full table):

* Queue state is which files exist. An item exists when both ``data/<id>`` and
  ``env/<id>.json`` exist. Every write follows the one durable recipe (temp file, fsync,
  rename, fsync the directory), so a reader sees the old or the new envelope, never half of one.
* The enqueue path commits the data file and the first envelope through the server's
  :class:`~serpentmail.storage.maildir.Committer` (group commit); :meth:`QueueStore.enqueue`
  returns the id only after both are durable, so the SMTP 250 comes after the commit point
  (RFC 5321 §6.1: once we say 250 we are responsible for the message).
* Crash recovery (:meth:`QueueStore.recover`, at start only): an envelope without its data
  file was never acknowledged (the data is committed in the same batch) → discarded; a data
  file without an envelope was never acknowledged either → removed. Nothing half-written is
  ever resurrected.
* Removal deletes the envelope first (the commit point of "gone", made durable by an fsync of
  ``env/``, one for a whole batch of removals), then the data file.
* With ``journal=True`` (the scheduler's process), new items go through the delivery journal
  (one flush, no fsync of the files or directories) and are not given their names: their two
  spool files, held open, are the item until the journal's next checkpoint links them into
  ``data/`` and ``env/`` (:meth:`Journal.defer`); an item delivered before that is removed
  with a removal record, no file ever made, and its spools go back to their pools
  (:meth:`QueueStore._remove_journaled`; docs/queue-states.md, "Journaled items"). Such an
  item is on disk only in the journal, so the CLI reads journals too (``read_journals``).
* With several worker processes the queue is partitioned among them by id
  (:func:`owner_of`): each worker makes ids of its own partition, journals, delivers,
  retries and removes its own items, and never touches another's (``partition``).
* Listing reads envelopes only (small JSON), never message bodies: :meth:`QueueStore.scan`
  yields one envelope at a time, so 100,000 queued messages are never all in memory.

All methods except :meth:`QueueStore.enqueue` and :meth:`QueueStore.remove_batched` are
blocking file operations: the scheduler calls them from a worker thread, never on the event
loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import random
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..storage.fsutil import fsync_dir, write_durably
from ..storage.journal import REMOVED, JournalFull, pending_records
from ..storage.maildir import (
    Committer,
    Recycler,
    SpoolFile,
    SpoolPool,
    call_async,
    commit_all_async,
)

RecipientState = Literal["pending", "delivered", "failed"]
ENVELOPE_VERSION = 1
# Empty temp files kept ready for new envelopes (see QueueStore._env_spool).
SPARE_ENVELOPE_FILES = 32
# Journaled items held in their open spool files at once, per process (two descriptors each);
# past that, new items are placed at once (see QueueStore.enqueue).
HELD_MAX = 256
REQUEST_TTL = 10.0  # seconds a request for every item stays for the other workers to see
_ID_RE = re.compile(r"^[0-9A-Z]{8,40}$")


class QueueError(ValueError):
    """A user-facing queue problem (unknown id, bad id)."""


_RANDOM = slice(14, 20)  # the 24 random bits of an id new_queue_id made (6 hex digits)
_RANDOM_SPAN = 1 << 24


def new_queue_id(now: float | None = None, owner: tuple[int, int] | None = None) -> str:
    """A sortable id: microseconds since the epoch (hex) then 24 random bits.

    Ids are made of ``[0-9A-Z]`` only, so they are safe as file names and in CLI arguments.
    ``owner`` = (index, count): the random bits are chosen so that :func:`owner_of` gives
    ``index`` (the worker process that makes the id owns the item).
    """
    micros = int((time.time() if now is None else now) * 1_000_000)
    # Not a secret, only unique with the time: the random module's generator, which Python
    # reseeds in a forked child (secrets.randbits was a getrandom(2) call per message).
    bits = random.getrandbits(24)
    if owner is not None:
        index, count = owner
        bits += index - bits % count
        if bits >= _RANDOM_SPAN:
            bits -= count
    return f"{micros:014X}{bits:06X}"


def owner_of(qid: str, count: int) -> int:
    """The worker (0 .. count-1) that owns queue item ``qid`` when ``count`` workers share the
    queue: its 24 random bits modulo ``count``. A DSN's id is its message's id plus a suffix,
    so a bounce belongs to the worker that owns the message. An id of another shape (a test's,
    a tool's) belongs to worker 0."""
    digits = qid[_RANDOM]
    if count <= 1 or len(digits) != 6:
        return 0
    try:
        return int(digits, 16) % count
    except ValueError:
        return 0


def valid_id(qid: str) -> bool:
    return bool(_ID_RE.match(qid))


@dataclass(slots=True)
class RecipientRecord:
    address: str
    state: RecipientState = "pending"
    attempts: int = 0
    last_reply: str = ""
    last_attempt: float | None = None
    next_attempt: float = 0.0
    remote_mta: str | None = None
    diagnostic_type: str = "smtp"
    notified: bool = False  # a failure DSN listing this recipient has been queued
    expired: bool = False  # failed because max_lifetime passed with only temporary errors

    @property
    def domain(self) -> str:
        return domain_of(self.address)

    def to_dict(self) -> dict[str, Any]:
        """As ``dataclasses.asdict``, without its deep copy (see :meth:`EnvelopeRecord.to_dict`)."""
        return {
            "address": self.address,
            "state": self.state,
            "attempts": self.attempts,
            "last_reply": self.last_reply,
            "last_attempt": self.last_attempt,
            "next_attempt": self.next_attempt,
            "remote_mta": self.remote_mta,
            "diagnostic_type": self.diagnostic_type,
            "notified": self.notified,
            "expired": self.expired,
        }


@dataclass(slots=True)
class EnvelopeRecord:
    id: str
    sender: str
    arrival: float
    size: int
    recipients: list[RecipientRecord]
    smtputf8: bool = False
    body_8bit: bool = False
    warned: bool = False  # a delay DSN (Action: delayed) has been queued
    dsn_count: int = 0  # DSNs generated so far (makes DSN ids deterministic: <id>B<n>)
    version: int = ENVELOPE_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pending(self) -> list[RecipientRecord]:
        return [r for r in self.recipients if r.state == "pending"]

    @property
    def done(self) -> bool:
        return not self.pending

    def next_due(self) -> float | None:
        due = [r.next_attempt for r in self.recipients if r.state == "pending"]
        return min(due) if due else None

    def pending_domains(self) -> frozenset[str]:
        return frozenset(r.domain for r in self.recipients if r.state == "pending")

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of the envelope: what ``dataclasses.asdict`` gives, built by hand
        (asdict deep-copies every value; it was a visible share of the per-message CPU).
        A test checks this stays equal to asdict, so a new field cannot be forgotten here."""
        return {
            "id": self.id,
            "sender": self.sender,
            "arrival": self.arrival,
            "size": self.size,
            "recipients": [r.to_dict() for r in self.recipients],
            "smtputf8": self.smtputf8,
            "body_8bit": self.body_8bit,
            "warned": self.warned,
            "dsn_count": self.dsn_count,
            "version": self.version,
            "extra": self.extra,
        }

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), ensure_ascii=False, sort_keys=True).encode("utf-8")

    @classmethod
    def from_json(cls, raw: bytes) -> EnvelopeRecord:
        obj = json.loads(raw)
        if not isinstance(obj, dict) or obj.get("version") != ENVELOPE_VERSION:
            raise ValueError("unknown envelope version")
        rcpts = [RecipientRecord(**r) for r in obj.pop("recipients")]
        return cls(recipients=rcpts, **obj)


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower().rstrip(".")


class QueueStore:
    """Files of the outbound queue. Thread-safe for distinct ids; one writer per id."""

    def __init__(self, data_dir: Path, committer: Committer | None = None,
                 clock: Any = time.time, recycler: Recycler | None = None, *, journal: bool = False,
                 partition: tuple[int, int] | None = None, read_journals: bool = False) -> None:
        self.data_dir = data_dir
        self.root = data_dir / "queue"
        self.data = self.root / "data"
        self.env = self.root / "env"
        self.tmp = self.root / "tmp"
        self.control = self.root / "control"
        self.spool_tmp = data_dir / "tmp"
        self._data_str, self._env_str = os.fspath(self.data), os.fspath(self.env)
        self.committer = committer
        self.clock = clock
        # The server's: removed items' files are kept for reuse (storage/maildir.py explains why).
        self.recycler = recycler
        # The committer's delivery journal takes new items (``journal``: the process that also
        # removes them, since a removal is recorded in the journal holding the item; with
        # workers, each journals its own share: see :meth:`remove_many`).
        self.journal = committer.journal if journal and committer is not None else None
        # (index, count): this process's share of the queue (see owner_of); None: all of it.
        self.partition = partition if partition is not None and partition[1] > 1 else None
        # The CLI's view: items a server holds only in its journal (accepted within the last
        # second, never placed) are listed too, read from the journal files.
        self.read_journals = read_journals
        # Control requests for every item that this process has already acted on (the last
        # worker to see one removes it: :meth:`take_requests`).
        self._requests_seen: set[str] = set()
        # Items this process journaled: id -> the journal epoch of their two records.
        self._journaled: dict[str, int] = {}
        # Journaled items whose files are still their open spools (data, envelope) under their
        # temp names: see "Journaled items" in docs/queue-states.md.
        self._spools: dict[str, tuple[SpoolFile, SpoolFile]] = {}
        # Where a delivered item's data spool goes back to (the server's session pool).
        self.data_pool: SpoolPool | None = None
        self.held_max = HELD_MAX
        # remove_batched: requests waiting for the next batch, on one event loop.
        self._rm_loop: asyncio.AbstractEventLoop | None = None
        self._rm_pending: list[tuple[str, asyncio.Future[bool]]] = []
        self._rm_running = False
        self._rm_task: asyncio.Task[None] | None = None
        # Empty envelope temp files made in a worker thread (tmp/, cleaned by recover()).
        self.spares = SpoolPool(self.tmp, SPARE_ENVELOPE_FILES, recycler)
        for d in (self.data, self.env, self.tmp, self.control, self.spool_tmp):
            d.mkdir(parents=True, exist_ok=True)

    # --- paths ---------------------------------------------------------------------------

    def data_path(self, qid: str) -> Path:
        return self.data / qid

    def env_path(self, qid: str) -> Path:
        return self.env / f"{qid}.json"

    # --- enqueue -------------------------------------------------------------------------

    def _new_record(self, qid: str, sender: str, recipients: list[str], size: int,
                    smtputf8: bool, body_8bit: bool) -> EnvelopeRecord:
        now = float(self.clock())
        seen: set[str] = set()
        rcpts = []
        for r in recipients:
            if r.lower() not in seen:
                seen.add(r.lower())
                rcpts.append(RecipientRecord(r, next_attempt=now))
        return EnvelopeRecord(qid, sender, now, size, rcpts, smtputf8, body_8bit)

    async def enqueue(self, spool: SpoolFile, sender: str, recipients: list[str], *,
                      smtputf8: bool = False, body_8bit: bool = False,
                      qid: str | None = None) -> EnvelopeRecord:
        """Commit ``spool`` as a new queue item and return its envelope once it is durable.

        The data file and the envelope are two jobs of one group commit: each is fsync'd,
        renamed into place, and both directories are fsync'd before this returns. If either
        fails, both are removed and the error is raised (the session answers 451).
        """
        qid = qid or new_queue_id(self.clock(), self.partition)
        record = self._new_record(qid, sender, recipients, spool.size, smtputf8, body_8bit)
        env_spool = self._env_spool()
        try:
            env_spool.write(record.to_json())
        except BaseException:
            env_spool.discard()
            raise
        jobs = [(spool, self.data_path(qid)), (env_spool, self.env_path(qid))]
        loop = asyncio.get_running_loop()
        if self.committer is None:
            await loop.run_in_executor(None, _commit_sync, jobs)
            return record
        # Journaled items are not given their names: the checkpoint links whatever is still queued
        # by then (Journal.defer), the rest is delivered and removed without ever being placed.
        journal = self.journal
        defer = journal is not None and spool.size <= journal.max_record and len(self._spools) < self.held_max
        try:
            # Both files in one call: they land in the same batch, and one future waits for both.
            epochs = await commit_all_async(self.committer, [(sp, [target]) for sp, target in jobs],
                                            keep_spool=True, journal=journal is not None, place=not defer)
        except Exception:
            await loop.run_in_executor(None, self.remove, qid)
            raise
        data_epoch, env_epoch = epochs
        if data_epoch is not None and env_epoch is not None:
            self._journaled[qid] = min(data_epoch, env_epoch)
            if defer:
                self._spools[qid] = (spool, env_spool)
        elif defer and journal is not None:
            # One file took the journal, the other the recipe (the two jobs may land in two
            # batches, the second one finding the journal full; or an envelope bigger than a
            # journal record): the deferred one is placed now and its temp name let go.
            await loop.run_in_executor(None, self._settle, (spool, env_spool))
        return record

    def _settle(self, spools: tuple[SpoolFile, SpoolFile]) -> None:
        """Give a journaled item's files their names now, if the checkpoint has not, and let go
        of the temp names (blocking: a worker thread). Raises OSError when a link fails: the
        files stay deferred, and the checkpoint tries again."""
        journal = self.journal
        assert journal is not None
        for sp in spools:
            journal.place_now(sp)
        for sp in spools:
            sp.discard()  # the temp name only: the placed name stays

    def data_file(self, qid: str) -> Path:
        """Where to read the message of ``qid`` from: its spool while this process holds it
        (valid until the item is removed), else ``data/<id>``."""
        both = self._spools.get(qid)
        return both[0].path if both is not None else self.data_path(qid)

    def data_fd(self, qid: str) -> int:
        """The open descriptor of the message of ``qid`` while this process holds its spool
        (it stays open until the item's pass has ended: removal and envelope rewrites come
        after it), else -1."""
        both = self._spools.get(qid)
        return both[0].fd if both is not None and not both[0].closed else -1

    def forget(self, qid: str) -> None:
        """Drop this process's hold on the spools of an item found gone (``queue delete`` of
        an item already placed)."""
        both = self._spools.pop(qid, None)
        if both is not None and self.journal is not None:
            with self.journal.place_lock:  # (the event loop: never the lock a flush holds)
                if any(sp in self.journal.unplaced for sp in both):
                    self._spools[qid] = both  # not placed: nothing can have deleted it
                    return
            for sp in both:
                sp.discard()

    def _env_spool(self) -> SpoolFile:
        """An empty temp file for a new envelope, made ahead in a worker thread (SpoolPool)."""
        return self.spares.take()

    def discard_spares(self) -> None:
        """Close and unlink the spare envelope files (server stop)."""
        self.spares.close()

    def enqueue_bytes(self, content: bytes, sender: str, recipients: list[str], *,
                      qid: str | None = None, smtputf8: bool = False) -> EnvelopeRecord | None:
        """Blocking enqueue of a message held in memory (DSNs, tools). With an explicit
        ``qid`` that already exists, nothing is written and None is returned: this makes DSN
        generation idempotent across a crash (the DSN id is derived from the original id)."""
        qid = qid or new_queue_id(self.clock(), self.partition)
        if self.env_path(qid).exists():
            return None
        record = self._new_record(qid, sender, recipients, len(content), smtputf8, False)
        data_spool = SpoolFile(self.spool_tmp)
        env_spool = SpoolFile(self.spool_tmp)
        try:
            data_spool.write(content)
            env_spool.write(record.to_json())
        except BaseException:
            data_spool.discard()
            env_spool.discard()
            raise
        _commit_sync([(data_spool, self.data_path(qid)), (env_spool, self.env_path(qid))])
        return record

    # --- reading -------------------------------------------------------------------------

    def journal_items(self) -> dict[str, tuple[bytes, bytes]]:
        """Items that only a journal holds (``read_journals``): id -> (envelope, message). A
        server gives a journaled item its files only at the checkpoint after its acceptance,
        and none at all if it is delivered before that; a server killed meanwhile leaves them
        for the replay at its next start. Records cut short or of an old lap are not read."""
        envs: dict[str, bytes] = {}
        datas: dict[str, bytes] = {}
        removed: set[str] = set()
        for targets, content in pending_records(self.data_dir):
            for t in targets:
                if t.startswith(REMOVED):
                    removed.add(t[len(REMOVED):])
                elif t.startswith("queue/env/") and t.endswith(".json"):
                    envs[t[len("queue/env/"):-len(".json")]] = content
                elif t.startswith("queue/data/"):
                    datas[t[len("queue/data/"):]] = content
        return {q: (env, datas[q]) for q, env in envs.items()
                if q in datas and f"queue/env/{q}.json" not in removed and valid_id(q)}

    def _journal_item(self, qid: str) -> tuple[bytes, bytes] | None:
        if not self.read_journals:
            return None
        return self.journal_items().get(qid)

    def load(self, qid: str) -> EnvelopeRecord | None:
        """The envelope of ``qid``, or None when the item is gone (delivered, deleted)."""
        both = self._spools.get(qid)
        path = both[1].path if both is not None else self.env_path(qid)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            held = self._journal_item(qid)
            if held is None:
                return None
            raw = held[0]
        rec = EnvelopeRecord.from_json(raw)
        # A spool read just as its item was removed may already hold another's envelope.
        return rec if rec.id == qid else None

    def exists(self, qid: str) -> bool:
        # Runs on the event loop once per delivery pass: plain strings, no Path objects made.
        both = self._spools.get(qid)
        if both is not None and self.journal is not None and both[0] in self.journal.unplaced:
            return True  # not placed yet: nothing but this process can have removed it
        if os.path.exists(f"{self._env_str}/{qid}.json") and os.path.exists(f"{self._data_str}/{qid}"):
            return True
        return self._journal_item(qid) is not None

    def owns(self, qid: str) -> bool:
        """Whether ``qid`` is in this process's partition (always, without one)."""
        return self.partition is None or owner_of(qid, self.partition[1]) == self.partition[0]

    def ids(self) -> Iterator[str]:
        """Ids of items with an envelope, in no particular order (scandir, no sort in memory);
        with a ``partition``, only this process's."""
        if self.partition is None:
            return self.all_ids()
        return (qid for qid in self.all_ids() if self.owns(qid))

    def all_ids(self) -> Iterator[str]:
        """:meth:`ids` of every partition."""
        with os.scandir(self.env) as it:
            for entry in it:
                name = entry.name
                if name.endswith(".json") and valid_id(name[:-5]):
                    yield name[:-5]

    def scan(self) -> Iterator[EnvelopeRecord]:
        """Every complete item's envelope, one at a time (bodies are never read); with
        ``read_journals``, the items only a journal holds as well."""
        if self.read_journals:
            for qid, (env, _data) in self.journal_items().items():
                if self.owns(qid) and not self.env_path(qid).exists():
                    try:
                        yield EnvelopeRecord.from_json(env)
                    except ValueError:
                        continue
        for qid in self.ids():
            if not self.data_path(qid).exists():
                continue  # being enqueued right now, or being removed
            try:
                rec = self.load(qid)
            except (OSError, ValueError):
                continue
            if rec is not None:
                yield rec

    def read_headers(self, qid: str, limit: int = 64 * 1024) -> bytes:
        """The header section of the message (for DSNs), at most ``limit`` bytes."""
        try:
            with open(self.data_file(qid), "rb") as f:
                head = f.read(limit)
        except FileNotFoundError:
            held = self._journal_item(qid)
            if held is None:
                raise
            head = held[1][:limit]
        end = head.find(b"\r\n\r\n")
        if end < 0:
            end = head.find(b"\n\n")
            return head if end < 0 else head[: end + 2]
        return head[: end + 4]

    # --- updating ------------------------------------------------------------------------

    def save(self, record: EnvelopeRecord) -> bool:
        """Atomically replace the envelope. Returns False (and writes nothing) when the item
        was removed meanwhile (``queue delete``), so a deleted item is not resurrected."""
        both = self._spools.pop(record.id, None)
        if both is not None:
            # The item stays queued: it gets its names now, and lets go of its spools.
            try:
                self._settle(both)
            except BaseException:
                self._spools[record.id] = both
                raise
        if not self.data_path(record.id).exists():
            return False
        tmp = self.tmp / f"{record.id}.{os.getpid()}.{secrets.token_hex(4)}"
        write_durably(tmp, record.to_json(), self.env_path(record.id))
        return True

    def remove(self, qid: str) -> bool:
        """Remove an item: envelope first (the commit point), then data. True if it existed."""
        return qid in self.remove_many([qid])

    def remove_many(self, qids: list[str]) -> set[str]:
        """Remove several items with ONE directory fsync: every envelope is unlinked, then
        ``env/`` is fsync'd (the commit point of "gone" for all of them), then the data files
        are unlinked. Their directory is not fsync'd: a data file that comes back after a
        crash has no envelope and :meth:`recover` removes it. Returns the ids that existed.
        With a :class:`Recycler` (the server), "unlinked" means renamed into its directory and
        blanked: the same commit point, and the files are reused for new spools."""
        existed: set[str] = set()
        if self._journaled:
            fast = self._remove_journaled(qids)
            qids = [q for q in qids if q not in fast]
        else:
            fast = set()
        for qid in qids:
            try:
                self._discard(self.env_path(qid))
                existed.add(qid)
            except FileNotFoundError:
                continue
        if existed:
            fsync_dir(self.env)
        existed |= fast
        for qid in qids:
            try:
                self._discard(self.data_path(qid), blank_first=True)
                existed.add(qid)
            except FileNotFoundError:
                continue
        for qid in qids:
            both = self._spools.pop(qid, None)
            if both is not None:
                self._give_back(both)  # their placed names are gone: nothing else names them
        return existed

    def _give_back(self, spools: tuple[SpoolFile, SpoolFile]) -> None:
        """A removed item's spools, open, to the pools they serve (no file made or blanked)."""
        data, env = spools
        if self.data_pool is not None:
            self.data_pool.give(data)
        else:
            data.discard()
        self.spares.give(env)

    def _discard(self, path: Path, *, blank_first: bool = False) -> None:
        """Unlink a queue file, or hand it to the recycler (the same commit point); raises
        FileNotFoundError when it is already gone."""
        if self.recycler is None:
            os.unlink(path)
        else:
            self.recycler.put(path, blank_first=blank_first)

    def _remove_journaled(self, qids: list[str]) -> set[str]:
        """Remove, without any flush, the items of ``qids`` whose journal records no checkpoint
        has covered yet (in submission, nearly every item: it is delivered within
        milliseconds). A removal record goes to the journal first, then the files go, all
        under the journal's lock, so the next checkpoint's flush covers the removal too.

        Why this is safe: until that checkpoint, a crash leaves the item's records pending,
        and the replay either finishes the recorded removal or, if an operating-system crash
        lost the record, writes the item again from the journal (delivered twice, never lost,
        never with a recycled file's bytes). An item already covered by a checkpoint takes
        the durable removal instead. Returns the ids removed here."""
        journal = self.journal
        assert journal is not None
        done: set[str] = set()
        covered = False  # some are in a checkpoint's snapshot: that checkpoint may be running
        unrecorded = False  # the removal record could not be written
        with journal.lock:
            epoch = journal.epoch
            fresh = []
            for q in qids:
                e = self._journaled.pop(q, None)
                if e == epoch:
                    fresh.append(q)
                elif e is not None:
                    covered = True
            if len(self._journaled) > 4096:  # ids of items still queued from earlier epochs
                # In place: the event loop may be adding an id meanwhile.
                for q, e in list(self._journaled.items()):
                    if e != epoch:
                        self._journaled.pop(q, None)
            if fresh:
                try:
                    journal.append_removal([p for q in fresh for p in (self.env_path(q), self.data_path(q))])
                except (JournalFull, OSError):
                    fresh, unrecorded = [], True
            # The files go while the lock is held: no checkpoint can take its snapshot between
            # the removal record and the removal, so the one that covers the record covers both.
            for qid in fresh:
                both = self._spools.pop(qid, None)
                if both is not None:
                    # Never placed, in practice (the checkpoint places before it moves the
                    # epoch on): then the spools are all there is, and go back to their pools.
                    placed = [journal.unplaced.pop(sp, None) is None for sp in both]
                    done.add(qid)
                    if not any(placed):
                        self._give_back(both)
                        continue
                for path, blank_first in ((self.env_path(qid), False), (self.data_path(qid), True)):
                    try:
                        self._discard(path, blank_first=blank_first)
                        done.add(qid)
                    except FileNotFoundError:
                        continue
                if both is not None:
                    self._give_back(both)
        # The others take the durable removal, which must not delete files that a record still
        # names (a crash would bring them back): the checkpoint covering them must have ended.
        with contextlib.suppress(OSError):
            if unrecorded:
                journal.checkpoint()  # their records are in no snapshot yet
            elif covered:
                journal.settle()
        return done

    def remove_now(self, qid: str) -> bool:
        """Remove, on the event loop and at once, an item that was never placed and whose
        records no checkpoint has covered: in submission, nearly every delivered item. Its
        spools go back to their pools and its removal record is queued for the journal's next
        write (:meth:`Journal.queue_removal`): no thread hop, no file system call but two
        seeks. False (nothing done) for any other item: :meth:`remove_batched` takes those."""
        journal = self.journal
        both = self._spools.get(qid)
        if journal is None or both is None:
            return False
        data, env = both
        with journal.place_lock:
            if (self._journaled.get(qid) != journal.epoch or data not in journal.unplaced
                    or env not in journal.unplaced):
                return False
            del journal.unplaced[data], journal.unplaced[env]
            self._journaled.pop(qid, None)
            self._spools.pop(qid, None)
            journal.queue_removal([self.env_path(qid), self.data_path(qid)])
        journal.try_flush_removals()  # a pwrite of a few names, unless a flush holds the journal
        self._give_back(both)
        return True

    async def remove_batched(self, qid: str) -> bool:
        """:meth:`remove` from the event loop, group-committed: removals requested while a
        batch is being made durable share the next batch's single directory fsync (one batch
        at a time, in the committer's thread when there is a committer). Returns once this
        item's removal is durable."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bool] = loop.create_future()
        if self._rm_loop is not loop:
            self._rm_loop, self._rm_pending, self._rm_running = loop, [], False
        self._rm_pending.append((qid, fut))
        if not self._rm_running:
            self._rm_running = True
            task = loop.create_task(self._remove_batches())
            self._rm_task = task  # keep a reference until it ends
        return await fut

    async def _remove_batches(self) -> None:
        try:
            while self._rm_pending:
                batch, self._rm_pending = self._rm_pending, []
                try:
                    gone = await self._remove_in_thread([q for q, _ in batch])
                except Exception as exc:
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                for q, fut in batch:
                    if not fut.done():
                        fut.set_result(q in gone)
        finally:
            self._rm_running = False
            self._rm_task = None

    async def _remove_in_thread(self, qids: list[str]) -> set[str]:
        """:meth:`remove_many` off the event loop: in the committer's thread, after the commits
        of the batch it joins (no thread of its own to wake, one loop wake-up for the batch);
        without a committer, in the default executor."""
        if self.committer is None:
            return await asyncio.to_thread(self.remove_many, qids)
        gone: set[str] = await call_async(self.committer, functools.partial(self.remove_many, qids))
        return gone

    # --- recovery ------------------------------------------------------------------------

    def recover(self) -> tuple[int, int]:
        """At start, before anything is enqueued: drop half-made items (see module docstring).

        It covers the whole spool, whatever the ``partition``: it must run before any process
        enqueues (with workers, the parent runs it before forking).

        Returns (envelopes discarded, data files removed)."""
        envs = set(self.all_ids())
        dropped_env = 0
        for qid in envs:
            if not self.data_path(qid).exists():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.env_path(qid))
                    dropped_env += 1
        removed_data = 0
        with os.scandir(self.data) as it:
            names = [e.name for e in it]
        for name in names:
            if name not in envs:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.data / name)
                    removed_data += 1
        with os.scandir(self.tmp) as it:
            for e in it:
                with contextlib.suppress(OSError):
                    os.unlink(e.path)
        if dropped_env:
            fsync_dir(self.env)
        if removed_data:
            fsync_dir(self.data)
        return dropped_env, removed_data

    # --- control requests (CLI → running scheduler) --------------------------------------

    def request(self, action: Literal["flush", "retry"], qid: str | None = None) -> None:
        """Leave a request for the running scheduler, which polls ``control/`` each second.
        Without a running server the request is picked up at the next start."""
        if qid is not None and not valid_id(qid):
            raise QueueError(f"bad queue id {qid!r}")
        # A unique name: two requests in a row are two requests, even for workers that keep
        # the names of the ones they have acted on (take_requests).
        name = f"{action}.{qid or 'ALL'}.{time.time_ns():X}{secrets.token_hex(2).upper()}"
        path = self.control / name
        path.touch()

    def take_requests(self) -> list[tuple[str, str | None]]:
        """Consume pending control requests: [(action, id or None for all)].

        Without a partition every request is this process's: it is removed as it is read.
        With one, a request for one item is acted on and removed by the item's owner only;
        a request for all items is acted on by every worker, once each (the names it has
        acted on are kept), and removed by whichever finds it older than
        :data:`REQUEST_TTL` seconds: every worker polls ``control/`` each second."""
        out: list[tuple[str, str | None]] = []
        try:
            entries = list(os.scandir(self.control))
        except FileNotFoundError:
            return out
        now = time.time()
        shared: set[str] = set()  # requests for all items still waiting for the other workers
        for e in entries:
            action, _, rest = e.name.partition(".")
            target = rest.partition(".")[0]
            if action not in ("flush", "retry") or not (target == "ALL" or valid_id(target)):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(e.path)  # not a request: garbage
                continue
            if self.partition is None or target != "ALL":
                if not self.owns(target):
                    continue  # another worker's item: its owner takes the request
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(e.path)
                out.append((action, None if target == "ALL" else target))
                continue
            shared.add(e.name)
            with contextlib.suppress(OSError):
                if now - e.stat().st_mtime > REQUEST_TTL:
                    os.unlink(e.path)
            if e.name not in self._requests_seen:
                self._requests_seen.add(e.name)
                out.append((action, None))
        self._requests_seen &= shared
        return out


def _commit_sync(jobs: list[tuple[SpoolFile, Path]]) -> None:
    """The durable recipe without the Committer (worker thread): fsync each file, rename it
    into place, then fsync each directory that gained an entry."""
    dirs: set[Path] = set()
    try:
        for spool, target in jobs:
            spool.trim()
            os.fsync(spool.fd)
            os.close(spool.fd)
            spool.closed = True
            os.replace(spool.path, target)
            dirs.add(target.parent)
        for d in dirs:
            fsync_dir(d)
    except BaseException:
        for spool, target in jobs:
            spool.discard()
            with contextlib.suppress(OSError):
                os.unlink(target)
        raise
