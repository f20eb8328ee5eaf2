"""Several server processes sharing the listeners: ``workers = N`` in the config.

One Python process runs one event loop on one core. With ``workers = N`` (or ``"auto"``, one
per CPU) ``serpentmail serve`` becomes a small supervisor, as Postfix's master(8) and Dovecot
are:

1. The parent prepares everything that must happen exactly once and before any mail can
   arrive: data directories, leftover temp files removed, default domains, the TLS
   certificate (made on first start), and the queue spool recovered (``QueueStore.recover``
   removes half-made items, which must not race a worker's enqueue).
2. It binds every listening socket itself (so "address already in use" is one clear error)
   and then drops privileges when ``user`` is set.
3. It forks N workers. Each runs the ordinary :class:`Server` on its own inherited sockets
   (SO_REUSEPORT, one per worker and endpoint): the kernel hands each new connection to one
   worker, and only that one wakes. Which one: server/steering.py (the last worker takes
   them all while the server is nearly idle; they are spread once it is busy).
4. Every worker runs a queue scheduler over its own share of the queue, partitioned by queue
   id (``queue/store.py``: ``owner_of``): the items it accepted itself, which it journals,
   delivers, retries and removes. A worker started again takes up its share where it was.
5. SIGTERM or SIGINT to the parent is passed to every worker, which stops gracefully; the
   parent exits when they have. A worker that dies unexpectedly is started again (at most
   five times a minute, then the whole server stops with an error).

Shared by construction: mailboxes, the queue spool, the accounts database and POP3's
maildrop locks (``flock``, per open file, so they hold across processes). Shared through
shared memory and pipes between the workers (server/peers.py): the connection counts behind
the connection limits, the failed-login throttle and each user's messages of the last hour,
so a client meets the same limits whichever process serves it.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import socket
import ssl
import sys
import time
from collections.abc import Callable

from ..config import Config
from ..log import log_event
from .peers import ConnectionTable, PeerLink, link_for, make_inboxes
from .run import (
    Prebound,
    Server,
    StartupError,
    _drop_privileges,
    _preload_modules,
    install_event_loop_policy,
    prepare_data_dir,
)
from .steering import spread_all
from .tls import server_context

log = logging.getLogger("serpentmail.server")

KINDS = ("smtp", "submission", "submissions", "pop3", "pop3s")
RESTARTS_PER_MINUTE = 5
EXIT_STARTUP = 3  # a worker's exit status when its Server could not start


def bind_listeners(cfg: Config, *, tls: bool, copies: int = 1) -> tuple[list[Prebound], list[tuple[str, str]]]:
    """Bind and listen on every configured endpoint, ``copies`` times with SO_REUSEPORT: one
    socket per worker, so the kernel hands each new connection to one worker's socket and only
    that worker wakes (a single shared socket woke every worker for every connection, and all
    but one found nothing: measurable CPU at one connection at a time). The parent keeps them
    all, so a restarted worker takes over its predecessor's socket and its pending
    connections. Returns one Prebound per worker and (kind, endpoint) rows for the start-up
    table. Raises StartupError naming the endpoint that failed."""
    per_worker: list[Prebound] = [{} for _ in range(copies)]
    rows: list[tuple[str, str]] = []
    opened: list[socket.socket] = []
    try:
        for kind in KINDS:
            if kind in ("submissions", "pop3s") and not tls:
                continue
            for ep in getattr(cfg, kind).listen:
                try:
                    infos = socket.getaddrinfo(ep.host or None, ep.port, type=socket.SOCK_STREAM,
                                               flags=socket.AI_PASSIVE)
                except socket.gaierror as exc:
                    raise StartupError(f"cannot listen on {ep} ({kind}): {exc.strerror}") from exc
                seen: set[tuple[int, object]] = set()
                for family, type_, proto, _name, addr in infos:
                    if (family, addr) in seen:
                        continue
                    seen.add((family, addr))
                    for i in range(copies):
                        sock = socket.socket(family, type_, proto)
                        opened.append(sock)
                        try:
                            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                            if copies > 1:
                                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                            if family == socket.AF_INET6:
                                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                            sock.bind(addr)
                            sock.listen(1024)
                            sock.setblocking(False)
                        except OSError as exc:
                            raise StartupError(f"cannot listen on {ep} ({kind}): {exc.strerror or exc}") from exc
                        per_worker[i].setdefault((kind, ep.host, ep.port), []).append(sock)
                rows.append((kind, str(ep)))
    except BaseException:
        for sock in opened:
            sock.close()
        raise
    return per_worker, rows


def _recover_queue(cfg: Config) -> None:
    from ..queue.store import QueueStore

    store = QueueStore(cfg.data_dir)
    dropped_env, dropped_data = store.recover()
    store.discard_spares()
    if dropped_env or dropped_data:
        log_event(log, "recovered", discarded_envelopes=dropped_env, removed_data=dropped_data)


def _die_with_parent(parent: int) -> None:
    """Linux: SIGTERM this worker when the supervisor dies, even by SIGKILL (prctl
    PR_SET_PDEATHSIG), so no worker is left serving without a parent to restart or stop it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _worker_main(cfg: Config, index: int, count: int, prebound: Prebound,
                 tls: ssl.SSLContext | None, peers: PeerLink) -> int:
    """The body of a forked worker: the ordinary server on the inherited sockets (the event
    loop policy, uvloop where available, was installed by the parent)."""
    server = Server(cfg, worker_index=index, worker_count=count, prebound=prebound,
                    parent_tls=tls, freeze_gc=True, peers=peers)
    try:
        asyncio.run(server.run_until_signal())
    except StartupError as exc:
        log_event(log, "worker cannot start", logging.ERROR, worker=index + 1, reason=str(exc))
        return EXIT_STARTUP
    except KeyboardInterrupt:
        return 0
    except Exception:
        log.exception("worker %d failed", index + 1)
        return 1
    return 0


