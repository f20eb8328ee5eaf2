"""Idle timeouts: one sweep timer per server checks every session (server/session.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from serpentmail.accounts.db import AccountDB
from serpentmail.server.context import ServerContext
from serpentmail.server.smtp import SMTPSession
from serpentmail.storage.maildir import Committer
from tests.helpers import make_config


class _Transport:
    """What a session asks of its transport, recording what it sends."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.sent.append(data)

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 4321) if name == "peername" else default

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def _ctx(tmp_path: Path, idle: float) -> ServerContext:
    cfg = make_config(tmp_path, listeners=(), limits={"idle_timeout": idle, "pop3_idle_timeout": 60.0})
    return ServerContext(cfg, AccountDB(cfg.db_path), Committer(), None)


def _connect(ctx: ServerContext) -> tuple[SMTPSession, _Transport]:
    session, tr = SMTPSession(ctx, "smtp"), _Transport()
    session.connection_made(tr)  # type: ignore[arg-type]
    return session, tr


def test_idle_session_is_closed_and_the_sweep_stops_with_the_last_session(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path, 0.2)

    async def go() -> None:
        assert ctx.idle_sweep is None  # no session, no timer
        idle, idle_tr = _connect(ctx)
        talking, talking_tr = _connect(ctx)
        assert ctx.idle_sweep is not None
        for _ in range(6):  # 0.3 s of commands: never idle for 0.2 s
            await asyncio.sleep(0.05)
            talking.data_received(b"NOOP\r\n")
        assert idle_tr.closed and idle_tr.sent[-1].startswith(b"421 4.4.2")
        assert not talking_tr.closed and talking_tr.sent[-1].startswith(b"250")
        idle.connection_lost(None)
        await asyncio.sleep(0.3)
        assert talking_tr.closed
        talking.connection_lost(None)
        await asyncio.sleep(0.15)  # the sweep after the last session: no timer is left
        assert ctx.idle_sweep is None and not ctx.sessions
        _connect(ctx)  # the next connection starts it again
        assert ctx.idle_sweep is not None
        ctx.idle_sweep.cancel()

    asyncio.run(go())


def test_busy_session_is_not_closed(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path, 0.1)

    async def go() -> None:
        session, tr = _connect(ctx)
        session._busy = True  # waiting for a commit or a password check
        await asyncio.sleep(0.3)
        assert not tr.closed
        session._busy = False
        session._last_activity -= 1  # its wait ended long ago (as _task_done would not say)
        await asyncio.sleep(0.1)
        assert tr.closed
        session.connection_lost(None)

    asyncio.run(go())
