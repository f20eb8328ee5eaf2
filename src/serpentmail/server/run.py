"""Start and stop a whole serpentmail server: listeners, committer, queue, signals.

``Server`` is used by ``serpentmail serve`` and, in-process, by the integration tests and the
sandbox. Start-up order: data directories, accounts, leftover temp files cleaned, TLS, listeners
bound (then privileges dropped when configured), queue scheduler started. Shutdown (SIGTERM):
stop accepting, let transactions in flight finish (bounded), close idle sessions with 421.
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import gc
import logging
import os
import signal
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .. import compiled_modules
from ..accounts.db import AccountDB
from ..config import Config, Endpoint
from ..log import log_event
from ..proto import replies as R
from ..storage.journal import Journal, replay_all
from ..storage.maildir import Committer, Recycler, clean_tmp
from .context import ServerContext
from .cpupin import CpuPin
from .peers import PeerLink
from .smtp import SMTPSession
from .steering import Steering
from .tls import server_context

log = logging.getLogger("serpentmail.server")

# Optional components registered by other modules (POP3, queue) so this module stays small.
# Each hook gets the context and returns (listeners, a coroutine-function to stop it).
ListenerHook = Callable[["Server"], Awaitable[list[asyncio.base_events.Server]]]
EXTRA_LISTENERS: dict[str, ListenerHook] = {}
StartHook = Callable[["Server"], Awaitable[Callable[[], Awaitable[None]] | None]]
START_HOOKS: list[StartHook] = []


# Listening sockets bound by the parent of several worker processes, by (kind, host, port).
Prebound = dict[tuple[str, str, int], list[socket.socket]]


class StartupError(RuntimeError):
    """A clear, user-facing reason the server cannot start (port taken, bad cert...)."""


LOCK_NAME = "serve.lock"


class DataDirLock:
    """``data_dir/serve.lock``, ``flock``ed by a running server for as long as it runs (its
    workers inherit the lock with the descriptor). A second ``serve`` on the same data
    directory stops here, before it touches anything: its start would otherwise remove the
    running server's temp and spool files as a crash's leftovers and recover its queue."""

    def __init__(self, data_dir: Path) -> None:
        path = data_dir / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise StartupError(f"data directory {data_dir} is in use by another serpentmail server "
                               f"(pid {holder}); stop it first, or give this one its own data_dir") from None
        except OSError:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd: int | None = fd

    def release(self) -> None:
        """Unlock (idempotent). The file stays: removing it would race the next start."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def prepare_data_dir(cfg: Config) -> DataDirLock:
    """Data directories made, leftover temp files removed, default domains created. Runs once
    per start, before anything can receive mail (with workers: in the parent, before forking).
    Returns the data directory's lock, held until the caller releases it (StartupError if
    another server holds it)."""
    try:
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        lock = DataDirLock(cfg.data_dir)
    except OSError as exc:
        raise StartupError(f"cannot use data directory {cfg.data_dir}: {exc.strerror or exc}") from exc
    try:
        _prepare_locked(cfg)
    except OSError as exc:
        lock.release()
        where = f" ({exc.filename})" if exc.filename else ""
        raise StartupError(f"cannot prepare data directory {cfg.data_dir}: {exc.strerror or exc}{where}") from exc
    except BaseException:
        lock.release()
        raise
    return lock


def _prepare_locked(cfg: Config) -> None:
    for sub in ("tmp", "mail", "queue"):
        (cfg.data_dir / sub).mkdir(parents=True, exist_ok=True)
    clean_tmp(cfg.data_dir / "tmp")
    clean_tmp(cfg.data_dir / "tmp" / "spare")
    for worker_spare in (cfg.data_dir / "tmp" / "spare").glob("w*"):
        clean_tmp(worker_spare)
    clean_tmp(cfg.data_dir / "tmp" / "recycled")
    # Before anything can read a mailbox: what a crash left half-placed is made whole.
    replay_all(cfg.data_dir)
    if cfg.default_domains:
        accounts = AccountDB(cfg.db_path)
        try:
            for domain in cfg.default_domains:
                accounts.ensure_domain(domain)
        finally:
            accounts.close()


async def open_listeners(server: Server, kind: str, endpoints: Sequence[Endpoint],
                         factory: Callable[[], asyncio.BaseProtocol],
                         ssl_ctx: ssl.SSLContext | None) -> list[asyncio.base_events.Server]:
    """Serve ``kind`` on ``endpoints``: on sockets the parent bound (workers), else bound here."""
    loop = asyncio.get_running_loop()
    handshake = 30.0 if ssl_ctx else None
    servers = []
    for ep in endpoints:
        socks = server.prebound.get((kind, ep.host, ep.port)) if server.prebound is not None else None
        if socks:
            for sock in socks:
                servers.append(await loop.create_server(factory, sock=sock, ssl=ssl_ctx, backlog=1024,
                                                        ssl_handshake_timeout=handshake))
        else:
            servers.append(await loop.create_server(factory, ep.host, ep.port, ssl=ssl_ctx, reuse_address=True,
                                                    backlog=1024, ssl_handshake_timeout=handshake))
    return servers


