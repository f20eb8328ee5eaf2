"""CpuPin: a worker's event-loop thread is kept on its CPU from its second session until idle."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from serpentmail.server.cpupin import CpuPin


def test_the_loop_thread_is_pinned_while_busy_and_freed_when_idle() -> None:
    allowed = os.sched_getaffinity(0)
    if len(allowed) < 2:
        pytest.skip("needs two CPUs")
    seen: dict[str, set[int]] = {}

    def worker_thread() -> None:  # affinity is per thread: leave the test runner's alone
        pin = CpuPin.for_worker(1)
        assert pin is not None
        for label, sessions in (("lone", 1), ("busy", 2), ("busier", 7), ("back to one", 1), ("idle", 0)):
            pin.update(sessions)
            seen[label] = os.sched_getaffinity(0)

    t = threading.Thread(target=worker_thread)
    t.start()
    t.join()
    mine = {sorted(allowed)[1]}  # worker index 1 -> the second allowed CPU
    assert seen == {"lone": allowed, "busy": mine, "busier": mine, "back to one": mine, "idle": allowed}
    assert os.sched_getaffinity(0) == allowed  # the calling thread only


def test_nothing_to_pin_on_one_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert CpuPin.for_worker(0) is None


def test_a_refused_pin_is_not_an_error_and_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[set[int]] = []

    def refuse(pid: int, cpus: set[int]) -> None:
        calls.append(cpus)
        raise PermissionError("cpuset changed")

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(os, "sched_setaffinity", refuse)
    pin = CpuPin.for_worker(0)
    assert pin is not None
    pin.update(3)  # a session is being admitted: it must not fail because of this
    pin.update(0)
    pin.update(4)
    assert calls == [{0}] and not pin.pinned


def test_pool_threads_started_while_the_loop_is_pinned_get_every_cpu_back() -> None:
    """A thread inherits its creator's affinity: without the initializer, a pool thread started
    under load stays on the loop's CPU for good (as the server's did before)."""
    allowed = os.sched_getaffinity(0)
    if len(allowed) < 2:
        pytest.skip("needs two CPUs")
    seen: dict[str, set[int]] = {}

    def loop_thread() -> None:
        pin = CpuPin.for_worker(0)
        assert pin is not None
        pin.update(2)  # busy: this thread is pinned, and starts the pools' threads now
        with ThreadPoolExecutor(1) as plain, ThreadPoolExecutor(1, initializer=pin.free_thread) as freed:
            seen["plain"] = plain.submit(os.sched_getaffinity, 0).result()
            seen["freed"] = freed.submit(os.sched_getaffinity, 0).result()
        seen["loop"] = os.sched_getaffinity(0)

    t = threading.Thread(target=loop_thread)
    t.start()
    t.join()
    mine = {sorted(allowed)[0]}
    assert seen == {"plain": mine, "freed": allowed, "loop": mine}