class Supervisor:
    """The parent process: forks the workers, restarts one that dies, stops them all."""

    def __init__(self, cfg: Config, count: int, prebound: list[Prebound], tls: ssl.SSLContext | None) -> None:
        self.cfg = cfg
        self.tls = tls
        self.count = count
        self.prebound = prebound
        self.children: dict[int, int] = {}  # pid -> worker index
        self.restarts: list[float] = []
        self.stopping = False
        self.failure: str | None = None
        # The limits' shared counters (server/peers.py): a connection table in shared memory
        # and an event pipe per worker, made before forking so every worker inherits them.
        self.table = ConnectionTable(count)
        self.inboxes = make_inboxes(count)

    def _spawn(self, index: int) -> None:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        # setup_logging puts serpentmail's handler on its own logger, not the root: flush it
        # too, so nothing its stream holds is written again by the child.
        for h in (*logging.getLogger().handlers, *logging.getLogger("serpentmail").handlers):
            h.flush()
        parent = os.getpid()
        # Signals are held across fork: the child first replaces the supervisor's handlers it
        # inherited (which would signal its siblings), and only then takes delivery.
        held = {signal.SIGTERM, signal.SIGINT}
        signal.pthread_sigmask(signal.SIG_BLOCK, held)
        try:
            pid = os.fork()
        except BaseException:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, held)
            raise
        if pid == 0:  # the worker
            code = 1
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, held)
                _die_with_parent(parent)
                peers = link_for(index, self.table, self.inboxes)
                code = _worker_main(self.cfg, index, self.count, self.prebound[index], self.tls, peers)
            except BaseException:  # before its server could run: the whole start fails
                log.exception("worker %d failed to start", index + 1)
                code = EXIT_STARTUP
            finally:
                logging.shutdown()
                os._exit(code)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, held)
        self.children[pid] = index

    def _signal(self, signum: int, _frame: object) -> None:
        self.stopping = True
        for pid in list(self.children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def run(self) -> int:
        old = {s: signal.signal(s, self._signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            for i in range(self.count):
                self._spawn(i)
            while self.children:
                try:
                    pid, status = os.waitpid(-1, 0)
                except ChildProcessError:
                    break
                except InterruptedError:
                    continue
                index = self.children.pop(pid, None)
                if index is None:
                    continue
                self.table.clear_row(index)  # its connections died with it
                code = os.waitstatus_to_exitcode(status)
                if self.stopping:
                    continue
                self._handle_exit(index, code)
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            for fd in (end for pair in self.inboxes for end in pair):
                try:
                    os.close(fd)
                except OSError:
                    pass
        if self.failure:
            raise StartupError(self.failure)
        log_event(log, "all workers stopped")
        return 0

    def _handle_exit(self, index: int, code: int) -> None:
        now = time.monotonic()
        if index == self.count - 1:
            # The steering worker (server/steering.py) may have left every new connection to
            # itself: spread them until its successor is ready.
            spread_all([sock for socks in self.prebound[index].values() for sock in socks], self.count)
        if code == EXIT_STARTUP:
            self.failure = f"worker {index + 1} could not start (see the log)"
            self._signal(signal.SIGTERM, None)
            return
        self.restarts = [t for t in self.restarts if now - t < 60] + [now]
        if len(self.restarts) > RESTARTS_PER_MINUTE:
            self.failure = f"worker {index + 1} exited with status {code}; too many restarts, stopping"
            self._signal(signal.SIGTERM, None)
            return
        log_event(log, "worker died, restarting", logging.ERROR, worker=index + 1, status=code)
        self._spawn(index)


def serve_workers(cfg: Config, on_ready: Callable[[list[tuple[str, str]]], None] | None = None) -> int:
    """``serpentmail serve`` with ``workers`` > 1 (see the module docstring)."""
    from . import run

    run.load_components()
    lock = prepare_data_dir(cfg)  # inherited by the workers; held until the supervisor returns
    try:
        return _serve_locked(cfg, on_ready)
    finally:
        lock.release()


def _serve_locked(cfg: Config, on_ready: Callable[[list[tuple[str, str]]], None] | None) -> int:
    try:
        tls = server_context(cfg)  # makes the self-signed certificate once, before forking
    except (OSError, ValueError) as exc:
        raise StartupError(f"cannot load TLS certificate: {exc}") from exc
    _recover_queue(cfg)
    prebound, rows = bind_listeners(cfg, tls=tls is not None, copies=cfg.workers)
    if on_ready is not None:
        on_ready(rows)
    # Imports the workers need, done here while the installed code is surely readable (after
    # the privilege drop it may not be): uvloop's policy is inherited through fork.
    install_event_loop_policy()
    if cfg.user and os.geteuid() == 0:
        _preload_modules()
        _drop_privileges(cfg.user, cfg)
    log_event(log, "starting workers", count=cfg.workers)
    return Supervisor(cfg, cfg.workers, prebound, tls).run()
