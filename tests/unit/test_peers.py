"""The limits' counters shared between worker processes (server/peers.py)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from serpentmail.accounts.db import AccountDB
from serpentmail.server.context import ServerContext
from serpentmail.server.peers import ConnectionTable, PeerLink, link_for, make_inboxes
from serpentmail.storage.maildir import Committer
from tests.helpers import make_config


def _ctx(tmp_path: Path, name: str) -> ServerContext:
    cfg = make_config(tmp_path / name, listeners=(), limits={"max_connections_per_ip": 3, "auth_max_failures": 3})
    return ServerContext(cfg, AccountDB(cfg.db_path), Committer(), None)


def test_two_workers_share_connections_failed_logins_and_sends(tmp_path: Path) -> None:
    table = ConnectionTable(2)
    inboxes = make_inboxes(2)
    # As after fork: each worker keeps its inbox and the other's write end (dup'd here, since
    # both "processes" are this one and link_for closes what a worker does not keep).
    a = link_for(0, table, [(os.dup(r), os.dup(w)) for r, w in inboxes])
    b = link_for(1, table, inboxes)
    ca, cb = _ctx(tmp_path, "a"), _ctx(tmp_path, "b")

    async def go() -> None:
        a.start(ca)
        b.start(cb)
        # Three connections from one IP through worker A: worker B refuses the fourth.
        assert ca.admit("192.0.2.7") and ca.admit("192.0.2.7") and ca.admit("192.0.2.7")
        assert cb.total_connections() == 3
        assert not cb.admit("192.0.2.7") and cb.admit("192.0.2.8")
        ca.release("192.0.2.7")
        assert cb.admit("192.0.2.7") and cb.total_connections() == 4
        # Failed logins counted on either side add up.
        await ca.check_password("bill@x.test", "wrong", "198.51.100.1", "smtp")
        await cb.check_password("bill@x.test", "wrong", "198.51.100.1", "smtp")
        await ca.check_password("bill@x.test", "wrong", "198.51.100.1", "smtp")
        await asyncio.sleep(0.05)
        assert ca.throttle is not None and cb.throttle is not None
        assert ca.throttle.blocked("198.51.100.1") and cb.throttle.blocked("198.51.100.1")
        # Messages sent through A count for the user's hourly limit on B (told in batches).
        for _ in range(5):
            a.message_sent(42)
        await asyncio.sleep(0.2)
        assert len(cb.sent_per_user[42]) == 5
        # A restarted worker clears its row: the connections of its predecessor are gone.
        a.start(ca)
        assert cb.total_connections() == 2  # only the two B admitted itself
        a.stop()
        b.stop()

    asyncio.run(go())
    for link in (a, b):
        for fd in [link.inbox, *link.outboxes]:
            os.close(fd)


def test_the_connection_table_is_shared_with_forked_children() -> None:
    table = ConnectionTable(2)
    pid = os.fork()
    if pid == 0:
        try:
            table.add(1, "192.0.2.9", 1)
            table.add(1, "192.0.2.9", 1)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert table.total() == 2 and table.from_ip("192.0.2.9") == 2 and table.from_ip("192.0.2.10") in (0, 2)


def test_a_full_inbox_drops_events_instead_of_blocking() -> None:
    r, w = os.pipe()
    os.set_blocking(w, False)
    link = PeerLink(0, ConnectionTable(1), os.dup(r), [w])
    for _ in range(20000):  # far more than a pipe holds
        link.send("F", "192.0.2.1", "bill@x.test")
    assert link.dropped > 0
    for fd in (r, w, link.inbox):
        os.close(fd)
