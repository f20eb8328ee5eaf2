"""The remote courier: deliver one message to the recipients of one remote domain over SMTP.

Route: the domain's MX hosts from :mod:`.dns` (or, when ``[delivery] relay`` is set, that
one smart host for every domain, as Postfix's ``relayhost``). The exchangers are tried in
preference order, each address of each, at most ``[delivery] max_mx_attempts`` connections
(RFC 5321 §5.1). A refused or timed-out connection, a reply that is not SMTP, a 421 or any
other 4xx (or a 5xx greeting) before the recipients were named moves on to the next address;
when every one failed, all recipients are deferred with the last reason.

The conversation is the sans-IO :class:`~serpentmail.proto.smtp_client.SMTPClientConnection`
over asyncio streams: EHLO (HELO fallback), opportunistic STARTTLS (RFC 3207; unverified, as
RFC 7435 allows, except for domains in ``tls_verify_domains``, where TLS is required and the
certificate checked against the exchanger name), AUTH for the smart host, MAIL with SIZE
(RFC 1870: a message bigger than the declared SIZE fails with 552 5.3.4 before it is sent),
MAIL and all RCPTs in one write when PIPELINING is offered (RFC 2920), BDAT when CHUNKING is
offered (RFC 3030), DATA otherwise. Each wait has the RFC 5321 §4.5.3.2 timeout of its step.

Invariants:

* One result per recipient, in order. 2xx → delivered, 5xx → failed, 4xx → deferred
  (RFC 5321 §4.2.1); a recipient refused at RCPT keeps its own reply.
* Nothing raises out of :meth:`RemoteCourier.deliver`: an unexpected error is logged with
  its detail and every recipient is deferred (errors are temporary unless known permanent).
* Never a mail loop: when the best MX of the domain is this server (its name is our
  hostname or its address is one our SMTP listener binds on the delivery port), the
  recipients fail with "mail for <domain> loops back to myself", as Postfix does; when we are
  a lower-preference MX, only the better ones are tried (RFC 5321 §5.1).
* The message is streamed from its file in 1 MiB chunks, never loaded whole; once the end of
  data has been sent, a lost reply defers (never retries on another MX in the same run): the
  duplicate window of RFC 5321 §6.1 is kept as short as it can be.

Connection reuse (RFC 5321 §3.3: a session may carry several transactions; issue 5: "several
messages to the same destination may reuse a connection"): after a transaction that ended
cleanly, the connection goes to a small :class:`ConnectionCache` keyed by destination (address,
port, exchanger name and TLS policy) instead of being closed. The next delivery to that
destination takes it (skipping connect, greeting, EHLO, STARTTLS and AUTH) and simply starts
with MAIL. The cache is bounded (idle connections per destination and in all, each kept idle
for ``idle_timeout`` seconds, reused at most ``max_uses`` times and for ``max_age`` seconds);
a connection is owned by exactly one delivery at a time (taken out of the cache while used,
never shared). Any error, any 421, any transaction that did not end cleanly drops it. A reused
connection that fails before the end of data was sent delivered nothing, so the transaction
is started again on a fresh connection to the same address (not counted as another MX
attempt); after the end of data was sent, the rules above apply unchanged (no retry, defer).

With PIPELINING, DATA is sent in the same group as MAIL and the RCPTs (RFC 2920 §3.1: DATA may
be the last command of a group), so a message over a reused connection costs two round trips.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import random
import ssl
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..config import Config
from ..log import log_event
from ..proto.smtp_client import (
    NEED_DATA,
    DotStuffer,
    ReplyError,
    ServerReply,
    SMTPClientConnection,
)
from ..server.tls import client_context
from .base import Envelope, RecipientResult, Status
from .dns import DNSResolver, MXResult, Resolver

log = logging.getLogger("serpentmail.delivery.remote")

CHUNK = 1024 * 1024  # octets read from the message file (and sent per BDAT chunk) at a time
INLINE_READ = 128 * 1024  # messages up to this size are read on the event loop (see _Chunks)


@dataclass(frozen=True, slots=True)
class Timeouts:
    """RFC 5321 §4.5.3.2 timeouts, in seconds (the defaults are the RFC's)."""

    connect: float = 30.0
    greeting: float = 300.0  # §4.5.3.2.1: initial 220 message, 5 minutes
    helo: float = 300.0  # EHLO/HELO, STARTTLS, AUTH: not in the RFC; as MAIL
    mail: float = 300.0  # §4.5.3.2.2: MAIL, 5 minutes
    rcpt: float = 300.0  # §4.5.3.2.3: RCPT, 5 minutes
    data_init: float = 120.0  # §4.5.3.2.4: DATA initiation, 2 minutes
    data_block: float = 180.0  # §4.5.3.2.5: each TCP SEND of data, 3 minutes
    data_end: float = 600.0  # §4.5.3.2.6: DATA termination, 10 minutes
    quit: float = 5.0  # we do not wait long for the 221


@dataclass(frozen=True, slots=True)
class Route:
    """One place to try: an exchanger name and one of its addresses."""

    name: str
    address: str
    port: int
    preference: int = 0


class _HostFailure(Exception):
    """This address could not take the message now: try the next one."""

    def __init__(self, reason: str, remote_mta: str | None = None, diagnostic_type: str = "x-local") -> None:
        super().__init__(reason)
        self.reason = reason
        self.remote_mta = remote_mta
        self.diagnostic_type = diagnostic_type


class _Closing(_HostFailure):
    """The server said 421 (RFC 5321 §3.8): it is closing the channel, nothing more will come."""

    def __init__(self, reply: ServerReply, host: str) -> None:
        super().__init__(f"{reply} (in reply to {reply.command})", host, "smtp")
        self.reply = reply


class _Session:
    """The asyncio side of one SMTP client connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, route: Route) -> None:
        self.reader = reader
        self.writer = writer
        self.route = route
        self.engine = SMTPClientConnection()
        self.opened = asyncio.get_running_loop().time()
        self.uses = 0  # transactions completed on this connection
        self.idle_timer: asyncio.TimerHandle | None = None

    def usable(self) -> bool:
        """Can a new transaction start here? (no reply outstanding, neither side closed)"""
        return (not self.engine.closed and not self.engine.expecting and not self.writer.is_closing()
                and not self.reader.at_eof())

    def abort(self) -> None:
        """Drop the connection at once (its state is unknown: never reuse it)."""
        self.writer.transport.abort()

    def flush(self) -> None:
        out = self.engine.data_to_send()
        if out:
            self.writer.write(out)

    async def exchange(self, timeout: float) -> list[ServerReply]:
        """Send what is queued; read every outstanding reply, each within ``timeout``."""
        replies: list[ServerReply] = []
        self.flush()
        # asyncio.timeout, not wait_for: no extra task per wait (several per message). Nothing
        # left in the transport's buffer (a command group is small): nothing to wait for, and
        # a closed connection shows as the end of the replies below.
        if self.writer.transport.get_write_buffer_size():
            async with asyncio.timeout(timeout):
                await self.writer.drain()
        while self.engine.expecting:
            ev = self.engine.next_event()
            if ev is NEED_DATA:
                async with asyncio.timeout(timeout):
                    data = await self.reader.read(65536)
                if not data:
                    raise _HostFailure(f"451 4.4.2 lost connection with {self._where()}")
                self.engine.receive_data(data)
                continue
            assert isinstance(ev, ServerReply)
            if ev.code == 421:
                raise _Closing(ev, self.route.name)
            replies.append(ev)
            # Continuations queued by the engine (HELO fallback, AUTH LOGIN) go out now.
            self.flush()
        return replies

    async def one(self, timeout: float) -> ServerReply:
        replies = await self.exchange(timeout)
        return replies[-1]

    def _where(self) -> str:
        return f"{self.route.name}[{self.route.address}]:{self.route.port}"

    def fail(self, reply: ServerReply, when: str) -> _HostFailure:
        return _HostFailure(f"{reply} (in reply to {when})", self.route.name, "smtp")

    async def close(self, timeout: float) -> None:
        # The 221 is a courtesy: the delivery is already decided, so no error matters here.
        with contextlib.suppress(Exception):
            if not self.engine.closed and not self.writer.is_closing():
                self.engine.quit()
                await self.exchange(timeout)
        self.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), timeout)


def _open_and_read(path: Path, size_hint: int = CHUNK) -> tuple[Any, bytes]:
    """Open ``path`` and read its first chunk; the file is already closed (None) when that
    chunk was the whole file, so a small message costs one thread hop, not three.

    The first read asks for ``size_hint`` + 1 octets (at most :data:`CHUNK`), not a whole
    chunk: a 1 MiB read buffer cost more than the rest of the read of a small message. A file
    longer than the hint still comes out whole: the rest follows in CHUNK reads."""
    want = min(size_hint + 1, CHUNK) if size_hint >= 0 else CHUNK
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    parts: list[bytes] = []
    got = 0
    try:
        while got < want:
            piece = os.read(fd, want - got)
            if not piece:  # end of file: the chunk is the whole message
                break
            parts.append(piece)
            got += len(piece)
        f = open(fd, "rb", closefd=True) if got == want else None  # closed by _Chunks
    except BaseException:
        os.close(fd)
        raise
    if f is None:
        os.close(fd)
    return f, b"".join(parts)


class _Chunks:
    """The file's chunks, in order (``await next()``, None at the end; ``close()`` when done).
    Reads run in a thread, off the event loop, except for a message of at most ``INLINE_READ``
    octets (``size_hint``, the queued size): that is one open/read/close of a file just
    written, so in the page cache; a thread hop would cost the event loop more than the read
    itself (the same rule as POP3's RETR). A class, not an async generator: mypyc compiles
    this module's callers (setup.py), and it does not compile async generators."""

    def __init__(self, path: Path, size_hint: int = CHUNK, fd: int = -1) -> None:
        self.path = path
        self.size_hint = size_hint
        self.fd = fd  # the file already open (Envelope.data_fd): a small one is one pread
        self.f: Any = None
        self.started = False

    async def next(self) -> bytes | None:
        if not self.started:
            self.started = True
            if self.size_hint <= INLINE_READ:
                if self.fd >= 0:
                    chunk = os.pread(self.fd, self.size_hint + 1, 0)
                    if len(chunk) <= self.size_hint:
                        return chunk or None  # the whole message in one call, nothing to close
                self.f, chunk = _open_and_read(self.path, self.size_hint)  # (or longer than said)
            else:
                self.f, chunk = await asyncio.to_thread(_open_and_read, self.path, self.size_hint)
            return chunk or None
        if self.f is None:
            return None
        chunk = await asyncio.to_thread(self.f.read, CHUNK)
        if not chunk:
            self.close()
            return None
        return bytes(chunk)

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None


class ConnectionCache:
    """Idle SMTP client connections kept for the next message to the same destination.

    Bounded: at most ``max_idle_per_key`` idle connections per destination and ``max_idle``
    in all; each stays idle at most ``idle_timeout`` seconds (then QUIT), carries at most
    ``max_uses`` transactions and lives at most ``max_age`` seconds. :meth:`take` removes the
    connection from the cache, so a connection is never used by two deliveries at once.
    Bound to the event loop that first used it (a connection cannot cross loops).
    """

    def __init__(self, *, idle_timeout: float = 3.0, max_idle: int = 64, max_idle_per_key: int = 16,
                 max_uses: int = 1000, max_age: float = 300.0, quit_timeout: float = 5.0) -> None:
        self.idle_timeout = idle_timeout
        self.max_idle = max_idle
        self.max_idle_per_key = max_idle_per_key
        self.max_uses = max_uses
        self.max_age = max_age
        self.quit_timeout = quit_timeout
        self._idle: dict[Hashable, list[_Session]] = {}
        self._count = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self.reused = 0  # observability: transactions that skipped a new connection

    def __len__(self) -> int:
        return self._count

    def _bind(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            # A previous loop's connections are unusable here (and that loop is gone).
            self._idle.clear()
            self._count = 0
            self._closing.clear()
            self._loop = loop
        return loop

    def take(self, key: Hashable) -> _Session | None:
        """An idle connection to ``key`` that still looks usable, or None."""
        loop = self._bind()
        stack = self._idle.get(key)
        while stack:
            s = stack.pop()  # the most recently used: the least likely to have timed out
            self._count -= 1
            if not stack:
                del self._idle[key]
            if s.idle_timer is not None:
                s.idle_timer.cancel()
                s.idle_timer = None
            if s.usable() and loop.time() - s.opened < self.max_age:
                return s
            self._close_later(s)
        return None

    def put(self, key: Hashable, s: _Session) -> bool:
        """Keep ``s`` for reuse; False (and the caller closes it) when it may not be kept."""
        loop = self._bind()
        if (self.idle_timeout <= 0 or not s.usable() or s.uses >= self.max_uses
                or loop.time() - s.opened >= self.max_age or self._count >= self.max_idle
                or len(self._idle.get(key, ())) >= self.max_idle_per_key):
            return False
        self._idle.setdefault(key, []).append(s)
        self._count += 1
        s.idle_timer = loop.call_later(self.idle_timeout, self._expire, key, s)
        return True

    def _expire(self, key: Hashable, s: _Session) -> None:
        stack = self._idle.get(key)
        if stack is None or s not in stack:
            return
        stack.remove(s)
        self._count -= 1
        if not stack:
            del self._idle[key]
        s.idle_timer = None
        self._close_later(s)

    def _close_later(self, s: _Session) -> None:
        task = asyncio.get_running_loop().create_task(s.close(self.quit_timeout))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def aclose(self) -> None:
        """QUIT every idle connection (server shutdown) and wait for the closes."""
        if self._loop is not asyncio.get_running_loop():
            self._idle.clear()
            self._count = 0
            return
        for stack in list(self._idle.values()):
            for s in stack:
                if s.idle_timer is not None:
                    s.idle_timer.cancel()
                    s.idle_timer = None
                self._close_later(s)
        self._idle.clear()
        self._count = 0
        if self._closing:
            await asyncio.wait(list(self._closing), timeout=self.quit_timeout + 1)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class RemoteCourier:
    """The :class:`~serpentmail.delivery.base.Courier` for recipients in other domains."""

    def __init__(self, config: Config, resolver: Resolver | None = None, rng: random.Random | None = None,
                 timeouts: Timeouts | None = None, cache: ConnectionCache | None = None) -> None:
        self.config = config
        self.rng = rng or random.Random()
        self.resolver: Resolver = resolver or DNSResolver.from_config(config, self.rng)
        self.timeouts = timeouts or Timeouts(connect=config.delivery.connect_timeout)
        self._verify_domains = frozenset(d.lower().rstrip(".") for d in config.delivery.tls_verify_domains)
        # Idle connections per destination; ConnectionCache(idle_timeout=0) turns reuse off.
        self.cache = cache if cache is not None else ConnectionCache(
            quit_timeout=self.timeouts.quit, max_idle_per_key=max(1, config.delivery.max_per_domain))

    async def aclose(self) -> None:
        """Close the idle connections (QUIT) and drop the DNS questions in flight. Deliveries
        may still run afterwards."""
        close = getattr(self.resolver, "close", None)
        if close is not None:
            close()
        await self.cache.aclose()

    # --- the Courier API -------------------------------------------------------------

    async def deliver(self, envelope: Envelope, recipients: list[str]) -> list[RecipientResult]:
        if not recipients:
            return []
        try:
            results = await self._deliver(envelope, recipients)
        except Exception as exc:
            # maddy's rule: unexpected errors are temporary; the peer never sees the detail.
            log_event(log, "delivery-error", logging.ERROR, queue_id=envelope.queue_id,
                      error=f"{type(exc).__name__}: {exc}")
            log.debug("delivery error detail", exc_info=True)
            return [RecipientResult(r, "deferred", "451 4.3.0 internal error during delivery, will retry",
                                    diagnostic_type="x-local") for r in recipients]
        out = [results.get(r) or RecipientResult(r, "deferred", "451 4.3.0 not attempted", diagnostic_type="x-local")
               for r in recipients]
        # The scheduler logs each result at INFO ("delivery ... relay= attempts= delay="); this
        # courier-side line is the same fact, so only for debugging.
        if log.isEnabledFor(logging.DEBUG):
            for res in out:
                log_event(log, "delivery", logging.DEBUG, queue_id=envelope.queue_id, to=res.recipient,
                          status=res.status, relay=res.remote_mta or "none", reply=res.reply)
        return out

    # --- routing ---------------------------------------------------------------------

    async def routes_for(self, domain: str) -> tuple[list[Route], RecipientResult | None, MXResult | None]:
        """Where to try, or a result that applies to every recipient (with "" as recipient)."""
        d = self.config.delivery
        if d.relay is not None:
            res = await self.resolver.resolve_host(d.relay.host)
            if not res.addresses:
                return [], RecipientResult("", "deferred", f"451 4.4.3 cannot resolve relay host {d.relay.host}: {res.error}",
                                           diagnostic_type="x-local"), None
            return [Route(d.relay.host, a, d.relay.port) for a in res.addresses], None, None
        mx = await self.resolver.resolve_mx(domain)
        match mx.kind:
            case "nxdomain" | "nodata":
                # RFC 3463 X.1.2: bad destination system address.
                return [], RecipientResult("", "failed", f"550 5.1.2 {mx.reason}", diagnostic_type="x-local"), mx
            case "null":
                # RFC 7505 §4.2: 556 5.1.10 for a domain that accepts no mail.
                return [], RecipientResult("", "failed", f"556 5.1.10 Recipient address rejected: {mx.reason}",
                                           diagnostic_type="x-local"), mx
            case "tempfail":
                return [], RecipientResult("", "deferred", f"451 4.4.3 {mx.reason}", diagnostic_type="x-local"), mx
        exchangers = list(mx.exchangers)
        mine = self.own_rank(exchangers)
        if mine is not None:
            if mine <= exchangers[0].preference:
                # RFC 5321 §5.1 / Postfix: we are the best MX, so delivering would loop.
                return [], RecipientResult("", "failed", f"554 5.4.6 mail for {domain} loops back to myself",
                                           diagnostic_type="x-local"), mx
            exchangers = [ex for ex in exchangers if ex.preference < mine]
        routes = [Route(ex.name, a, d.port, ex.preference) for ex in exchangers for a in ex.addresses]
        return routes, None, mx

    def own_addresses(self) -> set[str]:
        port = self.config.delivery.port
        return {ep.host for ep in self.config.smtp.listen
                if ep.port == port and ep.host not in ("0.0.0.0", "::", "")}

    def own_rank(self, exchangers: Iterable[Any]) -> int | None:
        """The preference at which this server itself appears among the exchangers, or None."""
        mine = self.own_addresses()
        me = self.config.hostname.lower().rstrip(".")
        for ex in exchangers:
            if ex.name == me or mine.intersection(ex.addresses):
                return int(ex.preference)
        return None

    # --- delivery --------------------------------------------------------------------

    async def _deliver(self, envelope: Envelope, recipients: list[str]) -> dict[str, RecipientResult]:
        domain = recipients[0].rpartition("@")[2].lower().rstrip(".")
        routes, verdict, _mx = await self.routes_for(domain)
        if verdict is not None:
            return {r: replace(verdict, recipient=r) for r in recipients}
        results: dict[str, RecipientResult] = {}
        pending = list(dict.fromkeys(recipients))
        last = _HostFailure(f"451 4.4.1 no reachable mail exchanger for {domain}")
        limit = max(1, self.config.delivery.max_mx_attempts)
        for attempt, route in enumerate(routes):
            if attempt >= limit or not pending:
                break
            try:
                await self._attempt(route, domain, envelope, pending, results)
            except _HostFailure as hf:
                last = hf
                log_event(log, "mx-failed", logging.INFO, queue_id=envelope.queue_id, host=route.name,
                          address=route.address, port=route.port, reason=hf.reason)
            except (OSError, TimeoutError, ReplyError, asyncio.IncompleteReadError, ssl.SSLError) as exc:
                last = _HostFailure(self._describe(route, exc))
                log_event(log, "mx-failed", logging.INFO, queue_id=envelope.queue_id, host=route.name,
                          address=route.address, port=route.port, reason=last.reason)
            pending = [r for r in pending if r not in results]
        for r in pending:
            results[r] = RecipientResult(r, "deferred", last.reason, last.remote_mta, last.diagnostic_type)
        return results

    @staticmethod
    def _describe(route: Route, exc: BaseException) -> str:
        where = f"{route.name}[{route.address}]:{route.port}"
        match exc:
            case TimeoutError():
                return f"451 4.4.2 conversation with {where} timed out"
            case ConnectionRefusedError():
                return f"451 4.4.1 connect to {where}: Connection refused"
            case ssl.SSLError():
                return f"451 4.7.5 TLS with {where} failed: {exc.reason or exc}"
            case ReplyError():
                return f"451 4.5.0 {where} sent something that is not SMTP"
            case asyncio.IncompleteReadError() | ConnectionError():
                return f"451 4.4.2 lost connection with {where}"
            case OSError():
                return f"451 4.4.1 connect to {where}: {exc.strerror or exc}"
        return f"451 4.4.0 {where}: {type(exc).__name__}"

    def _tls_required(self, domain: str) -> bool:
        d = self.config.delivery
        if d.relay is not None:
            return d.relay_tls == "starttls"
        return domain in self._verify_domains

    def _tls_verify(self, domain: str) -> bool:
        d = self.config.delivery
        if d.relay is not None:
            return d.relay.host.lower() in self._verify_domains
        return domain in self._verify_domains

    async def _connect(self, route: Route, domain: str) -> _Session:
        t = self.timeouts
        kwargs: dict[str, Any] = {}
        if self.config.delivery.relay is not None and self.config.delivery.relay_tls == "tls":
            # Implicit TLS to the smart host (RFC 8314 §3.3).
            kwargs["ssl"] = client_context(self._tls_verify(domain))
            kwargs["server_hostname"] = route.name if not _is_ip(route.name) else None
        reader, writer = await asyncio.wait_for(asyncio.open_connection(route.address, route.port, **kwargs), t.connect)
        return _Session(reader, writer, route)

    def _cache_key(self, route: Route, domain: str) -> Hashable:
        # Everything that shapes a session before MAIL: where, the name TLS checks, the policy.
        return (route.address, route.port, route.name, self._tls_required(domain), self._tls_verify(domain))

    async def _attempt(self, route: Route, domain: str, envelope: Envelope, pending: list[str],
                       results: dict[str, RecipientResult]) -> None:
        """One address. Final outcomes go into ``results``; _HostFailure means "next one"."""
        t = self.timeouts
        key = self._cache_key(route, domain)
        session = self.cache.take(key)
        if session is not None:
            trial: dict[str, RecipientResult] = {}
            try:
                clean = await self._transaction(session, domain, envelope, pending, trial)
            except (_HostFailure, OSError, TimeoutError, ReplyError, asyncio.IncompleteReadError,
                    ssl.SSLError) as exc:
                # Only raised before the end of data went out (after it, _final never
                # raises): the server took nothing. Start again on a fresh connection.
                session.abort()
                log_event(log, "reuse-failed", logging.DEBUG, queue_id=envelope.queue_id, host=route.name,
                          error=getattr(exc, "reason", None) or type(exc).__name__)
            except BaseException:
                session.abort()
                raise
            else:
                self.cache.reused += 1
                results.update(trial)
                await self._release(key, session, clean)
                return
        session = await self._connect(route, domain)
        clean = False
        try:
            await self._open(session, domain)
            clean = await self._transaction(session, domain, envelope, pending, results)
        finally:
            if clean:
                await self._release(key, session, clean)
            else:
                await session.close(t.quit)

    async def _release(self, key: Hashable, session: _Session, clean: bool) -> None:
        session.uses += 1
        if not (clean and self.cache.put(key, session)):
            await session.close(self.timeouts.quit)

    async def _hello(self, s: _Session) -> None:
        t = self.timeouts
        s.engine.ehlo(self.config.hostname)
        r = await s.one(t.helo)
        if not r.is_positive:
            raise s.fail(r, "EHLO/HELO")

    async def _open(self, s: _Session, domain: str) -> None:
        """Greeting, EHLO, STARTTLS and AUTH: a fresh connection made ready for MAIL."""
        t = self.timeouts
        cfg = self.config.delivery
        eng = s.engine
        greeting = await s.one(t.greeting)
        if greeting.code != 220:
            # A 421/4xx or a 5xx "no service here" greeting (RFC 5321 §3.1): next exchanger.
            raise s.fail(greeting, "the greeting")
        await self._hello(s)

        # --- STARTTLS (RFC 3207) ----------------------------------------------------------
        implicit_tls = cfg.relay is not None and cfg.relay_tls == "tls"
        want_tls = not implicit_tls and not (cfg.relay is not None and cfg.relay_tls == "none")
        if want_tls and "STARTTLS" in eng.extensions:
            eng.starttls()
            r = await s.one(t.helo)
            if r.code != 220:
                if self._tls_required(domain):
                    raise s.fail(r, "STARTTLS")
            else:
                verify = self._tls_verify(domain)
                hostname = s.route.name if not _is_ip(s.route.name) else None
                await asyncio.wait_for(
                    s.writer.start_tls(client_context(verify), server_hostname=hostname), t.helo)
                eng.tls_established()
                await self._hello(s)
        elif want_tls and self._tls_required(domain):
            raise _HostFailure(f"451 4.7.10 TLS is required for {domain} but {s.route.name} does not offer STARTTLS",
                               s.route.name)

        # --- AUTH for the smart host (RFC 4954) ------------------------------------------------
        if cfg.relay is not None and cfg.relay_username:
            mechs = eng.extensions.auth_mechanisms
            if "PLAIN" in mechs:
                eng.auth_plain(cfg.relay_username, cfg.relay_password)
            elif "LOGIN" in mechs:
                eng.auth_login(cfg.relay_username, cfg.relay_password)
            else:
                raise _HostFailure(f"451 4.7.0 relay {s.route.name} offers no usable AUTH mechanism", s.route.name)
            r = await s.one(t.helo)
            if r.code != 235:
                raise s.fail(r, "AUTH")

    async def _reset(self, s: _Session) -> bool:
        """RSET (RFC 5321 §4.1.1.5) after an unfinished transaction; True when the session
        is clean again, so it may be reused."""
        if not s.usable():
            return False
        try:
            s.engine.rset()
            r = await s.one(self.timeouts.helo)
        except (_HostFailure, OSError, TimeoutError, ReplyError, asyncio.IncompleteReadError, ssl.SSLError):
            return False
        return r.code == 250

    async def _transaction(self, s: _Session, domain: str, envelope: Envelope, pending: list[str],
                           results: dict[str, RecipientResult]) -> bool:
        """One mail transaction on a ready session. Returns True when it ended cleanly (a new
        MAIL may follow on this connection), False when the connection must be closed.
        Raises only before the end of data was sent."""
        t = self.timeouts
        eng = s.engine
        ext = eng.extensions
        # --- SIZE (RFC 1870 §4): refuse before sending a single octet of the message ------
        limit = ext.size_limit
        if limit and envelope.size > limit:
            for rcpt in pending:
                results[rcpt] = RecipientResult(
                    rcpt, "failed",
                    f"552 5.3.4 Message size ({envelope.size}) exceeds the fixed maximum message size ({limit}) of {s.route.name}",
                    s.route.name, "x-local")
            return True

        # --- SMTPUTF8 (RFC 6531 §3.2): non-ASCII addresses need a server that offers it --
        utf8 = envelope.smtputf8 and "SMTPUTF8" in ext
        todo = list(pending)
        if not utf8:
            bad = "553 5.6.7 Non-ASCII address and the destination does not support SMTPUTF8"
            if not envelope.sender.isascii():
                for rcpt in todo:
                    results[rcpt] = RecipientResult(rcpt, "failed", bad, s.route.name, "x-local")
                return True
            for rcpt in [r for r in todo if not r.isascii()]:
                results[rcpt] = RecipientResult(rcpt, "failed", bad, s.route.name, "x-local")
            todo = [r for r in todo if r.isascii()]
            if not todo:
                return True

        # --- MAIL and RCPT, pipelined when offered (RFC 2920 §3.1) -----------------------
        body = "8BITMIME" if envelope.body_8bit and "8BITMIME" in ext else None
        eng.mail(envelope.sender, size=envelope.size if limit is not None else None, body=body, smtputf8=utf8)
        chunking = "CHUNKING" in ext
        data_reply: ServerReply | None = None
        if "PIPELINING" in ext:
            for rcpt in todo:
                eng.rcpt(rcpt)
            if not chunking:
                # RFC 2920 §3.1: DATA may end the group; its reply tells whether to send.
                eng.data()
            replies = await s.exchange(max(t.mail, t.rcpt, t.data_init))
            mail_reply, rcpt_replies = replies[0], replies[1:1 + len(todo)]
            if not chunking:
                data_reply = replies[-1]
        else:
            mail_reply = await s.one(t.mail)
            rcpt_replies = []
            if mail_reply.is_positive:
                for rcpt in todo:
                    eng.rcpt(rcpt)
                    rcpt_replies.append(await s.one(t.rcpt))
        if not mail_reply.is_positive:
            if not mail_reply.is_permanent:
                raise s.fail(mail_reply, "MAIL FROM")
            # The sender itself is refused: permanent for every recipient.
            for rcpt in todo:
                results[rcpt] = RecipientResult(rcpt, "failed", str(mail_reply), s.route.name)
            if data_reply is not None and data_reply.code == 354:
                return await self._abandon_data(s)
            return await self._reset(s)
        accepted: list[str] = []
        for rcpt, r in zip(todo, rcpt_replies, strict=True):
            if r.is_positive:
                accepted.append(rcpt)
            else:
                results[rcpt] = RecipientResult(rcpt, "failed" if r.is_permanent else "deferred", str(r), s.route.name)
        if not accepted:
            if data_reply is not None and data_reply.code == 354:
                # RFC 2920 §3.1: DATA accepted although no recipient was: send just the dot.
                return await self._abandon_data(s)
            return await self._reset(s)

        # --- the message: BDAT (RFC 3030) or DATA (RFC 5321 §4.1.1.4) ----------------------
        def settle(reply: ServerReply) -> None:
            status: Status = "delivered" if 200 <= reply.code < 300 else "failed" if reply.is_permanent else "deferred"
            for rcpt in accepted:
                results[rcpt] = RecipientResult(rcpt, status, str(reply), s.route.name)

        if chunking:
            final = await self._send_bdat(s, envelope.data_path, envelope.size, envelope.data_fd)
        else:
            if data_reply is None:
                eng.data()
                data_reply = await s.one(t.data_init)
            if data_reply.code != 354:
                settle(data_reply)
                return await self._reset(s)
            final = await self._send_data(s, envelope.data_path, envelope.size, envelope.data_fd)
        if final is None:
            # The end of data went out but its reply never came: RFC 5321 §6.1 window.
            for rcpt in accepted:
                results[rcpt] = RecipientResult(
                    rcpt, "deferred", f"451 4.4.2 no reply from {s.route.name} after end of data; will retry",
                    s.route.name, "x-local")
            return False
        settle(final)
        if final.command == "BDAT" and final.argument != "LAST":
            return await self._reset(s)  # a BDAT chunk refused: the transaction is unfinished
        return 200 <= final.code < 300 or await self._reset(s)

    async def _abandon_data(self, s: _Session) -> bool:
        """A 354 came although nothing may be sent: end the (empty) data and drop the
        connection (whatever the server makes of it, no recipient was accepted)."""
        s.engine.end_data(b".\r\n")
        await self._final(s, self.timeouts.data_end)
        return False

    async def _send_data(self, s: _Session, path: Path, size_hint: int = CHUNK, fd: int = -1) -> ServerReply | None:
        t = self.timeouts
        stuffer = DotStuffer()
        chunks = _Chunks(path, size_hint, fd)
        try:
            while (chunk := await chunks.next()) is not None:
                s.engine.send_content(stuffer.feed(chunk))
                if len(chunk) >= CHUNK:  # more may follow: bound what is buffered
                    s.flush()
                    await asyncio.wait_for(s.writer.drain(), t.data_block)
        finally:
            chunks.close()
        # The last chunk and the terminator leave in one write.
        s.engine.end_data(stuffer.end())
        return await self._final(s, t.data_end)

    async def _send_bdat(self, s: _Session, path: Path, size_hint: int = CHUNK, fd: int = -1) -> ServerReply | None:
        chunks = _Chunks(path, size_hint, fd)
        try:
            return await self._bdat_chunks(s, chunks)
        finally:
            chunks.close()

    async def _bdat_chunks(self, s: _Session, chunks: _Chunks) -> ServerReply | None:
        t = self.timeouts
        current = await chunks.next()
        if current is None:
            s.engine.bdat(b"", last=True)
            return await self._final(s, t.data_end)
        while current is not None:
            nxt = await chunks.next()
            if nxt is None:
                if not current.endswith(b"\r\n"):
                    current += b"\r\n"  # RFC 5322 §2.3: the message ends with a complete line
                s.engine.bdat(current, last=True)
                return await self._final(s, t.data_end)
            s.engine.bdat(current)
            r = await s.one(t.data_block)
            if not r.is_positive:
                return r
            current = nxt
        return None  # pragma: no cover - the loop always returns

    async def _final(self, s: _Session, timeout: float) -> ServerReply | None:
        try:
            return await s.one(timeout)
        except _Closing as closing:
            return closing.reply
        except (OSError, TimeoutError, ReplyError, _HostFailure, asyncio.IncompleteReadError) as exc:
            log_event(log, "no-final-reply", logging.WARNING, host=s.route.name, error=str(exc) or type(exc).__name__)
            return None
