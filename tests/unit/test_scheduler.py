"""The scheduler with fake couriers and a fake clock: retry schedule, lifetime expiry, DSNs,
the null sender, concurrency limits, restart behaviour."""

from __future__ import annotations

import asyncio
import email
import random
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from serpentmail.config import Config, DeliveryConfig, embedded_default
from serpentmail.delivery.base import Envelope, RecipientResult, Status
from serpentmail.queue.scheduler import COURIER_ERROR, Scheduler
from serpentmail.queue.store import QueueStore

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
