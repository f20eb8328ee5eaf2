"""PeerLink: the limits' counters shared between worker processes (server/peers.py)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from serpentmail.accounts.db import AccountDB
from serpentmail.server.context import ServerContext
from serpentmail.server.peers import PeerLink, link_for, make_inboxes
from serpentmail.storage.maildir import Committer
from tests.helpers import make_config


def _ctx(tmp_path: Path, name: str, **limits: object) -> ServerContext:
    cfg = make_config(tmp_path / name, listeners=(), limits={"max_connections_per_ip": 3, "auth_max_failures": 3, **limits})
    return ServerContext(cfg, AccountDB(cfg.db_path), Committer(), None)


def test_two_workers_share_connections_failed_logins_and_sends(tmp_path: Path) -> None:
    inboxes = make_inboxes(2)
    # As after fork: each worker keeps its inbox and the other's write end (dup'd here, since
    # both "processes" are this one and link_for closes what a worker does not keep).
    a = link_for(0, [(os.dup(r), os.dup(w)) for r, w in inboxes])
    b = link_for(1, inboxes)
    ca, cb = _ctx(tmp_path, "a"), _ctx(tmp_path, "b")

    async def go() -> None:
        a.start(ca)
        b.start(cb)
        await asyncio.sleep(0.05)
        # Three connections from one IP through worker A: worker B refuses the fourth.
        assert ca.admit("192.0.2.7") and ca.admit("192.0.2.7") and ca.admit("192.0.2.7")
        await asyncio.sleep(0.05)
        assert cb.total_connections() == 3
        assert not cb.admit("192.0.2.7") and cb.admit("192.0.2.8")
        ca.release("192.0.2.7")
        await asyncio.sleep(0.05)
        assert cb.admit("192.0.2.7")
        # Failed logins counted on either side add up.
        await ca.check_password("bill@x.test", "wrong", "198.51.100.1", "smtp")
        await cb.check_password("bill@x.test", "wrong", "198.51.100.1", "smtp")
        await ca.check_password("bill@x.test", "wrong", "198.51.100.1", "smtp")
        await asyncio.sleep(0.05)
        assert ca.throttle is not None and cb.throttle is not None
        assert ca.throttle.blocked("198.51.100.1") and cb.throttle.blocked("198.51.100.1")
        # A message sent through A counts for the user's hourly limit on B.
        a.send("M", 42)
        await asyncio.sleep(0.05)
        assert len(cb.sent_per_user[42]) == 1
        # A restarted worker says hello: its connections are forgotten by the others.
        a.send("hello")
        await asyncio.sleep(0.05)
        assert cb.total_connections() == 2  # only the two B admitted itself
        a.stop()
        b.stop()

    asyncio.run(go())
    for link in (a, b):
        for fd in [link.inbox, *link.outboxes]:
            os.close(fd)


def test_a_full_inbox_drops_events_instead_of_blocking(tmp_path: Path) -> None:
    r, w = os.pipe()
    os.set_blocking(w, False)
    link = PeerLink(0, os.dup(r), [w])
    for _ in range(20000):  # far more than a pipe holds
        link.send("c+", "192.0.2.1")
    assert link.dropped > 0
    for fd in (r, w, link.inbox):
        os.close(fd)
