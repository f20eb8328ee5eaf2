"""Remembered successful logins (server/context.py LoginCache, limits.auth_cache_ttl)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from serpentmail.accounts.db import AccountDB, hash_password
from serpentmail.server.context import LoginCache, ServerContext
from serpentmail.storage.maildir import Committer
from tests.helpers import add_user, make_config


def test_only_the_same_password_for_the_same_stored_hash_matches() -> None:
    cache = LoginCache(60)
    stored = hash_password("right")
    assert not cache.hit(7, stored, "right")  # nothing remembered yet
    cache.add(7, stored, "right")
    assert cache.hit(7, stored, "right")
    assert not cache.hit(7, stored, "wrong")
    assert not cache.hit(7, stored, "right ")
    assert not cache.hit(8, stored, "right")  # another user
    assert not cache.hit(7, hash_password("right"), "right")  # the password was set again
    assert "right" not in repr(cache._entries)  # a keyed digest is kept, not the password


def test_entries_expire_and_ttl_zero_remembers_nothing() -> None:
    cache = LoginCache(0.05)
    cache.add(1, "h", "pw")
    assert cache.hit(1, "h", "pw")
    time.sleep(0.1)
    assert not cache.hit(1, "h", "pw")
    assert cache._entries == {}  # the expired entry is dropped when met
    off = LoginCache(0)
    off.add(1, "h", "pw")
    assert not off.hit(1, "h", "pw")


def test_the_cache_stays_bounded() -> None:
    cache = LoginCache(60)
    for i in range(LoginCache.MAX + 10):
        cache.add(i, "h", "pw")
    assert len(cache._entries) <= LoginCache.MAX
    assert cache.hit(LoginCache.MAX + 9, "h", "pw")  # the newest is kept


def test_check_password_remembers_success_and_follows_password_changes(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, listeners=())
    add_user(cfg, "bill@x.test", "old")
    ctx = ServerContext(cfg, AccountDB(cfg.db_path), Committer(), None)

    async def login(pw: str) -> bool:
        return await ctx.check_password("bill@x.test", pw, "192.0.2.1", "smtp") is not None

    async def go() -> None:
        assert await login("old")
        assert len(ctx.login_cache._entries) == 1
        assert await login("old")  # answered from the cache
        assert not await login("wrong")  # a wrong password is not helped by the entry
        AccountDB(cfg.db_path).set_password("bill@x.test", "new")  # as the CLI does
        assert not await login("old")  # the entry was for the old hash
        assert await login("new")
        AccountDB(cfg.db_path).del_user("bill@x.test")
        assert not await login("new")

    asyncio.run(go())


def test_failed_logins_are_not_remembered(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, listeners=())
    add_user(cfg, "bill@x.test", "pw")
    ctx = ServerContext(cfg, AccountDB(cfg.db_path), Committer(), None)
    got = asyncio.run(ctx.check_password("bill@x.test", "nope", "192.0.2.1", "smtp"))
    assert got is None and ctx.login_cache._entries == {}
