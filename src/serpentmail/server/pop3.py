"""The asyncio adapter for the POP3 engine: ``pop3`` (110, STLS) and ``pop3s`` (995, TLS).

This layer owns the socket, TLS, the idle timer and the connection limits, and answers the
engine's decisions: logins (argon2 off the loop, failure delay and throttle, all in
:meth:`ServerContext.check_password`), the maildrop lock and snapshot, message streaming and
UPDATE — all blocking file work in worker threads.

Invariants:

* The mailbox path comes from the account's stored id (``ctx.maildir(user.id)``), never from
  the login text.
* Only QUIT from TRANSACTION applies deletions. A dropped connection, an idle timeout or a
  server shutdown releases the lock and applies nothing (RFC 1939 §6).
* RETR streams: 256 KiB reads in a worker thread, stuffed by the engine with bytes ops, and
  the next read waits while the transport's write buffer is above its high-water mark
  (``pause_writing``/``resume_writing``), so a slow client cannot make the server buffer a
  whole mailbox.
* Peers get generic replies; exception detail goes to the log.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, BinaryIO, cast

from ..log import log_event
from ..proto import pop3 as P
from ..proto.pop3 import (
    NEED_DATA,
    CloseConnection,
    LoginAttempt,
    POP3Limits,
    POP3Options,
    POP3ServerConnection,
    Retrieve,
    StartTLS,
    Update,
)
from ..storage.mailbox import Mailbox, MailboxInUse, open_mailbox
from .context import ServerContext
from .run import EXTRA_LISTENERS

if TYPE_CHECKING:
    from .run import Server

log = logging.getLogger("serpentmail.pop3")

CHUNK = 256 * 1024
_MAX_BUFFERED = 64 * 1024  # unprocessed command octets before we stop reading


def _is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


class POP3Session(asyncio.Protocol):
    """One POP3 connection."""

    def __init__(self, ctx: ServerContext, *, implicit_tls: bool, plaintext_on_loopback: bool = True) -> None:
        self.ctx = ctx
        self.implicit_tls = implicit_tls
        self.plaintext_on_loopback = plaintext_on_loopback
        self.transport: asyncio.Transport | None = None
        self.ip = "?"
        self.engine: POP3ServerConnection | None = None
        self.mailbox: Mailbox | None = None
        self.user_address = "-"
        self._busy = False
        self._closing = False
        self._admitted = False
        self._applying = False
        self._writable = asyncio.Event()
        self._writable.set()
        self._last_activity = time.monotonic()
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None

    # --- asyncio callbacks ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.ip = str(peer[0]) if peer else "?"
        if not self.ctx.admit(self.ip):
            transport.write(P.POP3Reply(False, "Too many connections, try again later", "SYS/TEMP").to_bytes())
            log_event(log, "connection refused", logging.WARNING, client=self.ip, reason="connection limit")
            transport.close()
            return
        self._admitted = True
        self.ctx.sessions.add(self)
        cfg = self.ctx.config
        self.engine = POP3ServerConnection(
            POP3Options(
                hostname=cfg.hostname,
                tls_available=self.ctx.tls is not None and not self.implicit_tls,
                tls_active=self.implicit_tls,
                plaintext_auth_ok=self.plaintext_on_loopback and _is_loopback(self.ip),
            ),
            POP3Limits(max_line_length=max(512, cfg.limits.max_line_length), max_errors=cfg.limits.max_errors),
        )
        transport.write(self.engine.greeting())
        self._arm_timer()

    def data_received(self, data: bytes) -> None:
        engine = self.engine
        if engine is None or self._closing:
            return
        self._last_activity = time.monotonic()
        engine.receive_data(data)
        if engine.buffered > _MAX_BUFFERED and self.transport is not None:
            self.transport.pause_reading()
        if not self._busy:
            self._pump()

    def eof_received(self) -> bool | None:
        return None

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._writable.set()  # wake a streaming task so it notices the close
        if self._timer is not None:
            self._timer.cancel()
        if not self._busy:
            self._release_mailbox()
        # A busy task (login, transfer, UPDATE) finishes its current step, sees _closing and
        # releases the mailbox itself: an UPDATE in a worker thread is never cut in half.
        if self._admitted:
            self._admitted = False
            self.ctx.release(self.ip)
            self.ctx.sessions.discard(self)

    # --- engine pump ---------------------------------------------------------------------

    def _flush(self) -> None:
        if self.engine is not None and self.transport is not None and not self.transport.is_closing():
            out = self.engine.data_to_send()
            if out:
                self.transport.write(out)

    def _pump(self) -> None:
        engine = self.engine
        assert engine is not None
        try:
            while not self._busy and not self._closing:
                ev = engine.next_event()
                if ev is NEED_DATA:
                    break
                self._handle(ev)
        except Exception:  # a bug: log it, tell the peer nothing specific, drop the session
            log.exception("internal error in POP3 session client=%s", self.ip)
            engine.close(P.SYS_TEMP)
            self._flush()
            self._close()
            return
        self._flush()
        if not self._busy and self.transport is not None and engine.buffered < _MAX_BUFFERED:
            self.transport.resume_reading()

    def _handle(self, ev: object) -> None:
        match ev:
            case LoginAttempt():
                self._start_task(self._on_login(ev))
            case Retrieve():
                self._start_task(self._on_retrieve(ev))
            case Update():
                self._start_task(self._on_update(ev))
            case StartTLS():
                # RFC 2595 §4: nothing more is read in plaintext once STLS is answered.
                assert self.transport is not None
                self.transport.pause_reading()
                self._start_task(self._on_stls())
            case CloseConnection():
                self._flush()
                self._close()

    def _start_task(self, coro: Coroutine[Any, Any, None]) -> None:
        self._busy = True
        self._task = asyncio.ensure_future(coro)
        self._task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._busy = False
        self._last_activity = time.monotonic()
        exc = None if task.cancelled() else task.exception()
        if exc is not None:
            log.error("internal error in POP3 session client=%s: %r", self.ip, exc, exc_info=exc)
            if self.engine is not None:
                self.engine.close(P.SYS_TEMP)
            self._flush()
            self._close()
        if self._closing:
            self._release_mailbox()
            return
        self._pump()

    def _close(self) -> None:
        self._closing = True
        if self.transport is not None:
            self.transport.close()

    def _release_mailbox(self) -> None:
        if self.mailbox is not None and not self._applying:
            self.mailbox.close()
            self.mailbox = None

    # --- idle timeout and shutdown -------------------------------------------------------

    def _arm_timer(self, delay: float | None = None) -> None:
        timeout = self.ctx.config.limits.pop3_idle_timeout
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(timeout if delay is None else delay, self._on_timer)

    def _on_timer(self) -> None:
        if self._closing:
            return
        idle = time.monotonic() - self._last_activity
        timeout = self.ctx.config.limits.pop3_idle_timeout
        if idle < timeout or self._busy:
            self._arm_timer(max(0.05, timeout - idle))
            return
        log_event(log, "idle timeout", client=self.ip, user=self.user_address)
        self._end(P.IDLE_TIMEOUT)

    def shutdown(self, reply: object = None) -> None:
        """Server shutdown: ``-ERR [SYS/TEMP]``, close, apply nothing. ``reply`` (an SMTP
        reply from the shared shutdown loop) is ignored."""
        self._end(P.SHUTTING_DOWN)

    def _end(self, reply: P.POP3Reply) -> None:
        if self.engine is not None and not self._closing:
            self.engine.close(reply)
            self._flush()
        self._close()
        if not self._busy:
            self._release_mailbox()

    @property
    def idle(self) -> bool:
        return not self._busy

    # --- decisions -----------------------------------------------------------------------

    async def _on_login(self, ev: LoginAttempt) -> None:
        engine = self.engine
        assert engine is not None
        throttle = self.ctx.throttle
        assert throttle is not None
        if throttle.blocked(self.ip, ev.username):
            log_event(log, "auth throttled", logging.WARNING, service="pop3", user=ev.username[:64], client=self.ip)
            engine.reject_login(P.AUTH_THROTTLED)
            return
        user = await self.ctx.check_password(ev.username, ev.password, self.ip, "pop3")
        if self._closing:
            return
        if user is None:
            engine.reject_login(P.AUTH_FAILED)
            return
        loop = asyncio.get_running_loop()
        try:
            path = self.ctx.maildir(user.id)  # from the account id, never the login text
            mailbox = await loop.run_in_executor(None, open_mailbox, path)
        except MailboxInUse:
            log_event(log, "mailbox in use", service="pop3", user=user.address, client=self.ip)
            engine.reject_login(P.IN_USE, counts_as_failure=False)
            return
        except OSError as exc:
            log_event(log, "mailbox open failed", logging.ERROR, user=user.address, client=self.ip, error=repr(exc))
            engine.reject_login(P.SYS_TEMP, counts_as_failure=False)
            return
        self.mailbox = mailbox
        if self._closing:
            return  # _task_done releases it
        self.user_address = user.address
        log_event(log, "login", service="pop3", user=user.address, client=self.ip,
                  messages=len(mailbox.entries), tls="yes" if engine.tls_active else "no")
        engine.accept_login(mailbox.listing)

    async def _on_retrieve(self, ev: Retrieve) -> None:
        engine = self.engine
        mailbox = self.mailbox
        assert engine is not None and mailbox is not None
        loop = asyncio.get_running_loop()
        try:
            f, piece = await loop.run_in_executor(None, _open_and_read, mailbox, ev.index)
        except OSError as exc:
            log_event(log, "message unreadable", logging.ERROR, user=self.user_address, client=self.ip,
                      msg=ev.number, error=repr(exc))
            engine.fail_retrieve(P.SYS_TEMP.with_text("Message cannot be read right now"))
            return
        try:
            engine.begin_transfer()
            while piece and not self._closing:
                more = engine.transfer_data(piece)
                self._flush()
                if not more:
                    break
                if not self._writable.is_set():
                    try:
                        # A client that stops reading is idle too (RFC 1939 §3 autologout).
                        await asyncio.wait_for(self._writable.wait(), self.ctx.config.limits.pop3_idle_timeout)
                    except TimeoutError:
                        log_event(log, "write timeout", client=self.ip, user=self.user_address)
                        engine.close()
                        self._closing = True
                        if self.transport is not None:
                            self.transport.abort()
                        break
                if self._closing:
                    break
                piece = await loop.run_in_executor(None, f.read, CHUNK)
        except OSError as exc:
            # +OK is already out: the only honest way to fail now is to drop the connection.
            log_event(log, "message read failed", logging.ERROR, user=self.user_address, client=self.ip,
                      msg=ev.number, error=repr(exc))
            engine.close()
            self._close()
            return
        finally:
            f.close()
        if not self._closing:
            engine.end_transfer()

    async def _on_update(self, ev: Update) -> None:
        engine = self.engine
        mailbox = self.mailbox
        assert engine is not None and mailbox is not None
        loop = asyncio.get_running_loop()
        self._applying = True
        try:
            await loop.run_in_executor(None, mailbox.apply, ev.deleted)
        except OSError as exc:
            log_event(log, "update failed", logging.ERROR, user=self.user_address, client=self.ip, error=repr(exc))
            reply = P.UPDATE_FAILED
        else:
            reply = P.UPDATED
            log_event(log, "logout", service="pop3", user=self.user_address, client=self.ip,
                      deleted=len(ev.deleted), kept=len(mailbox.entries) - len(ev.deleted))
        finally:
            self._applying = False
        self._release_mailbox()
        if not self._closing:
            engine.update_done(reply)

    async def _on_stls(self) -> None:
        engine = self.engine
        assert engine is not None and self.transport is not None and self.ctx.tls is not None
        self._flush()
        loop = asyncio.get_running_loop()
        try:
            new_transport = await asyncio.wait_for(
                loop.start_tls(self.transport, self, self.ctx.tls, server_side=True), timeout=30)
        except Exception as exc:
            log_event(log, "tls handshake failed", logging.INFO, client=self.ip, error=repr(exc))
            self._closing = True
            if self.transport is not None:
                self.transport.abort()
            return
        if new_transport is None:
            self._close()
            return
        self.transport = new_transport
        engine.tls_established()


def _open_and_read(mailbox: Mailbox, index: int) -> tuple[BinaryIO, bytes]:
    """Open a message and read its first piece in one worker-thread hop."""
    f = mailbox.open_message(index)
    try:
        return f, f.read(CHUNK)
    except BaseException:
        f.close()
        raise


async def start_pop3_listeners(ctx: ServerContext, endpoints: list[tuple[str, int]], *, implicit_tls: bool,
                               plaintext_on_loopback: bool = True) -> list[asyncio.base_events.Server]:
    loop = asyncio.get_running_loop()
    servers = []
    ssl_ctx = ctx.tls if implicit_tls else None
    for host, port in endpoints:
        srv = await loop.create_server(
            lambda: POP3Session(ctx, implicit_tls=implicit_tls, plaintext_on_loopback=plaintext_on_loopback),
            host, port, ssl=ssl_ctx, reuse_address=True, backlog=1024,
            ssl_handshake_timeout=30 if ssl_ctx else None)
        servers.append(srv)
    return servers


async def _start(server: Server) -> list[asyncio.base_events.Server]:
    ctx = server.ctx
    assert ctx is not None
    cfg = server.config
    servers: list[asyncio.base_events.Server] = []
    if cfg.pop3.listen:
        servers += await start_pop3_listeners(ctx, [(e.host, e.port) for e in cfg.pop3.listen], implicit_tls=False)
        server.bound.extend(("pop3", e) for e in cfg.pop3.listen)
    if cfg.pop3s.listen:
        if ctx.tls is None:
            log_event(log, "pop3s disabled: no TLS certificate", logging.WARNING)
        else:
            servers += await start_pop3_listeners(ctx, [(e.host, e.port) for e in cfg.pop3s.listen], implicit_tls=True)
            server.bound.extend(("pop3s", e) for e in cfg.pop3s.listen)
    return servers


EXTRA_LISTENERS["pop3"] = _start
