"""Shared test helpers: configs on loopback, free ports, and an in-process server in a thread.

``running_server(tmp_path)`` starts a whole serpentmail ``Server`` (all listeners that are
configured) on its own event loop in a background thread, so tests can use blocking stdlib
clients (smtplib, poplib) against it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from serpentmail.accounts.db import AccountDB
from serpentmail.config import Config, Endpoint, LimitsConfig, Listener, embedded_default
from serpentmail.server.run import Server


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(host, 1)[0]


def free_ports(host: str, count: int) -> list[int]:
    """``count`` distinct free ports of ``host``. The sockets are all held until every port is
    chosen: closed one by one, the kernel may hand the same port out twice, and two listeners of
    one server would then collide (seen once in CI as "address already in use")."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for s in socks:
            s.bind((host, 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def make_config(data_dir: Path, host: str = "127.0.0.1", *, listeners: tuple[str, ...] = ("smtp", "submission", "submissions", "pop3", "pop3s"),
                hostname: str = "mx.test", limits: dict[str, Any] | None = None, **overrides: Any) -> Config:
    """A config with every listener on a free port of ``host`` (a 127.x address)."""
    base = embedded_default(data_dir)
    eps = {}
    ports = free_ports(host, 5)
    for name, port in zip(("smtp", "submission", "submissions", "pop3", "pop3s"), ports, strict=True):
        eps[name] = Listener((Endpoint(host, port),) if name in listeners else ())
    lim = replace(LimitsConfig(auth_failure_delay=0.05), **(limits or {}))
    return replace(base, hostname=hostname, default_domains=(), limits=lim, **eps, **overrides)


def add_user(cfg: Config, address: str, password: str = "secret") -> None:
    db = AccountDB(cfg.db_path)
    domain = address.rpartition("@")[2]
    db.ensure_domain(domain)
    db.add_user(address, password)
    db.close()


class ServerThread:
    """A Server running on its own loop in a daemon thread."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.server = Server(cfg)
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.server.start())
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()

    def start(self) -> ServerThread:
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        fut = asyncio.run_coroutine_threadsafe(self.server.stop(grace=5), self.loop)
        with contextlib.suppress(Exception):
            fut.result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(30)

    def endpoint(self, kind: str) -> tuple[str, int]:
        ep = getattr(self.cfg, kind).listen[0]
        return ep.host, ep.port


@contextlib.contextmanager
def running_server(cfg: Config) -> Iterator[ServerThread]:
    st = ServerThread(cfg).start()
    try:
        yield st
    finally:
        st.stop()


def maildir_files(cfg: Config, address: str, sub: str = "new") -> list[Path]:
    """The files in a user's Maildir ``sub`` directory, oldest first."""
    db = AccountDB(cfg.db_path)
    user = db.get_user(address)
    db.close()
    assert user is not None, address
    d = cfg.data_dir / "mail" / str(user.id) / sub
    if not d.exists():
        return []
    return sorted(d.iterdir(), key=lambda p: p.name)


def watch_creations(monkeypatch: pytest.MonkeyPatch, directory: Path) -> list[str]:
    """The names of the threads that create files in ``directory`` from now on, in order
    (``os.open`` and the spool pool's ``_create_files`` are looked up at each call, by the
    compiled build too)."""
    made_in: list[str] = []
    real_open = os.open

    def watching_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & os.O_CREAT and Path(path).parent == directory:
            made_in.append(threading.current_thread().name)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", watching_open)
    # The spool pool's refill creates its files in one C call where that module is built.
    from serpentmail.storage import maildir

    real_create = maildir._create_files
    if real_create is not None:
        create = real_create

        def watching_create(where: bytes, names: list[bytes]) -> list[int]:
            fds = create(where, names)
            if Path(os.fsdecode(where)) == directory:
                made_in.extend(threading.current_thread().name for fd in fds if fd >= 0)
            return fds

        monkeypatch.setattr(maildir, "_create_files", watching_create)
    return made_in


def spool_files(data_dir: Path) -> list[Path]:
    """Messages being received or left by a crash: files with content in tmp/ or tmp/spare/
    (the spool files, made empty ahead of need, are written where they are)."""
    found = []
    for d in (data_dir / "tmp", data_dir / "tmp" / "spare"):
        for p in d.iterdir() if d.exists() else ():
            try:
                if p.is_file() and p.stat().st_size > 0:
                    found.append(p)
            except FileNotFoundError:  # removed between the listing and the stat: gone, as awaited
                pass
    return found


def drop_journal(journal: Any) -> None:
    """What a process's death does to its :class:`~serpentmail.storage.journal.Journal`: its
    descriptors close (and its lock with them), with no last checkpoint."""
    os.close(journal.fd)
    if journal.wfd >= 0:
        os.close(journal.wfd)


def crash_committer(committer: Any) -> None:
    """The process dies under a :class:`~serpentmail.storage.maildir.Committer` and its
    journal: its threads stop with no last checkpoint, and the journal's descriptors close."""
    committer._stop.set()
    for _ in committer._threads:
        committer._q.put(None)
    for t in committer._threads:
        t.join(timeout=10)
    drop_journal(committer.journal)
