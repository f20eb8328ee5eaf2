"""The counters every worker process must share (``workers = N``; see server/workers.py).

Each worker keeps the limits' state in memory as a single process does (connections per
client IP, the failed-login throttle, each user's messages of the last hour) and tells the
other workers what it counted, so a client meets the same limits whichever process takes its
connections, as with one process.

Transport: one pipe per worker (its inbox), made by the parent before forking; every worker
holds the write ends of the others' inboxes. An event is one JSON line of at most PIPE_BUF
octets, so concurrent writers never interleave. Writes never block: a full inbox drops the
event (that process undercounts for a moment; limits are a defence, not accounting).

Events, each prefixed with the sender's worker index:
  ["hello"]                 the sender (re)started: forget the connections counted for it
  ["c+", ip] / ["c-", ip]   a connection from ``ip`` admitted / ended
  ["F", ip, account]        a failed login (AuthThrottle.record_failure)
  ["S", ip, account]        a good login (AuthThrottle.record_success)
  ["M", user_id]            a message submitted by the user (the per-hour limit)
A worker that restarts starts from empty counters, as a restarted single process does.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import select
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .context import ServerContext

log = logging.getLogger("serpentmail.server")

MAX_EVENT = select.PIPE_BUF if hasattr(select, "PIPE_BUF") else 512


class PeerLink:
    """This worker's end: its inbox (read end) and the other workers' inboxes (write ends)."""

    def __init__(self, index: int, inbox: int, outboxes: list[int]) -> None:
        self.index = index
        self.inbox = inbox
        self.outboxes = outboxes
        self.ctx: ServerContext | None = None
        self._partial = b""
        # Connections the other workers hold: per worker, then per client IP, and per worker.
        self.remote_per_ip: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.remote_total: dict[int, int] = defaultdict(int)
        self.dropped = 0

    # --- sending -------------------------------------------------------------------------

    def send(self, *fields: Any) -> None:
        line = (json.dumps([self.index, *fields], ensure_ascii=True, separators=(",", ":")) + "\n").encode()
        if len(line) > MAX_EVENT:
            return  # an absurd account name: not worth sharing
        for fd in self.outboxes:
            try:
                os.write(fd, line)
            except OSError:  # full (or the peer is restarting): dropped, see the module docstring
                self.dropped += 1

    # --- receiving -----------------------------------------------------------------------

    def start(self, ctx: ServerContext) -> None:
        """Serve ``ctx``: its admission, throttle and send counts now include the others'."""
        self.ctx = ctx
        ctx.peers = self
        os.set_blocking(self.inbox, False)
        for fd in self.outboxes:
            os.set_blocking(fd, False)
        asyncio.get_running_loop().add_reader(self.inbox, self._read)
        self.send("hello")

    def stop(self) -> None:
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
                self.apply(int(event[0]), event[1:])
            except (ValueError, TypeError, IndexError, KeyError):
                log.warning("ignored a malformed event from another worker")

    def apply(self, sender: int, event: list[Any]) -> None:
        ctx = self.ctx
        assert ctx is not None
        kind = event[0]
        if kind == "c+":
            self.remote_per_ip[sender][str(event[1])] += 1
            self.remote_total[sender] += 1
        elif kind == "c-":
            per_ip = self.remote_per_ip[sender]
            ip = str(event[1])
            n = per_ip.pop(ip, 0)
            if n > 1:
                per_ip[ip] = n - 1
            if n:
                self.remote_total[sender] -= 1
        elif kind == "F" and ctx.throttle is not None:
            ctx.throttle.record_failure(str(event[1]), event[2] if event[2] is None else str(event[2]))
        elif kind == "S" and ctx.throttle is not None:
            ctx.throttle.record_success(str(event[1]), str(event[2]))
        elif kind == "M":
            ctx.sent_per_user.setdefault(int(event[1]), []).append(time.monotonic())
        elif kind == "hello":
            self.remote_per_ip.pop(sender, None)
            self.remote_total.pop(sender, None)

    # --- what admission asks -------------------------------------------------------------

    def connections(self) -> int:
        return sum(self.remote_total.values())

    def connections_from(self, ip: str) -> int:
        return sum(per_ip.get(ip, 0) for per_ip in self.remote_per_ip.values())


def make_inboxes(count: int) -> list[tuple[int, int]]:
    """One pipe per worker: (read end, write end)."""
    return [os.pipe() for _ in range(count)]


def link_for(index: int, inboxes: list[tuple[int, int]]) -> PeerLink:
    """In worker ``index`` after fork: keep its inbox's read end and the others' write ends;
    close the rest."""
    outboxes = []
    for i, (r, w) in enumerate(inboxes):
        if i == index:
            os.close(w)
        else:
            os.close(r)
            outboxes.append(w)
    return PeerLink(index, inboxes[index][0], outboxes)
