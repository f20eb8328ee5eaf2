"""MX resolution against the sandbox DNS server on 127.0.5.1 (never a real nameserver)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
from collections.abc import AsyncIterator, Iterator

import pytest

from serpentmail.config import Endpoint
from serpentmail.delivery.dns import DNSResolver, MXResult
from serpentmail.sandbox.dns import DNSServer, running_dns

HOST = "127.0.5.1"


@pytest.fixture
def dns() -> Iterator[DNSServer]:
    with running_dns(HOST, 0, {
        "winview.test": {"MX": ["20 mx2.winview.test", "10 mx1.winview.test"]},
        "mx1.winview.test": {"A": ["127.0.5.2"], "AAAA": ["::1"]},
        "mx2.winview.test": {"A": ["127.0.5.3"]},
    }) as server:
        yield server


def resolve(dns: DNSServer, domain: str, seed: int = 0, timeout: float = 1.0) -> MXResult:
    r = DNSResolver([Endpoint(HOST, dns.port)], timeout, random.Random(seed))
    return asyncio.run(r.resolve_mx(domain))


def test_mx_sorted_by_preference_with_addresses(dns: DNSServer) -> None:
    res = resolve(dns, "WinView.Test.")
    assert res.kind == "mx" and res.ok and not res.permanent and not res.temporary
    assert [(e.preference, e.name, e.addresses) for e in res.exchangers] == [
        (10, "mx1.winview.test", ("127.0.5.2", "::1")),
        (20, "mx2.winview.test", ("127.0.5.3",)),
    ]


def test_equal_preferences_are_shuffled_by_the_injected_rng(dns: DNSServer) -> None:
    dns.zones.pop("winview.test")
    for i in range(6):
        dns.add_mx("winview.test", 10, f"eq{i}.winview.test")
        dns.add_a(f"eq{i}.winview.test", f"127.0.5.{10 + i}")
    dns.add_mx("winview.test", 5, "best.winview.test")
    dns.add_a("best.winview.test", "127.0.5.9")
    orders = set()
    for seed in range(8):
        names = [e.name for e in resolve(dns, "winview.test", seed).exchangers]
        assert names[0] == "best.winview.test"  # preference still rules
        orders.add(tuple(names[1:]))
        # Same seed, same order: deterministic for tests.
        assert names == [e.name for e in resolve(dns, "winview.test", seed).exchangers]
    assert len(orders) > 1


def test_implicit_mx_from_a_records(dns: DNSServer) -> None:
    dns.add_a("implicit.test", "127.0.5.7")
    res = resolve(dns, "implicit.test")
    assert res.kind == "implicit" and [(e.preference, e.name, e.addresses) for e in res.exchangers] == [
        (0, "implicit.test", ("127.0.5.7",))]


def test_null_mx(dns: DNSServer) -> None:
    dns.add_null_mx("nomail.test")
    res = resolve(dns, "nomail.test")
    assert res.kind == "null" and res.permanent and res.exchangers == ()


def test_nxdomain(dns: DNSServer) -> None:
    res = resolve(dns, "doesnotexist.test")
    assert res.kind == "nxdomain" and res.permanent
    assert "couldn't find host named doesnotexist.test" in res.reason


def test_exists_without_mx_or_address_is_permanent(dns: DNSServer) -> None:
    dns.add_txt("txtonly.test", "v=spf1 -all")
    res = resolve(dns, "txtonly.test")
    assert res.kind == "nodata" and res.permanent


def test_servfail_is_temporary(dns: DNSServer) -> None:
    dns.set_mode("winview.test", "servfail")
    res = resolve(dns, "winview.test")
    assert res.kind == "tempfail" and res.temporary and "SERVFAIL" in res.reason
    dns.set_mode("winview.test", None)
    assert resolve(dns, "winview.test").kind == "mx"


def test_timeout_is_temporary(dns: DNSServer) -> None:
    dns.set_mode("winview.test", "timeout")
    res = resolve(dns, "winview.test", timeout=0.4)
    assert res.kind == "tempfail" and "timeout" in res.reason


def test_mx_host_lookup_failures(dns: DNSServer) -> None:
    # One exchanger without an address is skipped; when none has one, the kind says why.
    dns.add_mx("half.test", 10, "gone.half.test")
    dns.add_mx("half.test", 20, "mx1.winview.test")
    res = resolve(dns, "half.test")
    assert res.kind == "mx" and res.exchangers[0].addresses == () and res.exchangers[0].error
    dns.add_mx("broken.test", 10, "slow.broken.test")
    dns.set_mode("slow.broken.test", "servfail")
    assert resolve(dns, "broken.test").kind == "tempfail"
    dns.add_mx("dangling.test", 10, "nowhere.dangling.test")
    assert resolve(dns, "dangling.test").kind == "nodata"


def test_domain_literal_needs_no_dns(dns: DNSServer) -> None:
    res = resolve(dns, "[127.0.5.8]")
    assert res.kind == "implicit" and res.exchangers[0].addresses == ("127.0.5.8",)
    assert dns.queries == []


def test_server_answers_over_tcp_with_cname(dns: DNSServer) -> None:
    import dns.message as dmsg
    import dns.rdatatype as dtype

    dns.add_cname("alias.test", "mx2.winview.test")
    q = dmsg.make_query("alias.test.", "A").to_wire()
    with socket.create_connection((HOST, dns.port), timeout=2) as s:
        s.sendall(struct.pack("!H", len(q)) + q)
        (n,) = struct.unpack("!H", s.recv(2))
        buf = b""
        while len(buf) < n:
            buf += s.recv(n - len(buf))
    resp = dmsg.from_wire(buf)
    types = [dtype.to_text(rr.rdtype) for rr in resp.answer]
    assert types == ["CNAME", "A"] and resp.answer[1][0].address == "127.0.5.3"


# --- the answer cache (RFC 1035 §3.2.1, RFC 2308 §5) -------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


ZONES = {
    "winview.test": {"MX": ["10 mx1.winview.test"]},
    "mx1.winview.test": {"A": ["127.0.5.2"]},
    "bare.test": {"TXT": ["v=spf1 -all"]},
}


def _cached_resolver(port: int, clock: _Clock, cache_max_ttl: float = 3600.0) -> DNSResolver:
    return DNSResolver([Endpoint(HOST, port)], 1.0, random.Random(0), cache_max_ttl=cache_max_ttl, clock=clock)


@contextlib.asynccontextmanager
async def _serving(*servers: DNSServer) -> AsyncIterator[None]:
    """Start the sandbox DNS servers on this event loop, stop them at the end."""
    for server in servers:
        await server.start()
    try:
        yield
    finally:
        for server in servers:
            await server.stop()


def test_answers_are_cached_for_their_ttl_and_asked_again_after() -> None:
    async def main() -> None:
        server = DNSServer(HOST, 0, ZONES, ttl=60, negative_ttl=60)  # the AAAA is a NODATA
        async with _serving(server):
            clock = _Clock()
            r = _cached_resolver(server.port, clock)
            first = await r.resolve_mx("winview.test")
            asked = len(server.queries)
            assert asked == 3  # MX, then A and AAAA of the exchanger
            for _ in range(5):
                assert await r.resolve_mx("winview.test") == first
            assert len(server.queries) == asked and r.cache_hits == 15
            # A change on the server is seen once the TTL has run out, not before.
            server.zones["mx1.winview.test"]["A"] = ["127.0.5.7"]
            clock.now += 59
            assert (await r.resolve_mx("winview.test")).exchangers[0].addresses == ("127.0.5.2",)
            clock.now += 2
            assert (await r.resolve_mx("winview.test")).exchangers[0].addresses == ("127.0.5.7",)
            assert len(server.queries) == asked + 3

    asyncio.run(main())


def test_ttl_zero_and_a_zero_cap_are_never_cached() -> None:
    async def main() -> None:
        server = DNSServer(HOST, 0, ZONES)  # the sandbox's TTL 0: its table may change any time
        capped = DNSServer(HOST, 0, ZONES, ttl=60)
        async with _serving(server, capped):
            clock = _Clock()
            for srv, r in ((server, _cached_resolver(server.port, clock)),
                           (capped, _cached_resolver(capped.port, clock, cache_max_ttl=0))):
                await r.resolve_mx("winview.test")
                srv.zones["mx1.winview.test"]["A"] = ["127.0.5.8"]
                assert (await r.resolve_mx("winview.test")).exchangers[0].addresses == ("127.0.5.8",)
                assert len(srv.queries) == 6 and r.cache_hits == 0
                srv.zones["mx1.winview.test"]["A"] = ["127.0.5.2"]

    asyncio.run(main())


def test_negative_answers_are_cached_for_the_soa_minimum_only_when_a_soa_came() -> None:
    async def main() -> None:
        with_soa = DNSServer(HOST, 0, ZONES, ttl=60, negative_ttl=30)
        without = DNSServer(HOST, 0, ZONES, ttl=60)
        async with _serving(with_soa, without):
            clock = _Clock()
            r = _cached_resolver(with_soa.port, clock)
            assert (await r.resolve_mx("nowhere.test")).kind == "nxdomain"
            # bare.test exists without MX or address: NODATA for MX, A and AAAA
            assert (await r.resolve_mx("bare.test")).kind == "nodata"
            asked = len(with_soa.queries)
            assert (await r.resolve_mx("nowhere.test")).kind == "nxdomain"
            assert (await r.resolve_mx("bare.test")).kind == "nodata"
            assert len(with_soa.queries) == asked
            # The domain appears: seen once the negative TTL (the SOA's 30 s) has passed.
            with_soa.add_mx("nowhere.test", 10, "mx1.winview.test")
            clock.now += 31
            assert (await r.resolve_mx("nowhere.test")).kind == "mx"

            plain = _cached_resolver(without.port, clock)
            assert (await plain.resolve_mx("nowhere.test")).kind == "nxdomain"
            without.add_mx("nowhere.test", 10, "mx1.winview.test")
            assert (await plain.resolve_mx("nowhere.test")).kind == "mx"  # no SOA: not cached

    asyncio.run(main())


def test_temporary_failures_are_not_cached_and_concurrent_questions_share_one_query() -> None:
    async def main() -> None:
        server = DNSServer(HOST, 0, ZONES, ttl=60)
        async with _serving(server):
            clock = _Clock()
            r = _cached_resolver(server.port, clock)
            server.set_mode("winview.test", "servfail")
            assert (await r.resolve_mx("winview.test")).kind == "tempfail"
            server.set_mode("winview.test", None)
            server.queries.clear()
            results = await asyncio.gather(*(r.resolve_mx("winview.test") for _ in range(20)))
            assert {res.kind for res in results} == {"mx"}
            assert sorted(server.queries) == [("mx1.winview.test", "A"), ("mx1.winview.test", "AAAA"),
                                              ("winview.test", "MX")]

    asyncio.run(main())


def test_close_cancels_the_questions_in_flight() -> None:
    """A server stopping while a nameserver says nothing: the question's task is cancelled (no
    task left pending when the loop closes), and the delivery waiting on it is told so."""
    async def main() -> None:
        server = DNSServer(HOST, 0, ZONES, ttl=60)
        async with _serving(server):
            server.set_mode("winview.test", "timeout")
            r = _cached_resolver(server.port, _Clock())
            lookup = asyncio.ensure_future(r.resolve_mx("winview.test"))
            await asyncio.sleep(0.05)
            assert len(r._asking) == 1
            (task,) = r._asking.values()
            r.close()
            with pytest.raises(asyncio.CancelledError):
                await lookup
            assert task.cancelled() and not r._asking and not r._cache

    asyncio.run(main())