@dataclass
class Server:
    config: Config
    ctx: ServerContext | None = None
    listeners: dict[str, list[asyncio.base_events.Server]] = field(default_factory=dict)
    bound: list[tuple[str, Endpoint]] = field(default_factory=list)
    # Set by server/workers.py in each worker process: which one this is, of how many (its
    # share of the queue follows from both), and the listening sockets the parent bound.
    worker_index: int = 0
    worker_count: int = 1
    prebound: Prebound | None = None
    parent_tls: ssl.SSLContext | None = None  # loaded by the parent, before dropping privileges
    freeze_gc: bool = False  # `serve` (a process of its own): gc.freeze() once started
    peers: PeerLink | None = None  # workers: the limits' counters shared with the others
    _stoppers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    _dir_lock: DataDirLock | None = None  # held from start to stop (a worker's parent holds it)

    async def start(self, on_bound: Callable[[Server], None] | None = None) -> None:
        """Bind and start everything. ``on_bound`` runs once the listeners are bound, before
        privileges are dropped (so it may still read whatever root can)."""
        load_components()
        cfg = self.config
        if self.prebound is None:  # a worker's parent has done this before forking
            self._dir_lock = prepare_data_dir(cfg)
        try:
            await self._start(cfg, on_bound)
        except BaseException:
            self._release_dir()
            raise

    def _release_dir(self) -> None:
        if self._dir_lock is not None:
            self._dir_lock.release()
            self._dir_lock = None

    async def _start(self, cfg: Config, on_bound: Callable[[Server], None] | None) -> None:
        accounts = AccountDB(cfg.db_path)
        if self.prebound is not None:
            tls = self.parent_tls
        else:
            try:
                tls = server_context(cfg)
            except (OSError, ValueError) as exc:
                raise StartupError(f"cannot load TLS certificate: {exc}") from exc
        recycler = Recycler(cfg.data_dir / "tmp" / "recycled", prefix=f"w{self.worker_index}",
                            share=self.worker_count > 1)
        journal = None
        if cfg.journal:
            try:
                journal = Journal(cfg.data_dir / "journal" / f"w{self.worker_index}.log", cfg.data_dir)
            except (OSError, ValueError) as exc:
                raise StartupError(f"cannot open the delivery journal: {exc}") from exc
        spare_name = "spare"
        if self.worker_count > 1:
            spare_name = f"spare/w{self.worker_index}"
            # What a predecessor of this worker (one that died) left there: its content, if
            # it was a message, is in the journals, whose replay does not read spool files.
            clean_tmp(cfg.data_dir / "tmp" / spare_name)
        self.ctx = ServerContext(cfg, accounts, Committer(journal=journal), tls, recycler=recycler,
                                 spare_name=spare_name)
        if self.worker_count > 1:
            pin = self.ctx.cpu_pin = CpuPin.for_worker(self.worker_index)
            if pin is not None:  # the pool's threads are not to inherit the loop's pin
                asyncio.get_running_loop().set_default_executor(
                    ThreadPoolExecutor(thread_name_prefix="worker-pool", initializer=pin.free_thread))
        steering: Steering | None = None
        if (self.prebound is not None and self.peers is not None and self.worker_count > 1
                and self.worker_index == self.worker_count - 1):
            # Its own copy of every listening socket (one per endpoint and address family),
            # duplicated before the event loop takes the originals over.
            steering = Steering([socket.socket(fileno=os.dup(sock.fileno()))
                                 for socks in self.prebound.values() for sock in socks],
                                self.worker_index, self.worker_count)
        if self.peers is not None:
            self.peers.start(self.ctx)
        try:
            for kind in ("smtp", "submission", "submissions"):
                eps = getattr(cfg, kind).listen
                if eps:
                    factory = functools.partial(SMTPSession, self.ctx, kind)
                    ssl_ctx = self.ctx.tls if kind == "submissions" else None
                    self.listeners[kind] = await open_listeners(self, kind, eps, factory, ssl_ctx)
                    self.bound.extend((kind, e) for e in eps)
            for name, hook in EXTRA_LISTENERS.items():
                servers = await hook(self)
                if servers:
                    self.listeners[name] = servers
        except OSError as exc:
            if steering is not None:
                steering.release()
            await self.stop()
            raise StartupError(f"cannot listen: {exc.strerror or exc}") from exc
        if steering is not None and self.peers is not None:
            self.ctx.steering = steering
            steering.update(self.peers.connections())
        if on_bound is not None:
            on_bound(self)
        if cfg.user and os.geteuid() == 0:
            _preload_modules()  # the installed code may not be readable by the target user
            _drop_privileges(cfg.user, cfg)
        for start_hook in START_HOOKS:
            stopper = await start_hook(self)
            if stopper is not None:
                self._stoppers.append(stopper)
        if self.freeze_gc:
            # Everything made so far (modules, config, caches) lives as long as the server: move
            # it out of the collector's sight, so full collections walk only what sessions make.
            gc.collect()
            gc.freeze()
            # A young-generation collection every 20,000 allocations instead of 700: a message
            # allocates a few thousand objects, nearly all freed by reference counting. A/B at
            # 10 sessions (8 pairs): CPU per message x0.95, msg/s unchanged.
            gc.set_threshold(20_000, 10, 10)
        extra = {"worker": f"{self.worker_index + 1}/{self.worker_count}"} if self.worker_count > 1 else {}
        # How the delivery journal makes its records durable (storage/journal.py): direct writes,
        # page-cache writes + fdatasync where the filesystem refuses them, or no journal at all.
        journal = self.ctx.committer.journal
        journal_mode = "off" if journal is None else "direct" if journal.wfd >= 0 else "fdatasync"
        log_event(log, "started", hostname=cfg.hostname, data_dir=str(cfg.data_dir),
                  listeners=" ".join(f"{k}={e}" for k, e in self.bound),
                  compiled="yes" if compiled_modules() else "no", journal=journal_mode, **extra)

    async def stop(self, grace: float = 30.0) -> None:
        if self.ctx is not None and self.ctx.steering is not None:
            # Connections arriving while this worker stops are not all left to it.
            self.ctx.steering.release()
            self.ctx.steering = None
        for servers in self.listeners.values():
            for srv in servers:
                srv.close()
        ctx = self.ctx
        if ctx is not None:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + grace
            # Idle sessions are told we are going away; busy ones finish their transaction.
            while ctx.sessions and loop.time() < deadline:
                for s in list(ctx.sessions):
                    if getattr(s, "idle", True):
                        s.shutdown(R.SERVICE_SHUTTING_DOWN)
                if not ctx.sessions:
                    break
                await asyncio.sleep(0.05)
            if ctx.idle_sweep is not None:
                ctx.idle_sweep.cancel()
                ctx.idle_sweep = None
        for stopper in reversed(self._stoppers):
            try:
                await stopper()
            except Exception:
                log.exception("error while stopping a component")
        for servers in self.listeners.values():
            for srv in servers:
                try:
                    await asyncio.wait_for(srv.wait_closed(), 1)
                except (TimeoutError, Exception):
                    pass
        if self.peers is not None:
            self.peers.stop()
        if ctx is not None:
            ctx.spools.close()
            await asyncio.get_running_loop().run_in_executor(None, ctx.committer.close)
        self._release_dir()
        log_event(log, "stopped")

    async def run_until_signal(self, on_ready: Callable[[Server], None] | None = None) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        # Handlers first: the listeners accept connections before start() returns (start hooks
        # still run), and a SIGTERM in that window must be a clean stop, not the default kill.
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError):
                pass
        await self.start(on_bound=on_ready)
        await stop.wait()
        log_event(log, "shutdown requested")
        await self.stop()


