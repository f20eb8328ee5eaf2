"""DNS resolution for remote delivery: where does mail for a domain go?

:class:`Resolver` is the plug point (a Protocol, so tests and the sandbox can inject their
own); :class:`DNSResolver` implements it with dnspython's asyncio resolver, through the
configured ``[dns] nameservers`` (``host:port`` allowed) or the system resolver.

``resolve_mx(domain)`` answers with an :class:`MXResult` whose ``kind`` is one of:

* ``"mx"`` — the exchangers, sorted by preference (lowest first, RFC 5321 §5.1), equal
  preferences shuffled with the injected :class:`random.Random` (RFC 5321 §5.1: "randomize
  them to spread the load"), each with its A then AAAA addresses;
* ``"implicit"`` — no MX records, so the domain itself is the exchanger with preference 0
  (RFC 5321 §5.1, "implicit MX");
* ``"null"`` — the domain publishes a null MX (RFC 7505 §3: a single MX with exchange "."):
  it accepts no mail, the recipient fails at once with 556 5.1.10 (RFC 7505 §4.2);
* ``"nxdomain"`` — the domain does not exist: permanent ("Host or domain name not found");
* ``"nodata"`` — it exists but has neither MX nor address records: permanent;
* ``"tempfail"`` — SERVFAIL, timeout or no usable nameserver: temporary, retry later.

Invariants: nothing here raises for a DNS outcome; every outcome is a value. A failure is
temporary unless DNS said authoritatively that the name does not exist or has no data
(errors are temporary by default, never permanent by accident). Domain literals
(``[192.0.2.1]``, RFC 5321 §4.1.3) resolve to themselves.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from ..config import Config, Endpoint
from ..log import log_event

log = logging.getLogger("serpentmail.dns")

MXKind = Literal["mx", "implicit", "null", "nxdomain", "nodata", "tempfail"]


@dataclass(frozen=True, slots=True)
class Exchanger:
    preference: int
    name: str  # lower case, no trailing dot
    addresses: tuple[str, ...]
    error: str = ""  # why there are no addresses
    temporary: bool = False  # that error was temporary


@dataclass(frozen=True, slots=True)
class MXResult:
    domain: str
    kind: MXKind
    exchangers: tuple[Exchanger, ...] = ()
    reason: str = ""  # for the failure kinds, a sentence for logs and bounces

    @property
    def ok(self) -> bool:
        return self.kind in ("mx", "implicit")

    @property
    def permanent(self) -> bool:
        return self.kind in ("null", "nxdomain", "nodata")

    @property
    def temporary(self) -> bool:
        return self.kind == "tempfail"


@dataclass(frozen=True, slots=True)
class AddressResult:
    """The addresses of one host name; ``error`` set (and ``temporary``) when there are none."""

    addresses: tuple[str, ...]
    error: str = ""
    temporary: bool = False


class Resolver(Protocol):
    async def resolve_mx(self, domain: str) -> MXResult: ...

    async def resolve_host(self, name: str) -> AddressResult: ...


def _norm(name: str) -> str:
    return name.strip().rstrip(".").lower()


def _literal(domain: str) -> str | None:
    """The address inside a domain literal (RFC 5321 §4.1.3), or None."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    inner = domain[1:-1]
    if inner.lower().startswith("ipv6:"):
        inner = inner[5:]
    try:
        return str(ipaddress.ip_address(inner))
    except ValueError:
        return None


def _nameserver_address(ep: Endpoint) -> str:
    try:
        return str(ipaddress.ip_address(ep.host))
    except ValueError:
        # A host name in [dns] nameservers: resolved once, with the system resolver.
        return socket.gethostbyname(ep.host)


