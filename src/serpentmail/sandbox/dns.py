"""A small authoritative DNS server for tests and the sandbox (UDP and TCP, RFC 1035 §4.2).

It answers from a record table the caller owns and may change at any time:

    zones = {"winview.test": {"MX": ["10 mx1.winview.test", "20 mx2.winview.test"]},
             "mx1.winview.test": {"A": ["127.0.5.2"]}}
    server = DNSServer("127.0.5.1", 5353, zones)
    await server.start()            # or: with running_dns("127.0.5.1", 0, zones) as server: ...
    server.add_a("mx2.winview.test", "127.0.5.3")
    server.set_mode("broken.test", "servfail")   # or "timeout", or None to clear

Semantics (enough of RFC 1034 §4.3.2 for mail routing):

* a name in the table with records of the asked type → those records, AA set;
* a name in the table without that type → NOERROR with an empty answer (NODATA);
  a CNAME is followed inside the table;
* a name not in the table → NXDOMAIN (the table is the whole of this little internet);
* a name in "servfail" mode → SERVFAIL; in "timeout" mode → no answer at all.

Record values are presentation format (``"10 mx1.example.test"``, ``"127.0.0.1"``,
``"v=spf1 -all"``); relative names get the root appended. Names are case-insensitive.
The server binds UDP and TCP on the same port; port 0 picks a free one (see :attr:`port`).

Answers carry a TTL of 0 by default (RFC 1035 §3.2.1: use once, never cache), because the
table may change at any time and a resolver must see a change at once. ``ttl`` gives another;
``negative_ttl`` adds a SOA (TTL and MINIMUM both that value) to every NXDOMAIN and NODATA
answer, which makes them cacheable (RFC 2308 §5). Both are for tests of a resolver's cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import threading
from collections.abc import Iterator
from typing import Literal

log = logging.getLogger("serpentmail.sandbox.dns")

Mode = Literal["servfail", "timeout"]
Zones = dict[str, dict[str, list[str]]]


def _key(name: str) -> str:
    return name.strip().rstrip(".").lower()


def _absolute(value: str, rtype: str) -> str:
    """Make host names in MX/CNAME/NS values absolute; other types are left alone."""
    if rtype in ("MX",):
        pref, _, host = value.strip().partition(" ")
        host = host.strip()
        return f"{pref} {host if host.endswith('.') else host + '.'}"
    if rtype in ("CNAME", "NS"):
        v = value.strip()
        return v if v.endswith(".") else v + "."
    if rtype == "TXT" and not value.startswith('"'):
        # One character-string per 255 octets (RFC 1035 §3.3.14).
        parts = [value[i:i + 255] for i in range(0, len(value), 255)] or [""]
        return " ".join('"' + p.replace("\\", "\\\\").replace('"', '\\"') + '"' for p in parts)
    return value


class DNSServer:
    """An authoritative server for the names in ``zones`` (see the module docstring)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, zones: Zones | None = None, *,
                 ttl: int = 0, negative_ttl: int | None = None) -> None:
        self.host = host
        self.port = port
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.zones: Zones = {}
        for name, rrs in (zones or {}).items():
            for rtype, values in rrs.items():
                for v in values:
                    self.add(name, rtype, v)
        self.modes: dict[str, Mode] = {}
        self.queries: list[tuple[str, str]] = []  # (name, type) as received, for assertions
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.base_events.Server | None = None
        self._tcp_tasks: set[asyncio.Task[None]] = set()

    # --- the record table ------------------------------------------------------------

    def add(self, name: str, rtype: str, value: str) -> None:
        self.zones.setdefault(_key(name), {}).setdefault(rtype.upper(), []).append(value)

    def add_mx(self, domain: str, preference: int, host: str) -> None:
        self.add(domain, "MX", f"{preference} {host}")

    def add_null_mx(self, domain: str) -> None:
        """RFC 7505 §3: the single MX record "0 ." (replacing any other MX of the domain)."""
        self.zones.setdefault(_key(domain), {})["MX"] = ["0 ."]

    def add_a(self, host: str, ip: str) -> None:
        self.add(host, "A", ip)

    def add_aaaa(self, host: str, ip: str) -> None:
        self.add(host, "AAAA", ip)

    def add_txt(self, name: str, text: str) -> None:
        self.add(name, "TXT", text)

    def add_cname(self, name: str, target: str) -> None:
        self.add(name, "CNAME", target)

    def remove(self, name: str, rtype: str | None = None) -> None:
        """Forget a name (it becomes NXDOMAIN) or only its records of one type."""
        if rtype is None:
            self.zones.pop(_key(name), None)
        else:
            self.zones.get(_key(name), {}).pop(rtype.upper(), None)

    def set_mode(self, name: str, mode: Mode | None) -> None:
        """Make every query for ``name`` fail ("servfail") or go unanswered ("timeout")."""
        if mode is None:
            self.modes.pop(_key(name), None)
        elif mode in ("servfail", "timeout"):
            self.modes[_key(name)] = mode
        else:
            raise ValueError(f"unknown mode {mode!r}")

    # --- answering -------------------------------------------------------------------

    def answer(self, wire: bytes) -> bytes | None:
        """The response to one query message, or None to stay silent."""
        import dns.exception
        import dns.flags
        import dns.message
        import dns.name
        import dns.rcode
        import dns.rdataclass
        import dns.rdatatype
        import dns.rrset

        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        response.flags &= ~dns.flags.RA
        if len(query.question) != 1:
            response.set_rcode(dns.rcode.FORMERR)
            return bytes(response.to_wire())
        q = query.question[0]
        qname = _key(q.name.to_text())
        qtype = dns.rdatatype.to_text(q.rdtype)
        self.queries.append((qname, qtype))
        mode = self.modes.get(qname)
        if mode == "timeout":
            return None
        if mode == "servfail" or q.rdclass != dns.rdataclass.IN:
            response.set_rcode(dns.rcode.SERVFAIL if mode else dns.rcode.REFUSED)
            return bytes(response.to_wire())
        name = qname
        for _ in range(8):  # follow CNAMEs inside the table, bounded
            records = self.zones.get(name)
            if records is None:
                if name == qname:
                    response.set_rcode(dns.rcode.NXDOMAIN)
                break
            if qtype != "CNAME" and "CNAME" in records and qtype not in records:
                target = _absolute(records["CNAME"][0], "CNAME")
                response.answer.append(dns.rrset.from_text(name + ".", self.ttl, "IN", "CNAME", target))
                name = _key(target)
                continue
            values = records.get(qtype, [])
            if values:
                response.answer.append(dns.rrset.from_text_list(
                    name + ".", self.ttl, "IN", qtype, [_absolute(v, qtype) for v in values]))
            break
        if not response.answer and self.negative_ttl is not None:
            # RFC 2308 §3: the authority section of a negative answer holds the zone's SOA.
            n = self.negative_ttl
            response.authority.append(dns.rrset.from_text(
                "test.", n, "IN", "SOA", f"ns.test. hostmaster.test. 1 3600 600 86400 {n}"))
        wire_out = response.to_wire()
        return bytes(wire_out)

    # --- serving ---------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        server = self

        class _UDP(asyncio.DatagramProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = transport

            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                try:
                    out = server.answer(data)
                except Exception:
                    log.exception("dns answer failed")
                    return
                if out is not None:
                    if len(out) > 512:
                        out = server._truncated(data) or out
                    self.transport.sendto(out, addr)  # type: ignore[attr-defined]

        last_error: OSError | None = None
        for _ in range(20):  # port 0: UDP picks a port, TCP must get the same one
            transport, _proto = await loop.create_datagram_endpoint(_UDP, local_addr=(self.host, self.port))
            port = transport.get_extra_info("sockname")[1]
            try:
                self._tcp = await asyncio.start_server(self._serve_tcp, self.host, port)
            except OSError as exc:
                transport.close()
                last_error = exc
                if self.port:
                    raise
                continue
            self._udp = transport
            self.port = port
            return
        assert last_error is not None
        raise last_error

    def _truncated(self, query: bytes) -> bytes | None:
        """RFC 1035 §4.2.1: an answer too big for UDP is sent empty with TC set."""
        import dns.flags
        import dns.message

        try:
            response = dns.message.make_response(dns.message.from_wire(query))
        except Exception:
            return None
        response.flags |= dns.flags.AA | dns.flags.TC
        return bytes(response.to_wire())

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tcp_tasks.add(task)
        try:
            while True:
                # RFC 1035 §4.2.2: each message is prefixed with its two-octet length.
                head = await reader.readexactly(2)
                (length,) = struct.unpack("!H", head)
                out = self.answer(await reader.readexactly(length))
                if out is not None:
                    writer.write(struct.pack("!H", len(out)) + out)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            if task is not None:
                self._tcp_tasks.discard(task)

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            for t in list(self._tcp_tasks):
                t.cancel()
            await self._tcp.wait_closed()
            self._tcp = None

    @property
    def endpoint(self) -> str:
        """``host:port``, as ``[dns] nameservers`` takes it."""
        return f"{self.host}:{self.port}"


class DNSServerThread:
    """A :class:`DNSServer` on its own event loop in a daemon thread (for blocking tests)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, zones: Zones | None = None) -> None:
        self.server = DNSServer(host, port, zones)
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="sandbox-dns", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.server.start())
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self.server.stop())
        self.loop.close()

    def start(self) -> DNSServer:
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise self._error
        return self.server

    def stop(self) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)


@contextlib.contextmanager
def running_dns(host: str = "127.0.0.1", port: int = 0, zones: Zones | None = None) -> Iterator[DNSServer]:
    """Run a :class:`DNSServer` in a thread for the duration of a ``with`` block."""
    thread = DNSServerThread(host, port, zones)
    server = thread.start()
    try:
        yield server
    finally:
        thread.stop()

