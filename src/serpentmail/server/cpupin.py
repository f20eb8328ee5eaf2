"""Worker CPU affinity: the event-loop thread of a busy worker stays on one CPU.

Linux only (``os.sched_setaffinity``); elsewhere, or with one allowed CPU, nothing is done.
"""

from __future__ import annotations

import os


class CpuPin:
    """Keeps a worker's event-loop thread on "its" CPU while the worker is busy.

    Measured on the 2-CPU reference machine with two workers (python -m bench.ab style pairs,
    same code, pinned against free): at 10 concurrent sessions the pinned pair took +26-31%
    messages per second (CPU per message -8 to -14%), at 50 sessions +13%; but a lone client
    went 29% slower, because its connection's worker could no longer run beside it on the
    other CPU. So the thread is pinned from its second session on and freed again when it has
    none. Only the calling thread is affected (``sched_setaffinity(0, ...)`` on Linux): the
    committer, started with the server, stays free, and so do the threads of the worker's
    pool, started by the loop thread: they free themselves first (:meth:`free_thread`)."""

    def __init__(self, cpu: int, allowed: set[int]) -> None:
        self.cpu = cpu
        self.allowed = allowed
        self.pinned = False
        self.failed = False

    @classmethod
    def for_worker(cls, index: int) -> CpuPin | None:
        try:
            allowed = os.sched_getaffinity(0)
        except (AttributeError, OSError):
            return None
        if len(allowed) < 2:
            return None
        return cls(sorted(allowed)[index % len(allowed)], set(allowed))

    def free_thread(self) -> None:
        """Give the calling thread every allowed CPU again: the initializer of the worker's
        thread pool (server/run.py). A thread inherits its creator's affinity, so a pool
        thread started while the loop was pinned would otherwise stay on the loop's CPU for
        good, long after the load that pinned it: password checks, mailbox scans and POP3
        deletions then queue behind the event loop instead of using the idle CPU."""
        try:
            os.sched_setaffinity(0, self.allowed)
        except OSError:
            pass

    def update(self, sessions: int) -> None:
        if self.failed:
            return
        try:
            if sessions >= 2 and not self.pinned:
                os.sched_setaffinity(0, {self.cpu})
                self.pinned = True
            elif sessions == 0 and self.pinned:
                os.sched_setaffinity(0, self.allowed)
                self.pinned = False
        except OSError:  # not allowed here (a container's cpuset changed): stop trying
            self.pinned = False
            self.failed = True
