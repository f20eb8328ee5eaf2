"""Wires the outbound queue into a running server (a ``START_HOOKS`` entry of server/run.py).

At start, after the listeners are bound: build the :class:`QueueStore` on the server's
committer, the :class:`LocalCourier`, the remote courier (``serpentmail.delivery.remote``,
imported lazily; a placeholder that defers with "remote delivery not available" when that
module is absent), a :class:`DomainRouter` between them, and the :class:`Scheduler`. Set it
as ``ctx.outbound`` (so the SMTP side can queue; an enqueue waits until the spool has been
recovered) and start it. The returned stopper stops the scheduler: deliveries in flight
finish or stay pending on disk.

Routing: a recipient whose domain is one of ours (accounts database) or our own hostname
(``postmaster@<hostname>``, RFC 5321 §4.5.1) goes to the local courier; any other goes to the
remote courier.
"""

from __future__ import annotations

import asyncio
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
from ..log import log_event
from ..proto.address import AddressError, parse_mailbox
from ..server.run import START_HOOKS
from ..storage.maildir import SpoolFile
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


class QueueForwarder:
    """The OutboundQueue of a worker process other than the primary (server/workers.py):
    commits the item exactly as the scheduler would, then tells the primary, which runs the
    one scheduler, through a pipe. A notice that cannot be written (the pipe full, the primary
    restarting) is not needed for safety: the item is on disk and the primary's periodic scan
    adopts it."""

    def __init__(self, store: QueueStore, notify_fd: int) -> None:
        self.store = store
        self.notify_fd = notify_fd

    async def enqueue(self, spool: SpoolFile, sender: str, recipients: list[str], *,
                      smtputf8: bool = False, body_8bit: bool = False) -> str:
        rec = await self.store.enqueue(spool, sender, recipients, smtputf8=smtputf8, body_8bit=body_8bit)
        log_event(log, "queued", id=rec.id, **{"from": f"<{sender}>"}, nrcpt=len(rec.recipients), size=rec.size)
        try:
            os.write(self.notify_fd, rec.id.encode() + b"\n")  # < PIPE_BUF: one atomic write
        except OSError:
            pass
        return rec.id


def _read_notices(fd: int, scheduler: Scheduler, partial: bytearray) -> None:
    """Reader callback on the primary: queue ids, one per line, from the other workers."""
    try:
        chunk = os.read(fd, 65536)
    except (BlockingIOError, InterruptedError):
        return
    except OSError:
        chunk = b""
    if not chunk:  # every writer gone (they are all stopping): stop listening
        asyncio.get_running_loop().remove_reader(fd)
        return
    partial += chunk
    *lines, rest = partial.split(b"\n")
    partial[:] = rest
    for line in lines:
        scheduler.adopt(line.decode("ascii", "replace"))


ADOPT_SCAN_INTERVAL = 30.0  # seconds between the primary's scans for items it was not told of


async def _start_queue(server: Server) -> Callable[[], Awaitable[None]] | None:
    ctx = server.ctx
    assert ctx is not None
    # Only the process that runs the scheduler journals new items: it is the one that removes
    # them, and a removal must be recorded in the journal that holds the item (QueueStore).
    primary = server.worker_index == 0  # also the only process without workers
    store = QueueStore(server.config.data_dir, ctx.committer, recycler=ctx.recycler, journal=primary)
    if not primary:
        assert server.notify_fd is not None
        ctx.outbound = QueueForwarder(store, server.notify_fd)

        async def stop_forwarder() -> None:
            store.discard_spares()

        return stop_forwarder

    def notify(links: list[Path]) -> None:
        # Read at call time: a component (POP3) may install its hook after we start.
        if ctx.on_local_delivery is not None:
            ctx.on_local_delivery(links)

    scheduler = build_scheduler(server.config, store, ctx.accounts, on_local_delivery=notify)
    ctx.outbound = scheduler  # enqueue() waits until start() has recovered the spool
    reading: int | None = None
    if server.worker_count > 1:
        scheduler.recover_at_start = False  # the parent recovered the spool before forking
        scheduler.rescan_interval = ADOPT_SCAN_INTERVAL
    await scheduler.start()
    if server.worker_count > 1:
        if server.notify_fd is not None:
            reading = server.notify_fd
            os.set_blocking(reading, False)
            asyncio.get_running_loop().add_reader(reading, _read_notices, reading, scheduler, bytearray())
        await scheduler.adopt_unknown()  # committed by other workers while this one started

    async def stop() -> None:
        if reading is not None:
            asyncio.get_running_loop().remove_reader(reading)
        await scheduler.stop()

    return stop


START_HOOKS.append(_start_queue)
