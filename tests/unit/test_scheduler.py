"""The scheduler with fake couriers and a fake clock: retry schedule, lifetime expiry, DSNs,
the null sender, concurrency limits, restart behaviour."""

from __future__ import annotations

import asyncio
import email
import os
import random
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from serpentmail.config import Config, DeliveryConfig, embedded_default
from serpentmail.delivery.base import Envelope, RecipientResult, Status
from serpentmail.queue.scheduler import COURIER_ERROR, Scheduler
from serpentmail.queue.store import REQUEST_TTL, QueueStore, new_queue_id, owner_of, valid_id
from serpentmail.storage.maildir import SpoolFile

T0 = 1_700_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


class FakeCourier:
    """Answers per recipient from ``script`` (address → status or list of statuses, consumed
    one per attempt); records every call with the data it read."""

    def __init__(self, script: dict[str, Any] | None = None, default: Status = "delivered") -> None:
        self.script = script or {}
        self.default = default
        self.calls: list[tuple[str, str, list[str], bytes]] = []

    async def deliver(self, envelope: Envelope, recipients: list[str]) -> list[RecipientResult]:
        self.calls.append((envelope.queue_id, envelope.sender, list(recipients), envelope.data_path.read_bytes()))
        out = []
        for r in recipients:
            st = self.script.get(r, self.default)
            if isinstance(st, list):
                st = st.pop(0) if len(st) > 1 else st[0]
            reply = {"delivered": "250 2.0.0 ok", "deferred": "451 4.4.1 try later",
                     "failed": "550 5.1.1 user unknown"}[st]
            out.append(RecipientResult(r, st, reply, "mx.remote.test"))
        return out

    def attempts(self, addr: str) -> int:
        return sum(1 for c in self.calls if addr in c[2])


def config(tmp_path: Path, **delivery: Any) -> Config:
    base = embedded_default(tmp_path)
    d = replace(DeliveryConfig(retry_schedule=(60.0, 300.0, 900.0), max_lifetime=86400.0), **delivery)
    return replace(base, hostname="mx.home.test", delivery=d)


def make(tmp_path: Path, courier: Any, clock: Clock, **delivery: Any) -> tuple[Scheduler, QueueStore]:
    store = QueueStore(tmp_path, clock=clock)
    return Scheduler(store, courier, config(tmp_path, **delivery), clock=clock, rng=random.Random(7)), store


def put(store: QueueStore, sender: str, rcpts: list[str], body: bytes = b"Subject: hello\r\n\r\nbody\r\n") -> str:
    rec = store.enqueue_bytes(body, sender, rcpts)
    assert rec is not None
    return rec.id


def dsns(courier: FakeCourier) -> list[email.message.Message]:
    return [email.message_from_bytes(data) for _qid, sender, _r, data in courier.calls if sender == ""]


def test_first_attempt_at_once_then_backoff_with_jitter(tmp_path: Path) -> None:
    clock = Clock()
    courier = FakeCourier({"x@far.test": "deferred"})
    sched, store = make(tmp_path, courier, clock)

    async def go() -> list[float]:
        await sched.load()
        qid = put(store, "a@home.test", ["x@far.test"])
        rec = store.load(qid)
        assert rec is not None
        sched._index_record(rec, force=True)
        waits = []
        for _ in range(6):
            await sched.run_once()
            rec = store.load(qid)
            assert rec is not None
            nxt = rec.recipients[0].next_attempt
            waits.append(nxt - clock.now)
            # just before the due time: nothing happens
            clock.now = nxt - 0.5
            before = len(courier.calls)
            await sched.run_once()
            assert len(courier.calls) == before
            clock.now = nxt
        return waits

    waits = asyncio.run(go())
    assert courier.attempts("x@far.test") == 6
    # 60, 300, 900, then the last interval repeated; each within ±10% jitter
    for wait, base in zip(waits, [60, 300, 900, 900, 900, 900], strict=True):
        assert base * 0.9 - 0.6 <= wait <= base * 1.1
    assert len(set(waits[3:])) > 1  # jitter: not all equal


