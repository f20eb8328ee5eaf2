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
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
import ssl
from collections.abc import AsyncGenerator, Iterable
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

    def flush(self) -> None:
        out = self.engine.data_to_send()
        if out:
            self.writer.write(out)

    async def exchange(self, timeout: float) -> list[ServerReply]:
        """Send what is queued; read every outstanding reply, each within ``timeout``."""
        replies: list[ServerReply] = []
        self.flush()
        await asyncio.wait_for(self.writer.drain(), timeout)
        while self.engine.expecting:
            ev = self.engine.next_event()
            if ev is NEED_DATA:
                data = await asyncio.wait_for(self.reader.read(65536), timeout)
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


async def _read_chunks(path: Path) -> AsyncGenerator[bytes, None]:
    """Async generator of the file's chunks (reads run in a thread, off the event loop)."""
    f = await asyncio.to_thread(open, path, "rb")
    try:
        while True:
            chunk = await asyncio.to_thread(f.read, CHUNK)
            if not chunk:
                return
            yield chunk
    finally:
        f.close()


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class RemoteCourier:
    """The :class:`~serpentmail.delivery.base.Courier` for recipients in other domains."""

    def __init__(self, config: Config, resolver: Resolver | None = None, rng: random.Random | None = None,
                 timeouts: Timeouts | None = None) -> None:
        self.config = config
        self.rng = rng or random.Random()
        self.resolver: Resolver = resolver or DNSResolver.from_config(config, self.rng)
        self.timeouts = timeouts or Timeouts(connect=config.delivery.connect_timeout)
        self._verify_domains = frozenset(d.lower().rstrip(".") for d in config.delivery.tls_verify_domains)

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
        for res in out:
            log_event(log, "delivery", queue_id=envelope.queue_id, to=res.recipient, status=res.status,
                      relay=res.remote_mta or "none", reply=res.reply)
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

    async def _attempt(self, route: Route, domain: str, envelope: Envelope, pending: list[str],
                       results: dict[str, RecipientResult]) -> None:
        """One connection. Final outcomes go into ``results``; _HostFailure means "next one"."""
        t = self.timeouts
        session = await self._connect(route, domain)
        try:
            await self._transaction(session, domain, envelope, pending, results)
        finally:
            await session.close(t.quit)

    async def _hello(self, s: _Session) -> None:
        t = self.timeouts
        s.engine.ehlo(self.config.hostname)
        r = await s.one(t.helo)
        if not r.is_positive:
            raise s.fail(r, "EHLO/HELO")

    async def _transaction(self, s: _Session, domain: str, envelope: Envelope, pending: list[str],
                           results: dict[str, RecipientResult]) -> None:
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

        ext = eng.extensions
        # --- SIZE (RFC 1870 §4): refuse before sending a single octet of the message ------
        limit = ext.size_limit
        if limit and envelope.size > limit:
            for rcpt in pending:
                results[rcpt] = RecipientResult(
                    rcpt, "failed",
                    f"552 5.3.4 Message size ({envelope.size}) exceeds the fixed maximum message size ({limit}) of {s.route.name}",
                    s.route.name, "x-local")
            return

        # --- SMTPUTF8 (RFC 6531 §3.2): non-ASCII addresses need a server that offers it --
        utf8 = envelope.smtputf8 and "SMTPUTF8" in ext
        todo = list(pending)
        if not utf8:
            bad = "553 5.6.7 Non-ASCII address and the destination does not support SMTPUTF8"
            if not envelope.sender.isascii():
                for rcpt in todo:
                    results[rcpt] = RecipientResult(rcpt, "failed", bad, s.route.name, "x-local")
                return
            for rcpt in [r for r in todo if not r.isascii()]:
                results[rcpt] = RecipientResult(rcpt, "failed", bad, s.route.name, "x-local")
            todo = [r for r in todo if r.isascii()]
            if not todo:
                return

        # --- MAIL and RCPT, pipelined when offered (RFC 2920 §3.1) -----------------------
        body = "8BITMIME" if envelope.body_8bit and "8BITMIME" in ext else None
        eng.mail(envelope.sender, size=envelope.size if limit is not None else None, body=body, smtputf8=utf8)
        if "PIPELINING" in ext:
            for rcpt in todo:
                eng.rcpt(rcpt)
            replies = await s.exchange(max(t.mail, t.rcpt))
            mail_reply, rcpt_replies = replies[0], replies[1:]
        else:
            mail_reply = await s.one(t.mail)
            rcpt_replies = []
            if mail_reply.is_positive:
                for rcpt in todo:
                    eng.rcpt(rcpt)
                    rcpt_replies.append(await s.one(t.rcpt))
        if not mail_reply.is_positive:
            if mail_reply.is_permanent:
                # The sender itself is refused: permanent for every recipient.
                for rcpt in todo:
                    results[rcpt] = RecipientResult(rcpt, "failed", str(mail_reply), s.route.name)
                return
            raise s.fail(mail_reply, "MAIL FROM")
        accepted: list[str] = []
        for rcpt, r in zip(todo, rcpt_replies, strict=True):
            if r.is_positive:
                accepted.append(rcpt)
            else:
                results[rcpt] = RecipientResult(rcpt, "failed" if r.is_permanent else "deferred", str(r), s.route.name)
        if not accepted:
            eng.rset()
            return

        # --- the message: BDAT (RFC 3030) or DATA (RFC 5321 §4.1.1.4) ----------------------
        def settle(reply: ServerReply) -> None:
            status: Status = "delivered" if 200 <= reply.code < 300 else "failed" if reply.is_permanent else "deferred"
            for rcpt in accepted:
                results[rcpt] = RecipientResult(rcpt, status, str(reply), s.route.name)

        if "CHUNKING" in ext:
            final = await self._send_bdat(s, envelope.data_path)
        else:
            eng.data()
            r = await s.one(t.data_init)
            if r.code != 354:
                settle(r)
                return
            final = await self._send_data(s, envelope.data_path)
        if final is None:
            # The end of data went out but its reply never came: RFC 5321 §6.1 window.
            for rcpt in accepted:
                results[rcpt] = RecipientResult(
                    rcpt, "deferred", f"451 4.4.2 no reply from {s.route.name} after end of data; will retry",
                    s.route.name, "x-local")
            return
        settle(final)

    async def _send_data(self, s: _Session, path: Path) -> ServerReply | None:
        t = self.timeouts
        stuffer = DotStuffer()
        async for chunk in _read_chunks(path):
            s.writer.write(stuffer.feed(chunk))
            await asyncio.wait_for(s.writer.drain(), t.data_block)
        s.engine.end_data(stuffer.end())
        return await self._final(s, t.data_end)

    async def _send_bdat(self, s: _Session, path: Path) -> ServerReply | None:
        t = self.timeouts
        chunks = _read_chunks(path)
        current: bytes | None = await anext(chunks, None)
        if current is None:
            s.engine.bdat(b"", last=True)
            return await self._final(s, t.data_end)
        while current is not None:
            nxt: bytes | None = await anext(chunks, None)
            if nxt is None:
                if not current.endswith(b"\r\n"):
                    current += b"\r\n"  # RFC 5322 §2.3: the message ends with a complete line
                s.engine.bdat(current, last=True)
                return await self._final(s, t.data_end)
            s.engine.bdat(current)
            r = await s.one(t.data_block)
            if not r.is_positive:
                await chunks.aclose()
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
