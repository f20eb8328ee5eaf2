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
* RETR of a message of at most ``SYNC_READ_MAX`` octets (by ``fstat``) is one bounded
  ``read`` on the event loop (see the constant for the measured trade); larger messages
  stream: 256 KiB reads in a worker thread, stuffed by the engine with bytes ops, and the next
  read waits while the transport's write buffer is above its high-water mark
  (``pause_writing``/``resume_writing``). A RETR that arrives while the buffer is above that
  mark waits the same way before anything is read, so a slow client pipelining RETRs cannot
  make the server buffer a whole mailbox either.
* Only regular files are read (``O_NONBLOCK`` open, ``S_ISREG``): anything else under a
  message's name gets ``-ERR [SYS/TEMP]`` instead of blocking.
* Peers get generic replies; exception detail goes to the log.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import ipaddress
import logging
import os
import stat
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, BinaryIO

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
from ..storage.journal import wait_checkpointed
from ..storage.mailbox import Mailbox, MailboxInUse, delivered_at, open_mailbox
from .context import ServerContext
from .run import EXTRA_LISTENERS, open_listeners
from .session import EngineSession

if TYPE_CHECKING:
    from ..config import Endpoint
    from .run import Server

log = logging.getLogger("serpentmail.pop3")

CHUNK = 256 * 1024
# Messages up to this size are read on the event loop in one read(2) instead of in a worker
# thread: in bench scenario 3 (5,000 x 4 KiB) the executor submit and worker wake-ups were
# ~40% of the server's py-spy samples, more than the read itself. Measured on the bench
# machine, open+fstat+read+close of 200 files: 4 KiB 9 us median from the page cache, 45 us
# cold (evicted with POSIX_FADV_DONTNEED); 128 KiB 23 us warm, 140 us cold median, 0.46 ms
# worst. That is how long one such RETR can hold up the other sessions of this loop. The bound
# is the kernel's default readahead window (128 KiB), so a cold read is one disk request; the
# size comes from fstat, not from trusting the ``,S=`` name, and larger messages stream from
# worker threads as before.
SYNC_READ_MAX = 128 * 1024
# How long UPDATE waits for the delivery journal to checkpoint a message deleted just after it
# arrived (normally about a second; longer only if checkpoints are failing, which is logged).
JOURNAL_WAIT = 10.0
JOURNAL_HORIZON = 60.0  # seconds: older messages are not looked up in the journals


def _is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