def test_lifetime_expiry_bounces_once_with_delay_warning_first(tmp_path: Path) -> None:
    clock = Clock()
    courier = FakeCourier({"x@far.test": "deferred"})
    sched, store = make(tmp_path, courier, clock, max_lifetime=3600.0, retry_schedule=(600.0,), delay_warning=1200.0)

    async def go() -> str:
        await sched.load()
        qid = put(store, "bill@home.test", ["x@far.test"])
        sched.flush()
        sched._index_record(store.load(qid), force=True)  # type: ignore[arg-type]
        for _ in range(20):
            await sched.run_once()
            if not store.exists(qid):
                break
            clock.now += 700
        return qid

    qid = asyncio.run(go())
    assert not store.exists(qid)  # gave up, removed
    reports = dsns(courier)
    assert [m.get_content_type() for m in reports] == ["multipart/report", "multipart/report"]
    delayed, failed = reports
    assert "Delayed" in str(delayed["Subject"]) and "Action: delayed" in delayed.as_string()
    assert "Undelivered" in str(failed["Subject"])
    status = failed.get_payload()[1].get_payload()[1]  # type: ignore[index,union-attr]
    assert status["Action"] == "failed" and status["Status"] == "4.4.1"
    assert status["Final-Recipient"] == "rfc822; x@far.test"
    # the DSN went to the sender, from the null sender
    assert [c[2] for c in courier.calls if c[1] == ""] == [["bill@home.test"], ["bill@home.test"]]
    # the last try was at the end of the lifetime, not after
    attempts = courier.attempts("x@far.test")
    assert 5 <= attempts <= 7


def test_one_bounce_lists_every_failed_recipient(tmp_path: Path) -> None:
    clock = Clock()
    courier = FakeCourier({"a@one.test": "failed", "b@one.test": "failed", "c@two.test": "failed",
                           "ok@two.test": "delivered"})
    sched, store = make(tmp_path, courier, clock)

    async def go() -> None:
        await sched.load()
        qid = put(store, "bill@home.test", ["a@one.test", "b@one.test", "c@two.test", "ok@two.test"])
        sched._index_record(store.load(qid), force=True)  # type: ignore[arg-type]
        await sched.run_once()

    asyncio.run(go())
    # one courier call per (message, domain), then exactly one DSN
    original_calls = [c for c in courier.calls if c[1] != ""]
    assert sorted(sorted(c[2]) for c in original_calls) == [["a@one.test", "b@one.test"], ["c@two.test", "ok@two.test"]]
    reports = dsns(courier)
    assert len(reports) == 1
    text = reports[0].as_string()
    for addr in ("a@one.test", "b@one.test", "c@two.test"):
        assert f"Final-Recipient: rfc822; {addr}" in text
    assert "ok@two.test" not in text.split("Content-Type: message/rfc822")[0].split("delivery-status")[1]
    assert list(store.ids()) == []  # original and DSN both finished


