"""MX resolution against the sandbox DNS server on 127.0.5.1 (never a real nameserver)."""

from __future__ import annotations

import asyncio
import random
import socket
import struct
from collections.abc import Iterator

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
