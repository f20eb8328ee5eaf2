"""The scheduler: decides when each queued message is tried, and what happens after.

Rules (issue 5; Postfix's qmgr is the model):

* A new message is tried at once. After a restart every pending recipient is tried again at
  once (the crash may have interrupted an attempt). A delivered recipient is never retried.
* Recipients of one message are grouped by domain: one courier call per (message, domain).
* A temporary failure (``deferred``, or any exception from a courier: errors are temporary,
  never permanent) backs off per ``[delivery] retry_schedule`` (the last interval repeats),
  each interval scaled by a random jitter factor so retries spread out; the last retry is at
  ``max_lifetime`` after arrival, and a recipient still deferred then fails ("expired").
* Permanent failures (and expiries) are reported to the sender with ONE RFC 3464 DSN per
  message and pass, listing every recipient that failed in it. A message whose sender is the
  null reverse-path ``<>`` is never bounced (RFC 5321 §4.5.5, no bounce loops): logged.
* Optional delay warning (``Action: delayed``) once, after ``delay_warning`` seconds.
* Concurrency: at most ``max_concurrency`` messages in process and courier calls in flight,
  at most ``max_per_domain`` courier calls per destination domain. Only an index (id → due
  time, pending domains) is kept for every item; envelopes are loaded when an item is due,
  bodies are never loaded here (couriers stream them from disk). The active set is bounded.

Crash safety comes from the order of writes (see docs/queue-states.md): results are saved
to the envelope before any DSN is queued; a DSN has a deterministic id (``<id>B<n>``,
``<id>W``), so re-running the step after a crash finds it already queued. A pass that leaves
every recipient final with no DSN to queue removes the item without rewriting it first (the
durable envelope unlink is its write-back; removals are group-committed by the store).

The world is injected: ``clock`` (seconds, float) and ``rng`` (random.Random), so tests drive
time by hand and call :meth:`Scheduler.run_once` instead of sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from ..config import Config
from ..delivery.base import Courier, Envelope, RecipientResult
from ..log import log_event
from ..message.dsn import DSNRecipient, build_dsn
from ..storage.maildir import SpoolFile
from .store import EnvelopeRecord, QueueStore, RecipientRecord, domain_of, valid_id

log = logging.getLogger("serpentmail.queue")

COURIER_ERROR = "451 4.3.0 internal error during delivery, will retry"
_MIN_BACKOFF = 1.0


@dataclass(slots=True)
class _IndexEntry:
    due: float
    domains: frozenset[str]

    def __init__(self, due: float, domains: frozenset[str]) -> None:  # compiled, unlike @dataclass's
        self.due = due
        self.domains = domains


def _human_duration(seconds: float) -> str:
    if seconds >= 86400 and seconds % 86400 == 0:
        n = int(seconds // 86400)
        return f"{n} day{'s' if n != 1 else ''}"
    if seconds >= 3600:
        return f"{seconds / 3600:g} hours"
    return f"{seconds / 60:g} minutes"


class Scheduler:
    """Delivers queued messages through ``courier``; also the server's OutboundQueue."""

    def __init__(self, store: QueueStore, courier: Courier, config: Config, *,
                 clock: Callable[[], float] = time.time,
                 rng: random.Random | None = None,
                 expand: Callable[[str], list[str]] | None = None,
                 poll_interval: float = 1.0,
                 jitter: float = 0.1,
                 retry_all_at_start: bool = True,
                 dsn_body_limit: int = 50_000) -> None:
        self.store = store
        self.courier = courier
        self.config = config
        self.delivery = config.delivery
        self.clock = clock
        self.rng = rng or random.Random()
        # Expands a DSN recipient (the original sender) through local aliases; None: as is.
        self.expand = expand
        self.poll_interval = poll_interval
        self.jitter = jitter
        self.retry_all_at_start = retry_all_at_start
        self.dsn_body_limit = dsn_body_limit
        self._index: dict[str, _IndexEntry] = {}
        self._heap: list[tuple[float, str]] = []
        self._forced: set[str] = set()  # attempt every pending recipient, whatever its time
        self._reset: set[str] = set()  # `queue retry`: restart the backoff schedule
        self._active: dict[str, asyncio.Task[None]] = {}
        self._reserved: Counter[str] = Counter()  # courier calls per domain, launched or queued
        # Due items whose every domain had all its slots taken, parked (a heap per domain)
        # until a slot of that domain frees: a backlog for one busy domain is not walked again
        # at every dispatch (see _dispatch).
        self._parked: dict[str, list[tuple[float, str]]] = {}
        self._domain_sems: dict[str, asyncio.Semaphore] = {}
        self._global_sem: asyncio.Semaphore | None = None
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._stopping = False
        self.max_seen_total = 0  # observability for tests and `queue` stats
        self._in_flight = 0
        # Envelopes this process just wrote (enqueue, DSNs), handed to their first pass so it
        # need not read back what is already in memory. Bounded; the file stays the truth.
        self._fresh: dict[str, EnvelopeRecord] = {}
        self.fresh_limit = 1024
        # Set while load() runs: enqueues wait for it (see enqueue).
        self._loading: asyncio.Event | None = None
        # False when another process already ran QueueStore.recover() (the parent of several
        # worker processes, before any of them could enqueue: see server/workers.py).
        self.recover_at_start = True
        # With several worker processes, each also scans its share of the queue for items it
        # does not know every this many seconds (None: never).
        self.rescan_interval: float | None = None

    # --- index ---------------------------------------------------------------------------

    def _schedule(self, qid: str, due: float, domains: frozenset[str], *, wake: bool = True) -> None:
        self._index[qid] = _IndexEntry(due, domains)
        heapq.heappush(self._heap, (due, qid))
        if wake and self._wake is not None:
            self._wake.set()

    def _index_record(self, rec: EnvelopeRecord, *, force: bool, wake: bool = True) -> None:
        due = rec.next_due()
        if due is None:
            # Everything final but the item still exists (crash before its removal): one
            # more pass sends any missing DSN and removes it.
            due, force = self.clock(), True
        if force:
            due = min(due, self.clock())
            self._forced.add(rec.id)
        self._schedule(rec.id, due, rec.pending_domains(), wake=wake)

    def __len__(self) -> int:
        return len(self._index) + len(self._active)

    # --- OutboundQueue -------------------------------------------------------------------

    async def enqueue(self, spool: SpoolFile, sender: str, recipients: list[str], *,
                      smtputf8: bool = False, body_8bit: bool = False) -> str:
        """Commit the message (group commit; returns only once durable) and schedule it."""
        if self._loading is not None:
            # QueueStore.recover() removes data files that have no envelope: an item being
            # committed while it runs could be one of them, after its 250. Wait for it.
            await self._loading.wait()
        rec = await self.store.enqueue(spool, sender, recipients, smtputf8=smtputf8, body_8bit=body_8bit)
        log_event(log, "queued", id=rec.id, **{"from": f"<{sender}>"}, nrcpt=len(rec.recipients), size=rec.size)
        self._remember(rec)
        if self._loop_task is None:
            self._index_record(rec, force=True)
        else:
            # Started here rather than by waking the run loop to do it: that wake-up (an
            # event, a timeout, a loop turn) cost as much as the dispatch itself.
            self._index_record(rec, force=True, wake=False)
            self._dispatch()
        return rec.id

    def adopt(self, qid: str) -> bool:
        """Schedule an item of this process's share that is on disk but not in the index (see
        :meth:`adopt_unknown`): read its envelope and give it its first pass now. Items already
        known, another worker's, gone, or half-made are left alone. Returns whether it was
        adopted."""
        if qid in self._index or qid in self._active or not valid_id(qid) or not self.store.owns(qid):
            return False
        try:
            rec = self.store.load(qid)  # a few hundred bytes: read inline
        except (OSError, ValueError):
            return False
        if rec is None or not self.store.data_path(qid).exists():  # the envelope was just read
            return False
        self._remember(rec)  # its first pass uses it instead of reading the file again
        self._index_record(rec, force=True)
        return True

    async def adopt_unknown(self) -> int:
        """Adopt every item of this process's share on disk that the index does not know (with
        workers, a safety net run every ``rescan_interval``: an item committed but never
        indexed, say by a worker killed in between, is found here)."""
        n = 0
        for qid in await asyncio.to_thread(lambda: list(self.store.ids())):
            if self.adopt(qid):
                n += 1
        if n:
            log_event(log, "adopted", items=n)
        return n

    def _remember(self, rec: EnvelopeRecord) -> None:
        if len(self._fresh) < self.fresh_limit:
            self._fresh[rec.id] = rec

    async def _envelope(self, qid: str) -> EnvelopeRecord | None:
        rec = self._fresh.pop(qid, None)
        if rec is not None:
            return rec
        return await asyncio.to_thread(self.store.load, qid)

    # --- lifecycle -----------------------------------------------------------------------

    def _ensure_primitives(self) -> None:
        if self._wake is None:
            self._wake = asyncio.Event()
            self._global_sem = asyncio.Semaphore(max(1, self.delivery.max_concurrency))

    async def load(self) -> int:
        """Recover the spool and index every item (start-up; runs the file work in a thread).
        Enqueues issued meanwhile wait until it is over."""
        self._ensure_primitives()
        loading = self._loading = asyncio.Event()
        try:
            return await self._recover_and_index()
        finally:
            self._loading = None
            loading.set()

    async def _recover_and_index(self) -> int:
        if self.recover_at_start:
            dropped_env, dropped_data = await asyncio.to_thread(self.store.recover)
            if dropped_env or dropped_data:
                log_event(log, "recovered", discarded_envelopes=dropped_env, removed_data=dropped_data)
        records = await asyncio.to_thread(self._scan_index)
        for qid, due, domains in records:
            entry_force = self.retry_all_at_start
            if entry_force:
                self._forced.add(qid)
                due = min(due, self.clock())
            self._schedule(qid, due, domains)
        # Requests left by the CLI while we were down are covered by the start-up retry.
        await asyncio.to_thread(self.store.take_requests)
        return len(records)

    def _scan_index(self) -> list[tuple[str, float, frozenset[str]]]:
        out = []
        for rec in self.store.scan():
            due = rec.next_due()
            out.append((rec.id, self.clock() if due is None else due, rec.pending_domains()))
        return out

    async def start(self) -> None:
        n = await self.load()
        log_event(log, "scheduler started", queued=n)
        self._loop_task = asyncio.create_task(self._run(), name="queue-scheduler")

    async def stop(self, grace: float = 10.0) -> None:
        """Stop dispatching; let deliveries in flight finish for ``grace`` seconds, then cancel
        them (their recipients stay pending on disk and are retried at the next start)."""
        self._stopping = True
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        tasks = list(self._active.values())
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=grace)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
        self.store.discard_spares()
        aclose = getattr(self.courier, "aclose", None)
        if aclose is not None:
            # Idle connections kept for reuse get their QUIT now.
            try:
                await aclose()
            except Exception:
                log.exception("closing the couriers failed")
        log_event(log, "scheduler stopped", left_pending=len(self._index) + len(self._active))

    async def _run(self) -> None:
        assert self._wake is not None
        last_poll = 0.0
        last_rescan = time.monotonic()
        while not self._stopping:
            now_mono = time.monotonic()
            if now_mono - last_poll >= self.poll_interval:
                last_poll = now_mono
                try:
                    await self._take_control_requests()
                except Exception:
                    log.exception("reading queue control requests failed")
            if self.rescan_interval is not None and now_mono - last_rescan >= self.rescan_interval:
                last_rescan = now_mono
                try:
                    await self.adopt_unknown()
                except Exception:
                    log.exception("scanning the queue for new items failed")
            self._dispatch()
            timeout = self.poll_interval
            if self._heap:
                until_due = self._heap[0][0] - self.clock()
                # Something due but not started means every slot it could use is taken: a
                # finishing delivery sets the wake event, so do not spin until then.
                if until_due > 0:
                    timeout = min(timeout, until_due)
            self._wake.clear()
            # asyncio.timeout, not wait_for: no task per wake-up (one or two per message).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(timeout, 0.01)):
                    await self._wake.wait()

    async def run_once(self) -> int:
        """Run every item due now to completion (dispatching more as slots free up).
        For tests and tools driving a fake clock. Returns the number of passes started."""
        self._ensure_primitives()
        await self._take_control_requests()
        started = 0
        while True:
            started += self._dispatch()
            if not self._active:
                return started
            await asyncio.wait(list(self._active.values()), return_when=asyncio.FIRST_COMPLETED)

    # --- control (CLI) -------------------------------------------------------------------

    def flush(self, qid: str | None = None, *, reset: bool = False) -> int:
        """Try now every pending recipient (of ``qid``, or of every item). ``reset`` also
        restarts the backoff schedule (``queue retry``). Returns how many items were hit."""
        now = self.clock()
        ids = [qid] if qid is not None else list(self._index)
        n = 0
        for i in ids:
            entry = self._index.get(i)
            if i in self._active:
                self._forced.add(i)  # picked up again after the current pass
                if reset:
                    self._reset.add(i)
                n += 1
                continue
            if entry is None:
                continue
            self._forced.add(i)
            if reset:
                self._reset.add(i)
            self._schedule(i, now, entry.domains)
            n += 1
        return n

    async def _take_control_requests(self) -> None:
        requests = await asyncio.to_thread(self.store.take_requests)
        for action, qid in requests:
            if qid is not None and qid not in self._index and qid not in self._active:
                rec = await asyncio.to_thread(self.store.load, qid)
                if rec is not None and self.store.exists(qid):
                    self._index_record(rec, force=True)
            n = self.flush(qid, reset=action == "retry")
            log_event(log, action, id=qid or "ALL", items=n)

    # --- dispatch ------------------------------------------------------------------------

    def _saturated(self, domains: frozenset[str]) -> bool:
        per = max(1, self.delivery.max_per_domain)
        return bool(domains) and all(self._reserved[d] >= per for d in domains)

    def _dispatch(self) -> int:
        """Start due items while there are free slots. Returns how many were started.

        A due item whose domains are all saturated is parked under each of them and leaves
        the heap; :meth:`_release` puts the earliest parked item of a domain back when one of
        its slots frees. So the cost of a dispatch does not grow with the backlog waiting for
        a busy domain (it used to pop and push back up to 1,000 such items at every wake-up,
        which is once per finished delivery)."""
        if self._stopping:
            return 0
        now = self.clock()
        limit = max(1, self.delivery.max_concurrency)
        started = 0
        while self._heap and len(self._active) < limit:
            due, qid = self._heap[0]
            if due > now:
                break
            heapq.heappop(self._heap)
            entry = self._index.get(qid)
            if entry is None or entry.due != due or qid in self._active:
                continue  # stale heap entry
            if self._saturated(entry.domains):
                for d in entry.domains:  # wait for a slot of any of them
                    heapq.heappush(self._parked.setdefault(d, []), (due, qid))
                continue
            del self._index[qid]
            for d in entry.domains:
                self._reserved[d] += 1
            task = asyncio.create_task(self._process(qid, entry.domains), name=f"deliver-{qid}")
            self._active[qid] = task
            started += 1
        return started

    def _unpark(self, domain: str) -> None:
        """A slot of ``domain`` freed: its earliest parked item that is still waiting goes
        back on the heap (copies parked under other domains, or left by a reschedule, are
        stale and skipped here or by _dispatch)."""
        parked = self._parked.get(domain)
        while parked:
            due, qid = heapq.heappop(parked)
            entry = self._index.get(qid)
            if entry is not None and entry.due == due and qid not in self._active:
                heapq.heappush(self._heap, (due, qid))
                break
        if not parked:
            self._parked.pop(domain, None)

    # --- one pass over one message -------------------------------------------------------

    async def _process(self, qid: str, reserved: frozenset[str]) -> None:
        released: set[str] = set()
        try:
            await self._process_inner(qid, reserved, released)
        except asyncio.CancelledError:
            raise
        except Exception:
            # A bug or a disk problem: keep the item, try again later (never drop it).
            log.exception("queue item %s: processing failed, will retry", qid)
            if qid not in self._index and not self._stopping:
                self._schedule(qid, self.clock() + self.backoff(1), reserved)
        finally:
            for d in reserved - released:
                self._release(d)
            self._active.pop(qid, None)
            if qid in self._forced and qid not in self._index and not self._stopping:
                # A flush arrived during the pass: go again.
                rec = await asyncio.to_thread(self.store.load, qid)
                if rec is not None and not rec.done:
                    self._index_record(rec, force=True)
            if self._loop_task is not None:
                self._dispatch()  # what this pass's slots let through starts now (see enqueue)
            elif self._wake is not None:
                self._wake.set()

    def _release(self, domain: str) -> None:
        self._reserved[domain] -= 1
        self._unpark(domain)
        if self._reserved[domain] <= 0:
            del self._reserved[domain]
            sem = self._domain_sems.get(domain)
            if sem is not None and not sem.locked():
                self._domain_sems.pop(domain, None)

    async def _process_inner(self, qid: str, reserved: frozenset[str], released: set[str]) -> None:
        rec = await self._envelope(qid)
        if rec is None or not self.store.exists(qid):
            log_event(log, "gone", id=qid)  # deleted by the CLI, or already finished
            self.store.forget(qid)
            self._forced.discard(qid)
            return
        forced = qid in self._forced
        self._forced.discard(qid)
        if qid in self._reset:
            self._reset.discard(qid)
            for r in rec.pending:
                r.attempts = 0
        now = self.clock()
        groups: dict[str, list[RecipientRecord]] = {}
        for r in rec.pending:
            if forced or r.next_attempt <= now:
                groups.setdefault(r.domain, []).append(r)
        envelope = Envelope(qid, rec.sender, self.store.data_file(qid), rec.size, rec.smtputf8, rec.body_8bit,
                            self.store.data_fd(qid))

        async def call(domain: str, rcpts: list[RecipientRecord]) -> list[RecipientResult]:
            try:
                return await self._call(domain, envelope, rcpts)
            finally:
                if domain in reserved and domain not in released:
                    released.add(domain)
                    self._release(domain)

        if len(groups) == 1:  # the common case: no task for a gather of one
            (only,) = groups.items()
            outcomes = [await call(*only)]
        else:
            outcomes = list(await asyncio.gather(*(call(d, rs) for d, rs in groups.items())))
        for d in reserved - set(groups):
            if d not in released:
                released.add(d)
                self._release(d)
        now = self.clock()
        for (_domain, rcpts), results in zip(groups.items(), outcomes, strict=True):
            for r, res in zip(rcpts, results, strict=True):
                self._apply(rec, r, res, now)
        await self._finish_pass(rec, now)

    async def _call(self, domain: str, envelope: Envelope, rcpts: list[RecipientRecord]) -> list[RecipientResult]:
        addrs = [r.address for r in rcpts]
        sem = self._domain_sems.get(domain)
        if sem is None:
            sem = self._domain_sems[domain] = asyncio.Semaphore(max(1, self.delivery.max_per_domain))
        assert self._global_sem is not None
        async with sem, self._global_sem:
            self._in_flight += 1
            self.max_seen_total = max(self.max_seen_total, self._in_flight)
            try:
                results = await self.courier.deliver(envelope, addrs)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # maddy's rule: an unexpected error is temporary, never a bounce.
                log_event(log, "courier error", logging.ERROR, id=envelope.queue_id, domain=domain, error=repr(exc))
                log.debug("courier traceback", exc_info=exc)
                return [RecipientResult(a, "deferred", COURIER_ERROR) for a in addrs]
            finally:
                self._in_flight -= 1
        by_addr = {res.recipient.lower(): res for res in results if isinstance(res, RecipientResult)}
        out = []
        for i, a in enumerate(addrs):
            res = results[i] if i < len(results) and results[i].recipient.lower() == a.lower() else by_addr.get(a.lower())
            if res is None or res.status not in ("delivered", "deferred", "failed"):
                log_event(log, "courier result missing", logging.ERROR, id=envelope.queue_id, to=f"<{a}>")
                res = RecipientResult(a, "deferred", COURIER_ERROR)
            out.append(res)
        return out

    def backoff(self, attempts: int) -> float:
        """Seconds to wait after the ``attempts``-th temporary failure (with jitter)."""
        schedule = self.delivery.retry_schedule or (3600.0,)
        base = schedule[min(max(attempts, 1), len(schedule)) - 1]
        factor = self.rng.uniform(1.0 - self.jitter, 1.0 + self.jitter)
        return max(_MIN_BACKOFF, base * factor)

    def _apply(self, rec: EnvelopeRecord, r: RecipientRecord, res: RecipientResult, now: float) -> None:
        r.attempts += 1
        r.last_attempt = now
        r.last_reply = res.reply
        r.remote_mta = res.remote_mta
        r.diagnostic_type = res.diagnostic_type
        if res.status == "delivered":
            r.state = "delivered"
        elif res.status == "failed":
            r.state = "failed"
        else:
            deadline = rec.arrival + self.delivery.max_lifetime
            if now >= deadline:
                r.state = "failed"
                r.expired = True
            else:
                r.next_attempt = min(now + self.backoff(r.attempts), deadline)
        log_event(log, "delivery", id=rec.id, to=f"<{r.address}>", status=r.state if r.state != "pending" else "deferred",
                  relay=res.remote_mta or "-", attempts=r.attempts, delay=round(now - rec.arrival, 1),
                  reply=res.reply)

    async def _finish_pass(self, rec: EnvelopeRecord, now: float) -> None:
        # Expire recipients not tried this pass whose lifetime is over (e.g. after downtime).
        deadline = rec.arrival + self.delivery.max_lifetime
        for r in rec.pending:
            if now >= deadline and r.attempts > 0:
                r.state, r.expired = "failed", True
        unreported = [r for r in rec.recipients if r.state == "failed" and not r.notified]
        if rec.done and not (unreported and rec.sender):
            # Every recipient is final and there is no DSN to queue: the removal is the
            # write-back (its commit point, the envelope unlink made durable, is where a
            # rewrite would have been; a crash before it leaves exactly what a crash before
            # the rewrite would: these recipients pending, the RFC 5321 §6.1 window).
            for r in unreported:
                log_event(log, "bounce suppressed: null sender", logging.WARNING, id=rec.id,
                          to=f"<{r.address}>", reply=r.last_reply)
            await self._remove(rec.id)
            return
        # 1. Results first: a delivered recipient must be on disk as delivered as soon as
        #    possible (it shrinks the RFC 5321 §6.1 duplicate window).
        if not await asyncio.to_thread(self.store.save, rec):
            log_event(log, "gone", id=rec.id)
            return
        # 2. One DSN for every recipient that failed and was not reported yet.
        if unreported:
            if rec.sender:
                await self._send_dsn(rec, unreported, "failed", now, f"{rec.id}B{rec.dsn_count}")
                rec.dsn_count += 1
            else:
                for r in unreported:
                    log_event(log, "bounce suppressed: null sender", logging.WARNING, id=rec.id,
                              to=f"<{r.address}>", reply=r.last_reply)
            for r in unreported:
                r.notified = True
        # 3. Delay warning (once).
        warn_after = self.delivery.delay_warning
        if (warn_after > 0 and not rec.warned and rec.sender and rec.pending
                and now - rec.arrival >= warn_after):
            await self._send_dsn(rec, rec.pending, "delayed", now, f"{rec.id}W")
            rec.warned = True
        # 4. Done → remove; otherwise save and reschedule.
        if rec.done:
            await self._remove(rec.id)
            return
        if unreported or rec.warned:
            if not await asyncio.to_thread(self.store.save, rec):
                return
        due = rec.next_due()
        assert due is not None
        if rec.id in self._forced:
            due = min(due, self.clock())
        if not self._stopping:
            self._schedule(rec.id, due, rec.pending_domains())

    async def _remove(self, qid: str) -> None:
        if not self.store.remove_now(qid):  # never placed: nothing to do but on the loop
            await self.store.remove_batched(qid)  # group commit: one env/ fsync per batch
        self._forced.discard(qid)
        log_event(log, "removed", id=qid)

    async def _send_dsn(self, rec: EnvelopeRecord, rcpts: list[RecipientRecord], action: str,
                        now: float, dsn_id: str) -> None:
        assert action in ("failed", "delayed")
        deadline = rec.arrival + self.delivery.max_lifetime
        dsn_rcpts = [DSNRecipient(r.address, r.last_reply, r.remote_mta, r.diagnostic_type,
                                  r.last_attempt, r.expired) for r in rcpts]

        def build_and_queue() -> EnvelopeRecord | None:
            original: bytes | None = None
            if rec.size <= self.dsn_body_limit:
                original = self.store.data_file(rec.id).read_bytes()
            headers = b"" if original is not None else self.store.read_headers(rec.id)
            content = build_dsn(
                reporting_mta=self.config.hostname, original_sender=rec.sender,
                original_id=rec.id, arrival=rec.arrival, recipients=dsn_rcpts,
                action="failed" if action == "failed" else "delayed", now=now,
                original_headers=headers, original_message=original,
                will_retry_until=deadline if action == "delayed" else None,
                lifetime_text=_human_duration(self.delivery.max_lifetime),
            )
            targets = self.expand(rec.sender) if self.expand is not None else [rec.sender]
            # RFC 5321 §4.5.5: a DSN is sent with the null reverse-path.
            return self.store.enqueue_bytes(content, "", targets or [rec.sender], qid=dsn_id,
                                            smtputf8=not rec.sender.isascii())

        dsn = await asyncio.to_thread(build_and_queue)
        if dsn is None:
            log_event(log, "dsn already queued", id=rec.id, dsn=dsn_id)
            return
        log_event(log, "dsn queued", id=rec.id, dsn=dsn.id, action=action, to=f"<{rec.sender}>",
                  recipients=",".join(f"<{r.address}>" for r in rcpts))
        self._remember(dsn)
        self._index_record(dsn, force=True)


def domains_of(recipients: list[str]) -> frozenset[str]:
    return frozenset(domain_of(r) for r in recipients)