def test_null_sender_is_never_bounced(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    courier = FakeCourier({"x@far.test": "failed"})
    sched, store = make(tmp_path, courier, clock)

    async def go() -> None:
        await sched.load()
        qid = put(store, "", ["x@far.test"])
        sched._index_record(store.load(qid), force=True)  # type: ignore[arg-type]
        await sched.run_once()

    with caplog.at_level("WARNING", logger="serpentmail.queue"):
        asyncio.run(go())
    # the original attempt only: a DSN would have been queued and delivered as a second call
    assert len(courier.calls) == 1
    assert b"multipart/report" not in courier.calls[0][3]
    assert list(store.ids()) == []
    assert any("bounce suppressed" in r.getMessage() for r in caplog.records)


def test_courier_exception_is_temporary(tmp_path: Path) -> None:
    clock = Clock()

    class Broken:
        calls = 0

        async def deliver(self, envelope: Envelope, recipients: list[str]) -> list[RecipientResult]:
            Broken.calls += 1
            raise RuntimeError("boom")

    sched, store = make(tmp_path, Broken(), clock)

    async def go() -> str:
        await sched.load()
        qid = put(store, "bill@home.test", ["x@far.test"])
        sched._index_record(store.load(qid), force=True)  # type: ignore[arg-type]
        await sched.run_once()
        return qid

    qid = asyncio.run(go())
    rec = store.load(qid)
    assert rec is not None
    r = rec.recipients[0]
    assert (r.state, r.attempts, r.last_reply) == ("pending", 1, COURIER_ERROR)
    assert Broken.calls == 1


def test_restart_retries_pending_never_delivered(tmp_path: Path) -> None:
    clock = Clock()
    courier = FakeCourier({"late@far.test": "deferred"})
    sched, store = make(tmp_path, courier, clock)

    async def first() -> str:
        await sched.load()
        qid = put(store, "bill@home.test", ["ok@near.test", "late@far.test"])
        sched._index_record(store.load(qid), force=True)  # type: ignore[arg-type]
        await sched.run_once()
        return qid

    qid = asyncio.run(first())
    assert courier.attempts("ok@near.test") == 1 and courier.attempts("late@far.test") == 1
    # "restart": a new scheduler on the same spool, clock not advanced past the backoff
    courier2 = FakeCourier({"late@far.test": "delivered"})
    sched2 = Scheduler(store, courier2, config(tmp_path), clock=clock, rng=random.Random(1))

    async def second() -> None:
        assert await sched2.load() == 1
        await sched2.run_once()

    asyncio.run(second())
    assert courier2.attempts("late@far.test") == 1
    assert courier2.attempts("ok@near.test") == 0
    assert not store.exists(qid)


def test_concurrency_limits_total_and_per_domain(tmp_path: Path) -> None:
    clock = Clock()

    class Slow:
        def __init__(self) -> None:
            self.now: Counter[str] = Counter()
            self.peak: Counter[str] = Counter()
            self.total = 0
            self.peak_total = 0
            self.delivered = 0

        async def deliver(self, envelope: Envelope, recipients: list[str]) -> list[RecipientResult]:
            d = recipients[0].rpartition("@")[2]
            self.now[d] += 1
            self.total += 1
            self.peak[d] = max(self.peak[d], self.now[d])
            self.peak_total = max(self.peak_total, self.total)
            await asyncio.sleep(0.002)
            self.now[d] -= 1
            self.total -= 1
            self.delivered += len(recipients)
            return [RecipientResult(r, "delivered", "250 ok") for r in recipients]

    slow = Slow()
    sched, store = make(tmp_path, slow, clock, max_concurrency=5, max_per_domain=2)

    async def go() -> None:
        await sched.load()
        for i in range(30):
            qid = put(store, "bill@home.test", [f"u{i}@d{i % 4}.test"])
            sched._index_record(store.load(qid), force=True)  # type: ignore[arg-type]
        await sched.run_once()

    asyncio.run(go())
    assert slow.delivered == 30
    assert max(slow.peak.values()) == 2  # the per-domain limit was reached and held
    assert slow.peak_total == 5  # the total limit was reached and held
    assert list(store.ids()) == []


class GatedCourier:
    """Delivers every recipient; those of ``domain`` only once ``gate`` is set. Records the
    recipients it delivered, in order."""

    def __init__(self, domain: str) -> None:
        self.domain = domain
        self.gate = asyncio.Event()
        self.delivered: list[str] = []

    async def deliver(self, envelope: Envelope, recipients: list[str]) -> list[RecipientResult]:
        if recipients[0].endswith("@" + self.domain):
            await self.gate.wait()
        self.delivered.extend(recipients)
        return [RecipientResult(r, "delivered", "250 ok") for r in recipients]


def test_a_backlog_for_a_busy_domain_does_not_hold_up_other_domains(tmp_path: Path) -> None:
    """1,500 due items wait for the only slot of busy.test; an item for idle.test, due after
    all of them, is still started at the first dispatch and delivered while busy.test is
    blocked (the waiting items are parked, not rescanned: the old scan gave up after 1,000)."""
    clock = Clock()
    courier = GatedCourier("busy.test")
    gate, delivered = courier.gate, courier.delivered
    sched, store = make(tmp_path, courier, clock, max_concurrency=10, max_per_domain=1)

    async def go() -> None:
        await sched.load()
        first = put(store, "bill@home.test", ["x@busy.test"])
        sched._schedule(first, T0 - 2, frozenset({"busy.test"}))
        for i in range(1500):  # index entries only: their pass finds no envelope ("gone")
            sched._schedule(f"{i:020X}", T0 - 1, frozenset({"busy.test"}))
        other = put(store, "bill@home.test", ["y@idle.test"])
        sched._schedule(other, T0, frozenset({"idle.test"}))
        assert sched._dispatch() == 2  # the busy.test item and the idle.test one
        for _ in range(200):
            if "y@idle.test" in delivered:
                break
            await asyncio.sleep(0.01)
        assert delivered == ["y@idle.test"]
        assert sched._dispatch() == 0  # busy.test still has no free slot: nothing rescanned
        gate.set()
        await sched.run_once()

    asyncio.run(go())
    assert delivered == ["y@idle.test", "x@busy.test"]
    assert list(store.ids()) == []
    assert len(sched) == 0


def test_parked_items_flushed_meanwhile_are_delivered_once_each(tmp_path: Path) -> None:
    """Items waiting for a busy domain's slot, then flushed (``queue flush``: rescheduled, so
    their parked copies are stale), are each delivered exactly once when the slot frees."""
    clock = Clock()
    courier = GatedCourier("busy.test")
    gate, delivered = courier.gate, courier.delivered
    sched, store = make(tmp_path, courier, clock, max_concurrency=10, max_per_domain=1)

    async def go() -> None:
        await sched.load()
        for i in range(4):
            qid = put(store, "bill@home.test", [f"u{i}@busy.test"])
            sched._schedule(qid, T0 - 10 + i, frozenset({"busy.test"}))
        assert sched._dispatch() == 1  # one slot: the other three are parked
        clock.now += 5
        assert sched.flush() == 3  # the three waiting ones
        assert sched._dispatch() == 0  # still no slot: parked again under their new times
        gate.set()
        await sched.run_once()

    asyncio.run(go())
    assert sorted(delivered) == [f"u{i}@busy.test" for i in range(4)]
    assert list(store.ids()) == []


def test_flush_and_retry_requests(tmp_path: Path) -> None:
    clock = Clock()
    courier = FakeCourier({"x@far.test": "deferred"})
    sched, store = make(tmp_path, courier, clock)

    async def go() -> str:
        await sched.load()
        qid = put(store, "bill@home.test", ["x@far.test"])
        sched._index_record(store.load(qid), force=True)  # type: ignore[arg-type]
        await sched.run_once()
        await sched.run_once()
        assert courier.attempts("x@far.test") == 1
        store.request("flush")  # what `serpentmail queue flush` leaves for a running server
        await sched.run_once()
        assert courier.attempts("x@far.test") == 2
        store.request("retry", qid)
        await sched.run_once()
        return qid

    qid = asyncio.run(go())
    assert courier.attempts("x@far.test") == 3
    rec = store.load(qid)
    assert rec is not None and rec.recipients[0].attempts == 1  # backoff restarted by retry


class SpyStore(QueueStore):
    """Counts envelope rewrites and reads; ``crash_on_remove`` makes removal fail like a
    crash at that instant (nothing of the removal reaches the disk)."""

    def __init__(self, *args: Any, crash_on_remove: bool = False, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.saves = 0
        self.loads = 0
        self.crash_on_remove = crash_on_remove

    def save(self, record: Any) -> bool:
        self.saves += 1
        return super().save(record)

    def load(self, qid: str) -> Any:
        self.loads += 1
        return super().load(qid)

    def remove_many(self, qids: list[str]) -> set[str]:
        if self.crash_on_remove:
            raise RuntimeError("simulated crash before the removal is durable")
        return super().remove_many(qids)


def _spy(tmp_path: Path, courier: Any, clock: Clock, **kw: Any) -> tuple[Scheduler, SpyStore]:
    store = SpyStore(tmp_path, clock=clock, **kw)
    return Scheduler(store, courier, config(tmp_path), clock=clock, rng=random.Random(7)), store


async def _enqueue(sched: Scheduler, store: QueueStore, rcpts: list[str]) -> str:
    spool = SpoolFile(store.spool_tmp)
    spool.write(b"Subject: hello\r\n\r\nbody\r\n")
    return await sched.enqueue(spool, "bill@home.test", rcpts)


def test_delivered_at_first_attempt_is_removed_without_rewrite_or_reread(tmp_path: Path) -> None:
    clock = Clock()
    courier = FakeCourier()
    sched, store = _spy(tmp_path, courier, clock)

    async def go() -> str:
        await sched.load()
        qid = await _enqueue(sched, store, ["a@far.test", "b@near.test"])
        await sched.run_once()
        return qid

    qid = asyncio.run(go())
    assert courier.attempts("a@far.test") == 1 and courier.attempts("b@near.test") == 1
    # The removal is the write-back; the envelope just written is not read back either.
    assert store.saves == 0 and store.loads == 0
    assert not store.exists(qid) and list(store.ids()) == []


def test_partial_results_are_written_back_before_anything_else(tmp_path: Path) -> None:
    clock = Clock()
    courier = FakeCourier({"late@far.test": "deferred", "bad@far.test": "failed"})
    sched, store = _spy(tmp_path, courier, clock)

    async def go() -> str:
        await sched.load()
        qid = await _enqueue(sched, store, ["ok@near.test", "late@far.test", "bad@far.test"])
        await sched.run_once()
        return qid

    qid = asyncio.run(go())
    rec = store.load(qid)
    assert rec is not None
    assert [r.state for r in rec.recipients] == ["delivered", "pending", "failed"]
    assert rec.recipients[2].notified and store.saves >= 1


def test_all_final_with_a_bounce_saves_results_before_the_dsn(tmp_path: Path) -> None:
    clock = Clock()
    courier = FakeCourier({"bad@far.test": "failed"})
    sched, store = _spy(tmp_path, courier, clock)

    async def go() -> str:
        await sched.load()
        qid = await _enqueue(sched, store, ["ok@near.test", "bad@far.test"])
        await sched.run_once()
        return qid

    qid = asyncio.run(go())
    # Results saved first (a crash before the DSN must not redeliver ok@near.test), then the
    # DSN, then the removal; the DSN itself went out and was removed without a rewrite.
    assert store.saves >= 1 and not store.exists(qid)
    assert len(dsns(courier)) == 1 and list(store.ids()) == []


def test_crash_before_the_removal_is_durable_redelivers_never_loses(tmp_path: Path) -> None:
    clock = Clock()
    courier = FakeCourier()
    sched, store = _spy(tmp_path, courier, clock, crash_on_remove=True)

    async def first() -> str:
        await sched.load()
        qid = await _enqueue(sched, store, ["a@far.test"])
        await sched.run_once()
        return qid

    qid = asyncio.run(first())
    # The remote said 250 but the removal never reached the disk: still queued, pending.
    rec = QueueStore(tmp_path).load(qid)
    assert rec is not None and [r.state for r in rec.recipients] == ["pending"]
    courier2 = FakeCourier()
    store2 = QueueStore(tmp_path, clock=clock)
    sched2 = Scheduler(store2, courier2, config(tmp_path), clock=clock, rng=random.Random(1))

    async def restart() -> None:
        assert await sched2.load() == 1
        await sched2.run_once()

    asyncio.run(restart())
    # Delivered again after the restart (the RFC 5321 §6.1 duplicate window), then gone.
    assert courier.attempts("a@far.test") == 1 and courier2.attempts("a@far.test") == 1
    assert not store2.exists(qid)


def test_stop_closes_the_couriers_idle_connections(tmp_path: Path) -> None:
    clock = Clock()

    class Closable(FakeCourier):
        closed = False

        async def aclose(self) -> None:
            Closable.closed = True

    sched, _store = make(tmp_path, Closable(), clock)

    async def go() -> None:
        await sched.start()
        await sched.stop()

    asyncio.run(go())
    assert Closable.closed


def test_enqueue_waits_for_spool_recovery(tmp_path: Path) -> None:
    # recover() removes data files that have no envelope: an item committed while it runs
    # could lose its data after its 250. An enqueue during load() waits until it is over.
    import threading

    clock = Clock()
    release = threading.Event()

    class SlowRecovery(QueueStore):
        def recover(self) -> tuple[int, int]:
            release.wait(10)
            return super().recover()

    store = SlowRecovery(tmp_path, clock=clock)
    courier = FakeCourier()
    sched = Scheduler(store, courier, config(tmp_path), clock=clock, rng=random.Random(7))

    async def go() -> str:
        loading = asyncio.create_task(sched.load())
        await asyncio.sleep(0.05)
        queued = asyncio.create_task(_enqueue(sched, store, ["a@far.test"]))
        await asyncio.sleep(0.1)
        assert not queued.done() and list(store.data.iterdir()) == []  # nothing committed yet
        release.set()
        await loading
        qid = await queued
        assert store.exists(qid)
        await sched.run_once()
        return qid

    qid = asyncio.run(go())
    assert courier.attempts("a@far.test") == 1 and not store.exists(qid)


def test_each_worker_schedules_only_its_own_share_of_the_queue(tmp_path: Path) -> None:
    """workers = N: the queue is partitioned by id. Each worker's scheduler makes ids in its
    own share, loads, adopts and delivers only those, and never another worker's item."""
    clock = Clock()
    c0, c1 = FakeCourier(), FakeCourier()
    s0, st0 = _spy(tmp_path, c0, clock, partition=(0, 2))
    s1, st1 = _spy(tmp_path, c1, clock, partition=(1, 2))
    left = put(st1, "bill@home.test", ["old@far.test"])  # on disk before the start: worker 1's

    async def go() -> tuple[list[str], list[str]]:
        assert await s0.load() == 0 and await s1.load() == 1
        mine0 = [await _enqueue(s0, st0, [f"a{i}@far.test"]) for i in range(6)]
        mine1 = [await _enqueue(s1, st1, [f"b{i}@far.test"]) for i in range(6)]
        # Committed but never indexed (say, by a worker killed right after): its owner's scan
        # finds it; the other worker's scan and adopt leave it alone.
        lost = put(st1, "bill@home.test", ["late@far.test"])
        assert s0.adopt(lost) is False and await s0.adopt_unknown() == 0
        assert await s1.adopt_unknown() == 1
        await s0.run_once()
        await s1.run_once()
        return mine0, [left, *mine1, lost]

    mine0, mine1 = asyncio.run(go())
    assert all(owner_of(q, 2) == 0 for q in mine0) and all(owner_of(q, 2) == 1 for q in mine1)
    assert sorted(c[0] for c in c0.calls) == sorted(mine0)
    assert sorted(c[0] for c in c1.calls) == sorted(mine1)
    assert list(QueueStore(tmp_path).ids()) == []  # every item delivered once and removed


@pytest.mark.parametrize("count", [1, 2, 3, 5, 8, 64])
def test_queue_ids_fall_in_their_makers_share_and_dsns_follow_their_message(count: int) -> None:
    for index in range(count):
        for _ in range(200):
            qid = new_queue_id(owner=(index, count))
            assert valid_id(qid) and len(qid) == 20
            assert owner_of(qid, count) == index
            assert owner_of(f"{qid}B0", count) == owner_of(f"{qid}W", count) == index
    assert owner_of("TESTID01", 4) == 0  # another shape of id: worker 0's
    assert owner_of("00000000000000ZZZZZZ", 4) == 0


def test_control_requests_reach_every_worker_once_and_an_item_only_its_owner(tmp_path: Path) -> None:
    clock = Clock()
    w0 = QueueStore(tmp_path, clock=clock, partition=(0, 2))
    w1 = QueueStore(tmp_path, clock=clock, partition=(1, 2))
    cli = QueueStore(tmp_path)
    one = new_queue_id(owner=(1, 2))
    cli.request("flush")
    cli.request("retry", one)
    (cli.control / "bogus.request").touch()  # not a request: whoever sees it removes it
    assert w0.take_requests() == [("flush", None)]
    assert not (cli.control / "bogus.request").exists()
    assert sorted(w1.take_requests(), key=str) == sorted([("flush", None), ("retry", one)], key=str)
    assert w0.take_requests() == [] and w1.take_requests() == []  # acted on once each
    cli.request("flush")  # a second request for all is a second request
    assert w0.take_requests() == [("flush", None)]
    names = sorted(p.name for p in cli.control.iterdir())
    assert len(names) == 2 and all(n.startswith("flush.ALL.") for n in names)  # kept for the others
    old = time.time() - REQUEST_TTL - 1
    for p in cli.control.iterdir():
        os.utime(p, (old, old))
    w1.take_requests()
    assert list(cli.control.iterdir()) == []  # expired: removed by whoever saw it last