def _preload_modules() -> None:
    """Import everything the server imports lazily, while we can still read it as root."""
    import importlib

    for name in ("serpentmail.delivery.remote", "serpentmail.delivery.dns", "serpentmail.message.dsn",
                 "dns.asyncresolver", "dns.nameserver", "dns.message", "dns.rdtypes.ANY.MX",
                 "dns.rdtypes.IN.A", "dns.rdtypes.IN.AAAA", "email.mime.multipart", "email.mime.text"):
        try:
            importlib.import_module(name)
        except ImportError:
            pass


def _drop_privileges(username: str, cfg: Config) -> None:
    import pwd

    try:
        pw = pwd.getpwnam(username)
    except KeyError as exc:
        raise StartupError(f"config key 'user': no such system user {username!r}") from exc
    for root, dirs, files in os.walk(cfg.data_dir):
        for name in dirs + files:
            try:
                os.chown(os.path.join(root, name), pw.pw_uid, pw.pw_gid)
            except OSError:
                pass
    os.chown(cfg.data_dir, pw.pw_uid, pw.pw_gid)
    os.setgroups([])
    os.setgid(pw.pw_gid)
    os.setuid(pw.pw_uid)
    log_event(log, "dropped privileges", user=username)
    # The data directory must stay reachable as the new user (every parent searchable), or
    # the first mailbox write would fail much later; say so now, in one line.
    if not os.access(cfg.data_dir, os.R_OK | os.W_OK | os.X_OK):
        raise StartupError(f"config key 'user': user {username!r} cannot read and write data_dir "
                           f"{cfg.data_dir} (check the permissions of it and its parent directories)")


def install_event_loop_policy() -> None:
    """uvloop where it installs (Linux), plain asyncio otherwise."""
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass


def load_components() -> None:
    """Import the optional server components so they register their hooks above."""
    import importlib

    for name in ("serpentmail.server.pop3", "serpentmail.queue.service"):
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