class DNSResolver:
    """The dnspython implementation of :class:`Resolver`."""

    def __init__(self, nameservers: Sequence[Endpoint] = (), timeout: float = 5.0,
                 rng: random.Random | None = None) -> None:
        import dns.asyncresolver
        import dns.nameserver

        self.rng = rng or random.Random()
        if nameservers:
            self._resolver = dns.asyncresolver.Resolver(configure=False)
            self._resolver.nameservers = [
                dns.nameserver.Do53Nameserver(_nameserver_address(ep), ep.port) for ep in nameservers
            ]
        else:
            self._resolver = dns.asyncresolver.Resolver()
        self._resolver.lifetime = timeout
        self._resolver.timeout = min(timeout, 2.0)
        # Tried once per nameserver before giving up: SERVFAIL is a temporary answer here.
        self._resolver.retry_servfail = False

    @classmethod
    def from_config(cls, cfg: Config, rng: random.Random | None = None) -> DNSResolver:
        return cls(cfg.dns.nameservers, cfg.dns.timeout, rng)

    async def _query(self, name: str, rdtype: str) -> tuple[str, list[object]]:
        """("ok"|"nodata"|"nxdomain"|"tempfail:<why>", records)."""
        import dns.exception
        import dns.resolver

        try:
            answer = await self._resolver.resolve(name + ".", rdtype, raise_on_no_answer=False, search=False)
        except dns.resolver.NXDOMAIN:
            return "nxdomain", []
        except dns.resolver.NoNameservers:
            return "tempfail:server failure (SERVFAIL)", []
        except dns.exception.Timeout:
            return "tempfail:timeout", []
        except dns.exception.DNSException as exc:
            return f"tempfail:{type(exc).__name__}", []
        except OSError as exc:
            return f"tempfail:{exc.strerror or exc}", []
        if answer.rrset is None:
            return "nodata", []
        return "ok", list(answer.rrset)

    async def resolve_host(self, name: str) -> AddressResult:
        """A then AAAA addresses of ``name`` (IPv4 first: more often reachable)."""
        name = _norm(name)
        try:
            return AddressResult((str(ipaddress.ip_address(name)),))
        except ValueError:
            pass
        (st4, r4), (st6, r6) = await asyncio.gather(self._query(name, "A"), self._query(name, "AAAA"))
        addresses = tuple(str(getattr(r, "address", r)) for r in [*r4, *r6])
        if addresses:
            return AddressResult(addresses)
        if st4 == "nxdomain" or st6 == "nxdomain":
            return AddressResult((), f"Host or domain name not found: {name}")
        for st in (st4, st6):
            if st.startswith("tempfail"):
                return AddressResult((), f"temporary DNS failure for {name}: {st.partition(':')[2]}",
                                     temporary=True)
        return AddressResult((), f"no address records for {name}")

    async def resolve_mx(self, domain: str) -> MXResult:
        domain = _norm(domain)
        literal = _literal(domain)
        if literal is not None:
            return MXResult(domain, "implicit", (Exchanger(0, literal, (literal,)),))
        status, records = await self._query(domain, "MX")
        if status == "nxdomain":
            return MXResult(domain, "nxdomain", reason=f"Host or domain name not found: couldn't find host named {domain}")
        if status.startswith("tempfail"):
            why = status.partition(":")[2]
            log_event(log, "mx-tempfail", logging.WARNING, domain=domain, reason=why)
            return MXResult(domain, "tempfail", reason=f"temporary DNS failure looking up MX for {domain}: {why}")
        mxs = [(int(getattr(r, "preference", 0)), _norm(str(getattr(r, "exchange", "")))) for r in records]
        if status == "nodata" or not mxs:
            # RFC 5321 §5.1: no MX records → the domain itself, preference 0 ("implicit MX").
            addr = await self.resolve_host(domain)
            if addr.addresses:
                return MXResult(domain, "implicit", (Exchanger(0, domain, addr.addresses),))
            if addr.temporary:
                return MXResult(domain, "tempfail", reason=addr.error)
            return MXResult(domain, "nodata", reason=f"Host or domain name not found: no MX or address records for {domain}")
        real = [(pref, name) for pref, name in mxs if name]
        if not real:
            # RFC 7505 §3: the single MX with exchange "." says "this domain accepts no mail".
            return MXResult(domain, "null", reason=f"Domain {domain} does not accept mail (null MX)")
        # RFC 7505 §3 forbids mixing a null MX with others; if it happens, ignore the ".".
        # Canonical order first (DNS answers come in any order), so the injected rng alone
        # decides how equal preferences are arranged.
        real.sort()
        self.rng.shuffle(real)
        real.sort(key=lambda pm: pm[0])  # stable: equal preferences stay shuffled
        found = await asyncio.gather(*(self.resolve_host(name) for _, name in real))
        exchangers = tuple(
            Exchanger(pref, name, res.addresses, res.error, res.temporary)
            for (pref, name), res in zip(real, found, strict=True)
        )
        if not any(ex.addresses for ex in exchangers):
            if any(ex.temporary for ex in exchangers):
                return MXResult(domain, "tempfail", exchangers,
                                reason=f"temporary DNS failure resolving the MX hosts of {domain}")
            return MXResult(domain, "nodata", exchangers,
                            reason=f"Host or domain name not found: no address for any MX host of {domain}")
        return MXResult(domain, "mx", exchangers)
