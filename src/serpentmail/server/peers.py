"""The counters every worker process must share (``workers = N``; see server/workers.py).

A client must meet the same limits whichever process serves it: connections in all and per
client IP, the failed-login throttle, each user's messages of the last hour.

**Connections** (counted at every connect, so this must cost nothing): a table in memory
shared by all workers (an anonymous shared mapping made by the parent before forking). Each
worker has its own row and is its only writer: the row's total and one counter per bucket of
client addresses (crc32 of the address modulo :data:`BUCKETS`; two addresses sharing a bucket
share its count, which can only make the per-IP limit stricter, never looser). Readers add the
rows up. Aligned 32-bit stores are atomic, and a restarted worker zeroes its row first, so the
connections of a dead worker are not counted forever.

**Logins and sent messages** (rare, or per message): events on pipes, one per worker (its
inbox, made by the parent); every worker holds the write ends of the others' inboxes. An event
is one JSON line under PIPE_BUF octets, so concurrent writers never interleave; writes never
block (a full inbox drops the event: a limit is a defence, not accounting). Sent messages are
gathered and told at most every :data:`SEND_FLUSH` seconds, so a busy worker does not wake
the others for each message.

Events, each prefixed with the sender's worker index:
  ["F", ip, account]   a failed login (AuthThrottle.record_failure)
  ["S", ip, account]   a good login (AuthThrottle.record_success)
  ["M", {uid: n}]      messages submitted per user since the last such event
A restarted worker starts with an empty throttle and empty send counts, as a restarted single
process does.
"""

from __future__ import annotations

import asyncio
import json
import logging
import mmap
import os
import select
import time
import zlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .context import ServerContext

log = logging.getLogger("serpentmail.server")

MAX_EVENT = getattr(select, "PIPE_BUF", 512)
BUCKETS = 4096  # client-address buckets per worker row (+1 slot for the row's total)
SEND_FLUSH = 0.05  # seconds: sent-message counts are told at most this often


class ConnectionTable:
    """The shared connection counters: ``workers`` rows of 1 + BUCKETS int32."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._map = mmap.mmap(-1, workers * (BUCKETS + 1) * 4)  # MAP_SHARED | MAP_ANONYMOUS
        self.cells = memoryview(self._map).cast("i")

    @staticmethod
    def bucket(ip: str) -> int:
        return 1 + zlib.crc32(ip.encode("ascii", "replace")) % BUCKETS

    def row(self, index: int) -> int:
        return index * (BUCKETS + 1)

    def clear_row(self, index: int) -> None:
        base = self.row(index)
        self.cells[base:base + BUCKETS + 1] = memoryview(bytes((BUCKETS + 1) * 4)).cast("i")

    def add(self, index: int, ip: str, delta: int) -> None:
        base = self.row(index)
        cells = self.cells
        cells[base] += delta
        cells[base + self.bucket(ip)] += delta

    def total(self) -> int:
        cells, step = self.cells, BUCKETS + 1
        return sum(cells[i * step] for i in range(self.workers))

    def from_ip(self, ip: str) -> int:
        cells, step, b = self.cells, BUCKETS + 1, self.bucket(ip)
        return sum(cells[i * step + b] for i in range(self.workers))


class PeerLink:
    """This worker's end: its row of the connection table, its inbox (read end) and the
    other workers' inboxes (write ends)."""

    def __init__(self, index: int, table: ConnectionTable, inbox: int, outboxes: list[int]) -> None:
        self.index = index
        self.table = table
        self.inbox = inbox
        self.outboxes = outboxes
        self.ctx: ServerContext | None = None
        self._partial = b""
        self._sent: dict[int, int] = {}  # user id -> messages not yet told
        self._flush_handle: asyncio.TimerHandle | None = None
        self.dropped = 0

    # --- connections (shared memory) ------------------------------------------------------

    def connection_opened(self, ip: str) -> None:
        self.table.add(self.index, ip, 1)

    def connection_closed(self, ip: str) -> None:
        self.table.add(self.index, ip, -1)

    def connections(self) -> int:
        """Connections the whole server holds (this worker's included)."""
        return self.table.total()

    def connections_from(self, ip: str) -> int:
        return self.table.from_ip(ip)

    # --- events (pipes) --------------------------------------------------------------------

    def send(self, *fields: Any) -> None:
        line = (json.dumps([self.index, *fields], ensure_ascii=True, separators=(",", ":")) + "\n").encode()
        if len(line) > MAX_EVENT:
            return  # an absurd account name: not worth sharing
        for fd in self.outboxes:
            try:
                os.write(fd, line)
            except OSError:  # full (or the peer is restarting): dropped, see the module docstring
                self.dropped += 1

    def message_sent(self, user_id: int) -> None:
        self._sent[user_id] = self._sent.get(user_id, 0) + 1
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_later(SEND_FLUSH, self._flush_sent)

    def _flush_sent(self) -> None:
        self._flush_handle = None
        sent, self._sent = self._sent, {}
        if sent:
            self.send("M", {str(uid): n for uid, n in sent.items()})

    def start(self, ctx: ServerContext) -> None:
        """Serve ``ctx``: its admission, throttle and send counts now include the others'."""
        self.ctx = ctx
        ctx.peers = self
        self.table.clear_row(self.index)  # a dead predecessor's connections are gone
        os.set_blocking(self.inbox, False)
        for fd in self.outboxes:
            os.set_blocking(fd, False)
        asyncio.get_running_loop().add_reader(self.inbox, self._read)

    def stop(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_sent()
        try:
            asyncio.get_running_loop().remove_reader(self.inbox)
        except (RuntimeError, ValueError):
            pass

    def _read(self) -> None:
        try:
            chunk = os.read(self.inbox, 65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self.stop()
            return
        data = self._partial + chunk
        *lines, self._partial = data.split(b"\n")
        for line in lines:
            try:
                event = json.loads(line)
                self.apply(event[1:])
            except (ValueError, TypeError, IndexError, KeyError, AttributeError):
                log.warning("ignored a malformed event from another worker")

    def apply(self, event: list[Any]) -> None:
        ctx = self.ctx
        assert ctx is not None
        kind = event[0]
        if kind == "F" and ctx.throttle is not None:
            ctx.throttle.record_failure(str(event[1]), None if event[2] is None else str(event[2]))
        elif kind == "S" and ctx.throttle is not None:
            ctx.throttle.record_success(str(event[1]), str(event[2]))
        elif kind == "M":
            now = time.monotonic()
            for uid, n in event[1].items():
                ctx.sent_per_user.setdefault(int(uid), []).extend([now] * min(int(n), 100_000))


def make_inboxes(count: int) -> list[tuple[int, int]]:
    """One pipe per worker: (read end, write end)."""
    return [os.pipe() for _ in range(count)]


def link_for(index: int, table: ConnectionTable, inboxes: list[tuple[int, int]]) -> PeerLink:
    """In worker ``index`` after fork: keep its inbox's read end and the others' write ends;
    close the rest."""
    outboxes = []
    for i, (r, w) in enumerate(inboxes):
        if i == index:
            os.close(w)
        else:
            os.close(r)
            outboxes.append(w)
    return PeerLink(index, table, inboxes[index][0], outboxes)
