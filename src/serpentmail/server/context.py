"""Shared runtime state of a running server: config, accounts, committer, TLS, limits.

One :class:`ServerContext` is built by ``serve`` and handed to every listener. It is also the
injection point for tests (clock, outbound queue) so no monkeypatching is needed.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import secrets
import ssl
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from ..accounts.db import AccountDB, User, verify_password
from ..config import Config
from ..log import log_event
from ..proto.address import Address
from ..storage.maildir import (
    Committer,
    Recycler,
    SpoolFile,
    SpoolPool,
    commit_async,
    ensure_maildir,
    maildir_for,
)

if TYPE_CHECKING:
    from .peers import PeerLink

log = logging.getLogger("serpentmail.server")


class CpuPinLike(Protocol):
    def update(self, sessions: int) -> None: ...


class SteeringLike(Protocol):
    def update(self, connections: int) -> None: ...

    def release(self) -> None: ...


class OutboundQueue(Protocol):
    """Where messages for recipients that are not delivered right away go (the queue issue)."""

    async def enqueue(self, spool: SpoolFile, sender: str, recipients: list[str], *,
                      smtputf8: bool = False, body_8bit: bool = False) -> str:
        """Make ``spool`` a durable queue item; return its id only once it is on disk.
        ``smtputf8``: the client used SMTPUTF8 (RFC 6531), so the relay must too."""
        ...


class AuthThrottle:
    """Counts failed logins per client IP and per account; past the threshold the source is
    refused for a cool-down. Shared by submission and POP3."""

    def __init__(self, max_failures: int, window: float, cooldown: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_failures = max_failures
        self.window = window
        self.cooldown = cooldown
        self.clock = clock
        self._failures: dict[str, deque[float]] = defaultdict(deque)
        self._blocked_until: dict[str, float] = {}

    def _key_blocked(self, key: str, now: float) -> bool:
        until = self._blocked_until.get(key)
        if until is None:
            return False
        if now >= until:
            del self._blocked_until[key]
            self._failures.pop(key, None)
            return False
        return True

    def blocked(self, ip: str, account: str | None = None) -> bool:
        now = self.clock()
        return self._key_blocked("ip:" + ip, now) or (account is not None and self._key_blocked("acct:" + account.lower(), now))

    def record_failure(self, ip: str, account: str | None) -> None:
        now = self.clock()
        keys = ["ip:" + ip] + (["acct:" + account.lower()] if account else [])
        for key in keys:
            q = self._failures[key]
            q.append(now)
            while q and q[0] < now - self.window:
                q.popleft()
            if len(q) >= self.max_failures:
                self._blocked_until[key] = now + self.cooldown
        if len(self._failures) > 100_000:  # bound memory under a distributed attack
            self._failures.clear()

    def record_success(self, ip: str, account: str) -> None:
        self._failures.pop("acct:" + account.lower(), None)


@dataclass
class ServerContext:
    config: Config
    accounts: AccountDB
    committer: Committer
    tls: ssl.SSLContext | None
    outbound: OutboundQueue | None = None
    clock: Callable[[], float] = time.time
    connections: int = 0
    per_ip: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    throttle: AuthThrottle | None = None
    on_local_delivery: Callable[[list[str]], None] | None = None  # the new files' paths
    sessions: set[Any] = field(default_factory=set)
    # The one timer that checks every session's idle time (server/session.py, _sweep_idle),
    # while there are sessions.
    idle_sweep: asyncio.TimerHandle | None = None
    sent_per_user: dict[int, list[float]] = field(default_factory=dict)
    # With workers: the other processes' share of the limits (server/peers.py).
    peers: PeerLink | None = None
    # With workers: keeps this process's event-loop thread on one CPU while it is busy
    # (server/cpupin.py).
    cpu_pin: CpuPinLike | None = None
    # With workers, in the last one: sends new connections to it alone while the server is
    # nearly idle (server/steering.py).
    steering: SteeringLike | None = None
    # Per-kind protocol settings built once (server/smtp.py make_engine).
    engine_settings: dict[Any, Any] = field(default_factory=dict)
    # Blanked queue files kept for the spool pools (storage/maildir.py, Recycler).
    recycler: Recycler | None = None
    _known_maildirs: dict[int, Path] = field(default_factory=dict)  # user id -> ensured maildir
    _known_new_dirs: dict[int, str] = field(default_factory=dict)  # user id -> "<its maildir>/new/"
    login_cache: LoginCache = field(init=False)
    # Where this process makes its spool files, under data_dir/tmp: each worker has its own
    # directory (server/run.py), so two processes never wait for one directory's lock to
    # create a file, and a restarted worker can empty its own.
    spare_name: str = "spare"

    def __post_init__(self) -> None:
        lim = self.config.limits
        if self.throttle is None:
            self.throttle = AuthThrottle(lim.auth_max_failures, lim.auth_failure_window, lim.auth_cooldown)
        self.login_cache = LoginCache(lim.auth_cache_ttl)
        self._tmp_dir = self.config.data_dir / "tmp"  # built once: path joins showed in the profile
        self._tmp_dir.mkdir(parents=True, exist_ok=True)
        # Spool files made ahead, off the event loop, in tmp/<spare_name>/, and used where they
        # are (named when taken; renaming each into tmp/ cost ~0.25 ms of event-loop time per
        # message in the inbound profile). Emptied at start.
        spare = self._tmp_dir / self.spare_name
        spare.mkdir(parents=True, exist_ok=True)
        self.spools = SpoolPool(spare, recycler=self.recycler)

    @property
    def tmp_dir(self) -> Path:
        return self._tmp_dir

    def maildir(self, user_id: int) -> Path:
        path = self._known_maildirs.get(user_id)
        if path is None:
            path = maildir_for(self.config.data_dir, user_id)
            ensure_maildir(path)
            self._known_maildirs[user_id] = path
        return path

    def new_dir(self, user_id: int) -> str:
        """``<maildir>/new/`` of a user, as a string ending in a slash (per message: see
        :meth:`.SMTPSession._local_links`); the Maildir is made the first time, as by
        :meth:`maildir`."""
        prefix = self._known_new_dirs.get(user_id)
        if prefix is None:
            prefix = self._known_new_dirs[user_id] = os.path.join(os.fspath(self.maildir(user_id)), "new", "")
        return prefix

    def postmaster_maildir(self) -> Path:
        """Fallback mailbox for postmaster when no user or alias takes it (RFC 5321 §4.5.1)."""
        path = self.config.data_dir / "mail" / "postmaster"
        ensure_maildir(path)
        return path

    def total_connections(self) -> int:
        """Connections the whole server holds (with workers: every process's)."""
        return self.peers.connections() if self.peers is not None else self.connections

    def admit(self, ip: str) -> bool:
        lim = self.config.limits
        peers = self.peers
        if peers is None:
            total, from_ip = self.connections, self.per_ip.get(ip, 0)
        else:  # the whole server's connections, not this process's
            total, from_ip = peers.connections(), peers.connections_from(ip)
        if total >= lim.max_connections or from_ip >= lim.max_connections_per_ip:
            return False
        self.connections += 1
        self.per_ip[ip] += 1
        if peers is not None:
            peers.connection_opened(ip)
        return True

    def release(self, ip: str) -> None:
        self.connections -= 1
        n = self.per_ip[ip] - 1
        if n <= 0:
            self.per_ip.pop(ip, None)
        else:
            self.per_ip[ip] = n
        if self.peers is not None:
            self.peers.connection_closed(ip)

    def can_commit_now(self) -> bool:
        """True when a session may run its commit itself (:meth:`Committer.commit_now`): it is
        the only session of this process and the committer has nothing waiting, so there is
        no batch to share and no other client to keep waiting for the fsyncs."""
        return len(self.sessions) <= 1 and self.committer.idle()

    async def commit(self, job_spool: SpoolFile, links: list[str], *, keep_spool: bool = False,
                     journal: bool = False) -> None:
        """Run the durable recipe for ``job_spool`` in the committer; raise on failure.
        ``journal``: a local delivery, which may go through the delivery journal."""
        await commit_async(self.committer, job_spool, links, keep_spool=keep_spool, journal=journal)

    async def check_password(self, username: str, password: str, ip: str, service: str) -> User | None:
        """Verify a login off the event loop, with the failure delay and throttle applied.

        A login that succeeded within ``limits.auth_cache_ttl`` with the same password against
        the same stored hash is answered without argon2 (:class:`LoginCache`)."""
        throttle = self.throttle
        assert throttle is not None
        user, stored = self.accounts.password_hash(username) if _plausible_login(username) else (None, None)
        cache = self.login_cache
        if user is not None and stored is not None and cache.hit(user.id, stored, password):
            ok = True
        else:
            ok = await asyncio.get_running_loop().run_in_executor(None, verify_password, stored, password)
            if ok and user is not None and stored is not None:
                cache.add(user.id, stored, password)
        if ok and user is not None:
            throttle.record_success(ip, username)
            if self.peers is not None:
                self.peers.send("S", ip, username)
            log_event(log, "auth ok", service=service, user=user.address, client=ip)
            return user
        throttle.record_failure(ip, username)
        if self.peers is not None:
            self.peers.send("F", ip, username)
        # fail2ban-friendly: fixed words, the client address in a fixed field.
        log_event(log, "auth failed", logging.WARNING, service=service, user=username[:64], client=ip)
        await asyncio.sleep(self.config.limits.auth_failure_delay)
        return None

    def resolve(self, address: Address) -> tuple[bool, list[User], list[str]]:
        """(is_local_domain, local users, remote targets) for a recipient address."""
        res = self.accounts.resolve(address)
        return res.local, list(res.users), list(res.remote)


class LoginCache:
    """Successful logins, remembered for ``ttl`` seconds so that a client which logs in again
    (a mail program connects for each message it sends; POP3 clients poll) costs a keyed
    SHA-256 instead of an argon2 verification (about 20 ms of CPU here).

    An entry holds HMAC-SHA256 of the password under a random key made at start and kept only
    in this process's memory, for one user *and* one stored hash: a password change (new
    hash) or a deleted account (no hash) makes it useless. A wrong password never matches an
    entry, so it still costs argon2 and the failure delay, and answers in the same time as
    before. The trade: someone able to read this process's memory could test guesses against
    an entry at SHA-256 speed; they could as well read passwords as clients send them.
    ``ttl`` 0 turns the cache off.
    """

    MAX: ClassVar[int] = 10_000

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._key = secrets.token_bytes(32)
        self._entries: dict[tuple[int, str], tuple[float, bytes]] = {}

    def _digest(self, password: str) -> bytes:
        return hmac.new(self._key, password.encode("utf-8", "surrogateescape"), hashlib.sha256).digest()

    def hit(self, user_id: int, stored: str, password: str) -> bool:
        entry = self._entries.get((user_id, stored))
        if entry is None:
            return False
        if time.monotonic() >= entry[0]:
            del self._entries[(user_id, stored)]
            return False
        return hmac.compare_digest(entry[1], self._digest(password))

    def add(self, user_id: int, stored: str, password: str) -> None:
        if self.ttl <= 0:
            return
        if len(self._entries) >= self.MAX:
            now = time.monotonic()
            self._entries = {k: v for k, v in self._entries.items() if v[0] > now}
            if len(self._entries) >= self.MAX:
                self._entries.clear()
        self._entries[(user_id, stored)] = (time.monotonic() + self.ttl, self._digest(password))


def _plausible_login(name: str) -> bool:
    return 0 < len(name) <= 320 and "@" in name and not any(c in name for c in "/\x00") and ".." not in name \
        and all(c >= " " and c != "\x7f" for c in name)