class POP3Session(EngineSession):
    """One POP3 connection."""

    log = log
    need_data = NEED_DATA
    max_buffered = 64 * 1024  # POP3 clients send only short commands

    def __init__(self, ctx: ServerContext, *, implicit_tls: bool, plaintext_on_loopback: bool = True) -> None:
        super().__init__(ctx)
        self.implicit_tls = implicit_tls
        self.plaintext_on_loopback = plaintext_on_loopback
        self.engine: POP3ServerConnection | None = None
        self.mailbox: Mailbox | None = None
        self.user_address = "-"
        self._applying = False
        self._writable = asyncio.Event()
        self._writable.set()
        # (index, whole file) of the message after the last one sent, read while the client
        # was still reading that one (see _read_ahead). At most one, of <= SYNC_READ_MAX.
        self._ahead: tuple[int, bytes] | None = None

    # --- the EngineSession hooks -----------------------------------------------------------

    def make_engine(self) -> POP3ServerConnection:
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
        return self.engine

    @property
    def engine_or_none(self) -> POP3ServerConnection | None:
        return self.engine

    def refusal(self) -> bytes:
        return P.POP3Reply(False, "Too many connections, try again later", "SYS/TEMP").to_bytes()

    def on_internal_error(self) -> None:
        if self.engine is not None:
            self.engine.close(P.SYS_TEMP)
        self.flush()
        self.close()

    def idle_timeout(self) -> float:
        return self.ctx.config.limits.pop3_idle_timeout

    def on_idle_timeout(self) -> None:
        self._end(P.IDLE_TIMEOUT)

    def on_connection_lost(self) -> None:
        self._writable.set()  # wake a streaming task so it notices the close
        # A busy task (login, transfer, UPDATE) finishes its current step, sees _closing and
        # releases the mailbox itself: an UPDATE in a worker thread is never cut in half.
        if not self._busy:
            self._release_mailbox()

    def after_task(self) -> bool:
        if self._closing:
            self._release_mailbox()
            return False
        return True

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def handle(self, ev: object) -> None:
        match ev:
            case LoginAttempt():
                self.start_task(self._on_login(ev))
            case Retrieve():
                self._on_retrieve(ev)
            case Update():
                self.start_task(self._on_update(ev))
            case StartTLS():
                # RFC 2595 §4: nothing more is read in plaintext once STLS is answered.
                self.begin_tls()
            case CloseConnection():
                self.flush()
                self.close()

    def _release_mailbox(self) -> None:
        self._ahead = None
        if self.mailbox is not None and not self._applying:
            self.mailbox.close()
            self.mailbox = None

    # --- idle timeout and shutdown -------------------------------------------------------

    def shutdown(self, reply: object = None) -> None:
        """Server shutdown: ``-ERR [SYS/TEMP]``, close, apply nothing. ``reply`` (an SMTP
        reply from the shared shutdown loop) is ignored."""
        self._end(P.SHUTTING_DOWN)

    def _end(self, reply: P.POP3Reply) -> None:
        if self.engine is not None and not self._closing:
            self.engine.close(reply)
            self.flush()
        self.close()
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

    def _on_retrieve(self, ev: Retrieve) -> None:
        """RETR/TOP. A message of at most :data:`SYNC_READ_MAX` octets is opened, read and
        sent right here on the event loop, without a task or a worker-thread hop; a larger
        one (or any message while the client is not reading) streams in a task."""
        engine = self.engine
        mailbox = self.mailbox
        assert engine is not None and mailbox is not None
        ahead, self._ahead = self._ahead, None
        if not self._writable.is_set():
            # The client has not read what we sent: do not queue another message behind it.
            self.start_task(self._stream(ev, None, None))
            return
        if ahead is not None and ahead[0] == ev.index:
            self._send_whole(ev, ahead[1])
            return
        try:
            fd = mailbox.open_message_fd(ev.index)
        except OSError as exc:
            self._unreadable(ev, exc)
            return
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, "not a regular file")
            piece = os.read(fd, SYNC_READ_MAX) if st.st_size <= SYNC_READ_MAX else None
        except OSError as exc:
            os.close(fd)
            self._unreadable(ev, exc)
            return
        if piece is not None and st.st_size <= len(piece) < SYNC_READ_MAX:
            # A short read of a regular file that returned at least its size: end of file.
            os.close(fd)
            self._send_whole(ev, piece)
            return
        f = open(fd, "rb", closefd=True)  # large, or changed since fstat: stream the rest
        self.start_task(self._stream(ev, f, piece))

    def _send_whole(self, ev: Retrieve, data: bytes) -> None:
        """Answer a RETR/TOP with a message read whole, then read the next one ahead."""
        engine = self.engine
        assert engine is not None
        engine.begin_transfer()
        engine.transfer_data(data)
        engine.end_transfer()
        self.flush()  # so a full write buffer pauses us before the next pipelined RETR
        if not engine.buffered and self._writable.is_set():
            self._read_ahead(ev.index + 1)

    def _read_ahead(self, index: int) -> None:
        """Read message ``index`` (if small) now, while the client is busy reading the reply
        just sent and no command of its is waiting: clients fetch messages in order, and the
        next RETR is then answered without file work on its critical path. A wasted read
        costs what the RETR would have; nothing is held beyond one message. The snapshot
        semantics are unchanged: Maildir files never change once delivered, and a message
        removed behind our back in between is served as the RETR a moment earlier would
        have served it. Any error is left for the RETR itself to meet and report."""
        mailbox = self.mailbox
        if mailbox is None or index >= len(mailbox.entries) or mailbox.entries[index].size > SYNC_READ_MAX:
            return
        try:
            fd = mailbox.open_message_fd(index)
        except OSError:
            return
        try:
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode) and st.st_size <= SYNC_READ_MAX:
                data = os.read(fd, SYNC_READ_MAX)
                if st.st_size <= len(data) < SYNC_READ_MAX:
                    self._ahead = (index, data)
        except OSError:
            pass
        finally:
            os.close(fd)

    def _unreadable(self, ev: Retrieve, exc: OSError) -> None:
        assert self.engine is not None
        log_event(log, "message unreadable", logging.ERROR, user=self.user_address, client=self.ip,
                  msg=ev.number, error=repr(exc))
        self.engine.fail_retrieve(P.SYS_TEMP.with_text("Message cannot be read right now"))

    async def _wait_writable(self) -> bool:
        """Wait until the transport's buffer drains below its low-water mark. False (and the
        connection aborted) when the client reads nothing for the idle timeout."""
        if self._writable.is_set():
            return True
        try:
            # A client that stops reading is idle too (RFC 1939 §3 autologout).
            await asyncio.wait_for(self._writable.wait(), self.ctx.config.limits.pop3_idle_timeout)
            return True
        except TimeoutError:
            log_event(log, "write timeout", client=self.ip, user=self.user_address)
            assert self.engine is not None
            self.engine.close()
            self._closing = True
            if self.transport is not None:
                self.transport.abort()
            return False

    async def _stream(self, ev: Retrieve, f: BinaryIO | None, piece: bytes | None) -> None:
        """Send a message in :data:`CHUNK` reads done in worker threads. ``f`` is the open
        message (None: open it here) and ``piece`` what was already read from it (None:
        nothing yet)."""
        engine = self.engine
        mailbox = self.mailbox
        assert engine is not None and mailbox is not None
        loop = asyncio.get_running_loop()
        if f is None:
            if not await self._wait_writable() or self._closing:
                return
            try:
                f, piece = await loop.run_in_executor(None, _open_and_read, mailbox, ev.index)
            except OSError as exc:
                self._unreadable(ev, exc)
                return
        assert f is not None
        try:
            if piece is None:
                try:
                    piece = await loop.run_in_executor(None, f.read, CHUNK)
                except OSError as exc:
                    self._unreadable(ev, exc)  # nothing sent yet: an honest -ERR
                    return
            engine.begin_transfer()
            while piece and not self._closing:
                more = engine.transfer_data(piece)
                self.flush()
                if not more:
                    break
                if not await self._wait_writable() or self._closing:
                    break
                piece = await loop.run_in_executor(None, f.read, CHUNK)
        except OSError as exc:
            # +OK is already out: the only honest way to fail now is to drop the connection.
            log_event(log, "message read failed", logging.ERROR, user=self.user_address, client=self.ip,
                      msg=ev.number, error=repr(exc))
            engine.close()
            self.close()
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
            deleted, held = await loop.run_in_executor(None, self._settled, mailbox, ev.deleted)
            await loop.run_in_executor(None, mailbox.apply, deleted)
        except OSError as exc:
            log_event(log, "update failed", logging.ERROR, user=self.user_address, client=self.ip, error=repr(exc))
            reply = P.UPDATE_FAILED
        else:
            reply = P.UPDATED
            if held:  # RFC 1939 §6: the client is told, and deletes them at its next session
                log_event(log, "update incomplete: messages still in the delivery journal", logging.ERROR,
                          user=self.user_address, client=self.ip, kept_back=held)
                reply = P.UPDATE_FAILED
            log_event(log, "logout", service="pop3", user=self.user_address, client=self.ip,
                      deleted=len(deleted), kept=len(mailbox.entries) - len(deleted))
        finally:
            self._applying = False
        self._release_mailbox()
        if not self._closing:
            engine.update_done(reply)

    def _settled(self, mailbox: Mailbox, deleted: Sequence[int]) -> tuple[list[int], int]:
        """The messages of ``deleted`` that may be removed now (a worker-thread call), and how
        many must stay. A message that arrived in the last second may still have a pending
        record in a delivery journal (storage/journal.py): deleted now, a crash before that
        record's checkpoint would bring it back at the next start. So the deletion waits for
        the checkpoint (about a second at most); what is still pending after
        :data:`JOURNAL_WAIT` seconds stays in the maildrop."""
        cfg = self.ctx.config
        # Only mail of the last minute can still be in a journal (a checkpoint comes about
        # every second): older names are not looked up, so a busy journal is not read for
        # every QUIT. The time is the one our delivery put at the start of the name (a name
        # without one was not delivered by us, so no journal holds it).
        horizon = time.time() - JOURNAL_HORIZON
        recent = [i for i in deleted if delivered_at(mailbox.entries[i].name) >= horizon]
        if not recent or not cfg.journal:
            return list(deleted), 0
        base = os.path.relpath(mailbox.path, cfg.data_dir)
        # Journal records name the file as delivered: new/<name>, whatever POP3 renamed it to.
        names = {i: f"{base}/new/{mailbox.entries[i].name.split(':2,', 1)[0]}" for i in recent}
        stuck = wait_checkpointed(cfg.data_dir, set(names.values()), self.ctx.committer.journal, JOURNAL_WAIT)
        keep = [i for i in deleted if names.get(i) not in stuck]
        return keep, len(deleted) - len(keep)


