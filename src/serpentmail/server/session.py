"""The connection lifecycle shared by the SMTP and POP3 adapters.

:class:`EngineSession` is an ``asyncio.Protocol`` that drives a sans-IO engine (anything with
``greeting``/``receive_data``/``next_event``/``data_to_send``/``buffered``): admission against
the connection limits, the pump that turns engine events into handler calls, tasks for
decisions that must wait (password checks, fsync, file reads) during which nothing more is
processed (so pipelined commands stay in order), back-pressure on reading, idle timeouts and
the STARTTLS/STLS upgrade. Subclasses say what their protocol does with each event.

Idle timeouts are checked by one timer per process (:func:`_sweep_idle`), not one per
connection: a connection's own timer cost a timer handle made and started at each connect
(and memory while idle); the sweep looks at every session once a second instead (more often
when a timeout is under 4 s).

Invariants: a session is counted in ``ctx.connections``/``ctx.sessions`` exactly while it is
admitted; nothing is read in plaintext once a TLS upgrade has been answered (RFC 3207 §4.2,
RFC 2595 §4); an unexpected exception is logged with detail and the peer gets a generic reply.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import Any, ClassVar, Protocol, cast

from ..log import log_event
from .context import ServerContext


class Engine(Protocol):
    def greeting(self) -> bytes: ...

    def receive_data(self, data: bytes) -> None: ...

    def next_event(self) -> object: ...

    def data_to_send(self) -> bytes: ...

    @property
    def buffered(self) -> int: ...

    def tls_established(self) -> None: ...


class EngineSession(asyncio.Protocol):
    """One connection driven by a sans-IO engine. See the module docstring."""

    # Class attributes, never per instance: mypyc evaluates an instance attribute's default
    # for each new object (a getLogger() per connection).
    log: ClassVar[logging.Logger] = logging.getLogger("serpentmail.server")
    need_data: ClassVar[object] = None  # the engine module's NEED_DATA sentinel
    max_buffered: ClassVar[int] = 4 * 1024 * 1024  # unprocessed octets before we stop reading from the peer

    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx
        self.transport: asyncio.Transport | None = None
        self.ip = "?"
        self._busy = False
        self._closing = False
        self._admitted = False
        self._last_activity = time.monotonic()
        self._task: asyncio.Task[None] | None = None

    # --- what a protocol provides ----------------------------------------------------------

    def make_engine(self) -> Engine:
        raise NotImplementedError

    @property
    def engine_or_none(self) -> Engine | None:
        raise NotImplementedError

    def refusal(self) -> bytes:
        """What to send when the connection limits refuse a client."""
        raise NotImplementedError

    def handle(self, ev: object) -> None:
        raise NotImplementedError

    def on_internal_error(self) -> None:
        """Tell the peer something generic after an unexpected exception."""
        raise NotImplementedError

    def idle_timeout(self) -> float:
        raise NotImplementedError

    def on_idle_timeout(self) -> None:
        raise NotImplementedError

    def on_connection_lost(self) -> None:
        """Release what the session holds (spool file, mailbox lock)."""

    def after_task(self) -> bool:
        """Called when a task ends while the session is closing; False stops the pump."""
        return not self._closing

    # --- asyncio callbacks -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        tr = cast(asyncio.Transport, transport)
        self.transport = tr
        peer = tr.get_extra_info("peername")
        self.ip = str(peer[0]) if peer else "?"
        if not self.ctx.admit(self.ip):
            tr.write(self.refusal())
            log_event(self.log, "connection refused", logging.WARNING, client=self.ip, reason="connection limit")
            tr.close()
            return
        self._admitted = True
        self.ctx.sessions.add(self)
        if self.ctx.cpu_pin is not None:
            self.ctx.cpu_pin.update(len(self.ctx.sessions))
        if self.ctx.steering is not None and self.ctx.peers is not None:
            self.ctx.steering.update(self.ctx.peers.connections())
        engine = self.make_engine()
        tr.write(engine.greeting())
        if self.ctx.idle_sweep is None:
            _start_idle_sweep(self.ctx)

    def data_received(self, data: bytes) -> None:
        engine = self.engine_or_none
        if engine is None or self._closing:
            return
        self._last_activity = time.monotonic()
        engine.receive_data(data)
        if engine.buffered > self.max_buffered and self.transport is not None:
            self.transport.pause_reading()
        if not self._busy:
            self.pump()

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self.on_connection_lost()
        if self._admitted:
            self._admitted = False
            self.ctx.release(self.ip)
            self.ctx.sessions.discard(self)
            if self.ctx.cpu_pin is not None:
                self.ctx.cpu_pin.update(len(self.ctx.sessions))
            if self.ctx.steering is not None and self.ctx.peers is not None:
                self.ctx.steering.update(self.ctx.peers.connections())

    # --- the pump --------------------------------------------------------------------------

    def flush(self) -> None:
        engine = self.engine_or_none
        if engine is not None and self.transport is not None and not self.transport.is_closing():
            out = engine.data_to_send()
            if out:
                self.transport.write(out)

    def pump(self) -> None:
        engine = self.engine_or_none
        assert engine is not None
        try:
            while not self._busy and not self._closing:
                ev = engine.next_event()
                if ev is self.need_data:
                    break
                self.handle(ev)
        except Exception:  # a bug: log the detail, tell the peer nothing specific
            self.log.exception("internal error in session client=%s", self.ip)
            self.on_internal_error()
        self.flush()
        if not self._busy and self.transport is not None and engine.buffered < self.max_buffered:
            self.transport.resume_reading()

    def start_task(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a decision that must wait; nothing else is processed until it ends."""
        self._busy = True
        self._task = asyncio.ensure_future(coro)
        self._task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._busy = False
        self._last_activity = time.monotonic()
        exc = None if task.cancelled() else task.exception()
        if exc is not None and not self._closing:
            self.log.error("internal error in session client=%s: %r", self.ip, exc, exc_info=exc)
            self.on_internal_error()
        if not self.after_task():
            return
        self.pump()

    def close(self) -> None:
        self._closing = True
        if self.transport is not None:
            self.transport.close()

    # --- idle timeout ------------------------------------------------------------------------

    def check_idle(self, now: float) -> None:
        """Close the session if it has been idle past its timeout (called by the sweep). A
        session waiting for a decision (a commit, a password check) is not idle."""
        if self._closing or self._busy or now - self._last_activity < self.idle_timeout():
            return
        log_event(self.log, "idle timeout", client=self.ip)
        self.on_idle_timeout()

    # --- TLS upgrade ---------------------------------------------------------------------------

    def begin_tls(self) -> None:
        """Answer to STARTTLS/STLS is queued: stop reading plaintext, then upgrade."""
        assert self.transport is not None
        self.transport.pause_reading()
        self.start_task(self._upgrade())

    async def _upgrade(self) -> None:
        engine = self.engine_or_none
        assert engine is not None and self.transport is not None and self.ctx.tls is not None
        self.flush()
        loop = asyncio.get_running_loop()
        try:
            new_transport = await asyncio.wait_for(
                loop.start_tls(self.transport, self, self.ctx.tls, server_side=True), timeout=30)
        except Exception as exc:
            log_event(self.log, "tls handshake failed", logging.INFO, client=self.ip, error=repr(exc))
            self._closing = True
            if self.transport is not None:
                self.transport.abort()
            return
        if new_transport is None:
            self.close()
            return
        self.transport = new_transport
        engine.tls_established()


def _sweep_period(ctx: ServerContext) -> float:
    """How often the sessions' idle times are checked: a quarter of the shorter timeout (a
    session is closed at most that late), at most once a second, at least every 20 ms."""
    lim = ctx.config.limits
    return min(1.0, max(0.02, min(lim.idle_timeout, lim.pop3_idle_timeout) / 4))


def _start_idle_sweep(ctx: ServerContext) -> None:
    ctx.idle_sweep = asyncio.get_running_loop().call_later(_sweep_period(ctx), _sweep_idle, ctx)


def _sweep_idle(ctx: ServerContext) -> None:
    """Check every session's idle time; again after a period while there are sessions (the
    next connection starts it again otherwise: an idle server has no timer)."""
    ctx.idle_sweep = None
    if not ctx.sessions:
        return
    now = time.monotonic()
    for session in list(ctx.sessions):  # a session closed here leaves the set later, still
        try:
            session.check_idle(now)
        except Exception:  # one session's bug must not stop the sweep for the others
            EngineSession.log.exception("internal error in the idle check client=%s", getattr(session, "ip", "?"))
    _start_idle_sweep(ctx)
