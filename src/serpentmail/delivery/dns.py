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

Answers are cached for their time to live (RFC 1035 §3.2.1, capped by ``[dns] cache_max_ttl``):
a question costs dnspython about a millisecond of CPU, and one message to a remote domain asks
three (MX, then A and AAAA of each exchanger). A name that does not exist, or has no records of
the type asked, is cached as RFC 2308 §5 says: for the SOA's TTL or its MINIMUM field, whichever
is smaller, and not at all when the answer carries no SOA. A TTL of 0 is never cached (RFC 1035
§3.2.1), and neither is a temporary failure. Several deliveries asking the same question at
once share one query.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import random
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

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


CACHE_ENTRIES = 10_000  # answers kept at most (see DNSResolver._answered)


async def _ready(answer: tuple[str, list[object]]) -> tuple[str, list[object]]:
    return answer


def _negative_ttl(response: Any) -> float:
    """How long a "no such name" or "no such data" answer may be kept (RFC 2308 §5): the
    smaller of the authority section's SOA TTL and its MINIMUM field; 0 without a SOA."""
    import dns.rdatatype

    for rrset in getattr(response, "authority", None) or []:
        if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
            return float(min(rrset.ttl, next(iter(rrset)).minimum))
    return 0.0


class DNSResolver:
    """The dnspython implementation of :class:`Resolver`."""

    def __init__(self, nameservers: Sequence[Endpoint] = (), timeout: float = 5.0,
                 rng: random.Random | None = None, *, cache_max_ttl: float = 3600.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        import dns.asyncresolver
        import dns.nameserver

        self.rng = rng or random.Random()
        # (name, type) -> (expiry on ``clock``, status, records): see the module docstring.
        self.cache_max_ttl = cache_max_ttl
        self._cache: dict[tuple[str, str], tuple[float, str, list[object]]] = {}
        self._asking: dict[tuple[str, str], asyncio.Task[tuple[str, list[object], float]]] = {}
        # Address literals already parsed (a relay given as an IP is asked for every message,
        # and ipaddress parses in Python): bounded, since names come from configuration and MX.
        self._literals: dict[str, AddressResult] = {}
        self._clock = clock
        self.cache_hits = 0  # answers served from the cache (tests, bench.micro dns)
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
        return cls(cfg.dns.nameservers, cfg.dns.timeout, rng, cache_max_ttl=cfg.dns.cache_max_ttl)

    def close(self) -> None:
        """Cancel the questions still on their way (server stop: no task outlives the loop)."""
        for task in list(self._asking.values()):
            task.cancel()
        self._asking.clear()

    def _cached(self, name: str, rdtype: str) -> tuple[str, list[object]] | None:
        """The live cached answer to (name, type), or None."""
        key = (name, rdtype)
        hit = self._cache.get(key)
        if hit is None:
            return None
        if hit[0] <= self._clock():
            del self._cache[key]
            return None
        self.cache_hits += 1
        return hit[1], hit[2]

    async def _query(self, name: str, rdtype: str) -> tuple[str, list[object]]:
        """("ok"|"nodata"|"nxdomain"|"tempfail:<why>", records), from the cache when it holds
        a live answer; a question already on its way is waited for, not asked again."""
        hit = self._cached(name, rdtype)
        if hit is not None:
            return hit
        key = (name, rdtype)
        task = self._asking.get(key)
        if task is None:
            task = asyncio.ensure_future(self._ask(name, rdtype))
            self._asking[key] = task
            task.add_done_callback(functools.partial(self._answered, key))
        # shield: one caller giving up (its delivery cancelled) does not cancel the others' query.
        status, records, _ttl = await asyncio.shield(task)
        return status, records

    def _answered(self, key: tuple[str, str], task: asyncio.Task[tuple[str, list[object], float]]) -> None:
        self._asking.pop(key, None)
        if task.cancelled() or task.exception() is not None:
            return
        status, records, ttl = task.result()
        ttl = min(ttl, self.cache_max_ttl)
        if ttl <= 0:
            return
        if len(self._cache) >= CACHE_ENTRIES:
            now = self._clock()
            for k in [k for k, v in self._cache.items() if v[0] <= now]:
                del self._cache[k]
            if len(self._cache) >= CACHE_ENTRIES:  # all live: the oldest half goes
                for k in list(self._cache)[:CACHE_ENTRIES // 2]:
                    del self._cache[k]
        self._cache[key] = (self._clock() + ttl, status, records)

    async def _ask(self, name: str, rdtype: str) -> tuple[str, list[object], float]:
        """One question to the nameservers: (status, records, seconds the answer may be kept)."""
        import dns.exception
        import dns.resolver

        try:
            answer = await self._resolver.resolve(name + ".", rdtype, raise_on_no_answer=False, search=False)
        except dns.resolver.NXDOMAIN as exc:
            responses = exc.kwargs.get("responses") or {}
            return "nxdomain", [], min((_negative_ttl(r) for r in responses.values()), default=0.0)
        except dns.resolver.NoNameservers:
            return "tempfail:server failure (SERVFAIL)", [], 0.0
        except dns.exception.Timeout:
            return "tempfail:timeout", [], 0.0
        except dns.exception.DNSException as exc:
            return f"tempfail:{type(exc).__name__}", [], 0.0
        except OSError as exc:
            return f"tempfail:{exc.strerror or exc}", [], 0.0
        if answer.rrset is None:
            return "nodata", [], _negative_ttl(answer.response)
        # The rrset's TTL is the smallest of its records' (and of a CNAME chain's, dnspython).
        return "ok", list(answer.rrset), float(answer.rrset.ttl)

    async def resolve_host(self, name: str) -> AddressResult:
        """A then AAAA addresses of ``name`` (IPv4 first: more often reachable)."""
        known = self._literals.get(name)
        if known is not None:
            return known
        name = _norm(name)
        if ":" in name or name.replace(".", "").isdigit():  # what could be an IP address literal
            try:
                res = AddressResult((str(ipaddress.ip_address(name)),))
            except ValueError:
                pass
            else:
                if len(self._literals) < 256:
                    self._literals[name] = res
                return res
        a, aaaa = self._cached(name, "A"), self._cached(name, "AAAA")
        if a is not None and aaaa is not None:  # both known: no tasks for a gather
            (st4, r4), (st6, r6) = a, aaaa
        else:
            (st4, r4), (st6, r6) = await asyncio.gather(
                self._query(name, "A") if a is None else _ready(a),
                self._query(name, "AAAA") if aaaa is None else _ready(aaaa))
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
        if len(real) == 1:  # the common case: no task for a gather of one
            found = [await self.resolve_host(real[0][1])]
        else:
            found = list(await asyncio.gather(*(self.resolve_host(name) for _, name in real)))
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