def _open_and_read(mailbox: Mailbox, index: int) -> tuple[BinaryIO, bytes]:
    """Open a message and read its first piece in one worker-thread hop."""
    fd = mailbox.open_message_fd(index)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        f = open(fd, "rb", closefd=True)
    except BaseException:
        os.close(fd)
        raise
    try:
        return f, f.read(CHUNK)
    except BaseException:
        f.close()
        raise


async def start_pop3_listeners(server: Server, kind: str, endpoints: Sequence[Endpoint], *, implicit_tls: bool,
                               plaintext_on_loopback: bool = True) -> list[asyncio.base_events.Server]:
    ctx = server.ctx
    assert ctx is not None
    factory = functools.partial(POP3Session, ctx, implicit_tls=implicit_tls, plaintext_on_loopback=plaintext_on_loopback)
    return await open_listeners(server, kind, endpoints, factory, ctx.tls if implicit_tls else None)


async def _start(server: Server) -> list[asyncio.base_events.Server]:
    ctx = server.ctx
    assert ctx is not None
    cfg = server.config
    servers: list[asyncio.base_events.Server] = []
    if cfg.pop3.listen:
        servers += await start_pop3_listeners(server, "pop3", cfg.pop3.listen, implicit_tls=False)
        server.bound.extend(("pop3", e) for e in cfg.pop3.listen)
    if cfg.pop3s.listen:
        if ctx.tls is None:
            log_event(log, "pop3s disabled: no TLS certificate", logging.WARNING)
        else:
            servers += await start_pop3_listeners(server, "pop3s", cfg.pop3s.listen, implicit_tls=True)
            server.bound.extend(("pop3s", e) for e in cfg.pop3s.listen)
    return servers


EXTRA_LISTENERS["pop3"] = _start
