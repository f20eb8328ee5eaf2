"""Wires the outbound queue into a running server (a ``START_HOOKS`` entry of server/run.py).

At start, after the listeners are bound: build the :class:`QueueStore` on the server's
committer, the :class:`LocalCourier`, the remote courier (``serpentmail.delivery.remote``,
imported lazily; a placeholder that defers with "remote delivery not available" when that
module is absent), a :class:`DomainRouter` between them, and the :class:`Scheduler`. Set it
as ``ctx.outbound`` (so the SMTP side can queue; an enqueue waits until the spool has been
recovered) and start it. The returned stopper stops the scheduler: deliveries in flight
finish or stay pending on disk. With several worker processes each runs its own scheduler
over its share of the queue (``QueueStore.partition``).

Routing: a recipient whose domain is one of ours (accounts database) or our own hostname
(``postmaster@<hostname>``, RFC 5321 §4.5.1) goes to the local courier; any other goes to the
remote courier.
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ..accounts.db import AccountDB
from ..config import Config
from ..delivery.base import Courier, Envelope, RecipientResult
from ..delivery.local import LocalCourier
from ..proto.address import AddressError, parse_mailbox
from ..server.run import START_HOOKS
from .scheduler import Scheduler
from .store import QueueStore, domain_of

if TYPE_CHECKING:
    from ..server.run import Server

log = logging.getLogger("serpentmail.queue")

REMOTE_UNAVAILABLE = "451 4.3.2 remote delivery not available"


class UnavailableCourier:
    """Stands in for the remote courier when it is not installed: always temporary."""

    async def deliver(self, envelope: Envelope, recipients: list[str]) -> list[RecipientResult]:
        return [RecipientResult(r, "deferred", REMOTE_UNAVAILABLE, None, "x-local") for r in recipients]


class DomainRouter:
    """A Courier that hands each (message, domain) group to the local or the remote courier."""

    def __init__(self, local: Courier, remote: Courier, is_local: Callable[[str], bool]) -> None:
        self.local = local
        self.remote = remote
        self.is_local = is_local

    async def deliver(self, envelope: Envelope, recipients: list[str]) -> list[RecipientResult]:
        if not recipients:
            return []
        courier = self.local if self.is_local(domain_of(recipients[0])) else self.remote
        return await courier.deliver(envelope, recipients)

    async def aclose(self) -> None:
        """Close what the couriers keep open (the remote courier's idle connections)."""
        for courier in (self.local, self.remote):
            aclose = getattr(courier, "aclose", None)
            if aclose is not None:
                await aclose()


def make_remote_courier(config: Config) -> Courier:
    """``RemoteCourier(config)`` from serpentmail.delivery.remote, or the placeholder."""
    try:
        mod = importlib.import_module("serpentmail.delivery.remote")
    except ModuleNotFoundError as exc:
        if exc.name != "serpentmail.delivery.remote":
            raise
        log.warning("serpentmail.delivery.remote is missing: remote recipients will be deferred")
        return UnavailableCourier()
    courier: Courier = mod.RemoteCourier(config)
    return courier


LOCAL_DOMAIN_TTL = 2.0  # seconds an answer of the accounts database is reused by the router


def local_domain_check(config: Config, accounts: AccountDB, *, ttl: float = LOCAL_DOMAIN_TTL,
                       clock: Callable[[], float] = time.monotonic) -> Callable[[str], bool]:
    """Is ``domain`` ours? Answers are kept ``ttl`` seconds (a domain added or removed with
    the CLI is seen that much later), so a busy queue does not run one SQL query per message
    for the same few destinations."""
    hostname = config.hostname.lower().rstrip(".")
    cache: dict[str, tuple[float, bool]] = {}

    def is_local(domain: str) -> bool:
        d = domain.lower().rstrip(".")
        if d == hostname:
            return True
        now = clock()
        hit = cache.get(d)
        if hit is not None and now - hit[0] < ttl:
            return hit[1]
        answer = accounts.is_local_domain(d)
        if len(cache) >= 1024:
            cache.clear()
        cache[d] = (now, answer)
        return answer

    return is_local


def alias_expander(accounts: AccountDB) -> Callable[[str], list[str]]:
    """For DSNs: the original sender through local aliases (users' addresses + remote
    targets); non-local or unknown addresses stay as they are (the courier decides)."""

    def expand(address: str) -> list[str]:
        try:
            res = accounts.resolve(parse_mailbox(address))
        except AddressError:
            return [address]
        if not res.local or not res.exists:
            return [address]
        return [u.address for u in res.users] + list(res.remote)

    return expand


def build_scheduler(config: Config, store: QueueStore, accounts: AccountDB, *,
                    remote: Courier | None = None,
                    on_local_delivery: Callable[[list[Path]], None] | None = None) -> Scheduler:
    local = LocalCourier(config, accounts, on_delivery=on_local_delivery)
    router = DomainRouter(local, remote or make_remote_courier(config), local_domain_check(config, accounts))
    return Scheduler(store, router, config, expand=alias_expander(accounts))


ADOPT_SCAN_INTERVAL = 30.0  # seconds between a worker's scans of its share for items it does not know


async def _start_queue(server: Server) -> Callable[[], Awaitable[None]] | None:
    ctx = server.ctx
    assert ctx is not None
    # Every worker process runs a scheduler over its own share of the queue (QueueStore's
    # partition, by queue id): it journals, delivers, retries and removes the items it
    # accepted itself, so a message never crosses to another process, and a removal is always
    # recorded in the journal that holds the item.
    count = server.worker_count
    store = QueueStore(server.config.data_dir, ctx.committer, recycler=ctx.recycler, journal=True,
                       partition=(server.worker_index, count) if count > 1 else None)
    store.data_pool = ctx.spools

    def notify(links: list[Path]) -> None:
        # Read at call time: a component (POP3) may install its hook after we start.
        if ctx.on_local_delivery is not None:
            ctx.on_local_delivery([os.fspath(p) for p in links])

    scheduler = build_scheduler(server.config, store, ctx.accounts, on_local_delivery=notify)
    ctx.outbound = scheduler  # enqueue() waits until start() has recovered the spool
    if count > 1:
        # The parent recovered the whole spool before forking: a worker's recover() would
        # also empty tmp/, where the others' new envelopes are being written.
        scheduler.recover_at_start = False
        scheduler.rescan_interval = ADOPT_SCAN_INTERVAL
    await scheduler.start()

    async def stop() -> None:
        await scheduler.stop()

    return stop


START_HOOKS.append(_start_queue)
