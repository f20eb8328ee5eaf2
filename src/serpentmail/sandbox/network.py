"""The internet in a box: an authoritative DNS server and one serpentmail instance per domain.

Each domain of a :class:`SandboxSpec` becomes a full serpentmail :class:`Server` with its own
data directory, its own 127.x address(es), its own MX, submission and POP3 listeners, and a
resolver pointed at the sandbox DNS. The DNS publishes an MX record per exchanger (preference
10, 20, ...) and an A record per exchanger address, so mail between sandbox domains travels as
on the internet: MX lookup, SMTP to the exchanger's delivery port, POP3 to read it.

Address plan (``base`` defaults to 127.10): the DNS server on ``<base>.0.1``; domain number
``i`` (1-based) has exchanger ``k`` on ``<base>.<i>.<k>``. An exchanger marked down is published
in DNS but nothing listens there, which is how the demo shows MX fallback.

All instances run in one process and one event loop (the sandbox supervisor), so stopping the
sandbox stops everything and leaves no process behind.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..accounts.db import AccountDB, AccountError, normalize_domain
from ..config import (
    Config,
    DeliveryConfig,
    DNSConfig,
    Endpoint,
    LimitsConfig,
    Listener,
    embedded_default,
)
from ..server.run import Server, StartupError
from .dns import DNSServer


class SandboxError(RuntimeError):
    """A clear, user-facing reason the sandbox cannot start."""


@dataclass
class DomainSpec:
    name: str
    mx_count: int = 1
    users: dict[str, str] = field(default_factory=dict)  # address -> password
    down: set[int] = field(default_factory=set)  # exchanger numbers (1-based) not listening


@dataclass
class SandboxSpec:
    domains: list[DomainSpec]
    base: str = "127.10"
    # 25/587/465/110/995 when run as root (as on the internet), high ports otherwise.
    privileged: bool = field(default_factory=lambda: os.geteuid() == 0)
    dns_port: int | None = None
    retry_schedule: tuple[float, ...] = (5.0, 10.0, 30.0, 60.0)

    def ports(self) -> dict[str, int]:
        if self.privileged:
            return {"smtp": 25, "submission": 587, "submissions": 465, "pop3": 110, "pop3s": 995, "dns": 53}
        return {"smtp": 2525, "submission": 2587, "submissions": 2465, "pop3": 2110, "pop3s": 2995, "dns": 5353}


_DOMAIN_ARG = re.compile(r"^(?P<name>[^:]+)(?::(?P<mx>\d+)mx)?$")


def parse_domain_arg(text: str) -> DomainSpec:
    """``yahoo.test`` or ``winview.test:2mx``."""
    m = _DOMAIN_ARG.match(text.strip())
    if not m:
        raise SandboxError(f"bad --domain {text!r}: expected NAME or NAME:<n>mx (e.g. winview.test:2mx)")
    try:
        name = normalize_domain(m.group("name"))
    except AccountError as exc:
        raise SandboxError(str(exc)) from exc
    mx = int(m.group("mx") or 1)
    if not 1 <= mx <= 9:
        raise SandboxError(f"bad --domain {text!r}: between 1 and 9 exchangers")
    return DomainSpec(name, mx)


def build_spec(domains: list[str], users: list[str], down: list[str] | None = None, config: Path | None = None) -> SandboxSpec:
    """A spec from CLI flags and/or a TOML file (``[[domain]] name, mx, users, down``)."""
    specs: dict[str, DomainSpec] = {}
    if config is not None:
        try:
            raw = tomllib.loads(config.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise SandboxError(f"{config}: {exc}") from exc
        for i, d in enumerate(raw.get("domain", [])):
            if not isinstance(d, dict) or "name" not in d:
                raise SandboxError(f"{config}: [[domain]] #{i + 1} needs a name")
            spec = parse_domain_arg(f"{d['name']}:{int(d.get('mx', 1))}mx")
            spec.down = {int(x) for x in d.get("down", [])}
            specs[spec.name] = spec
            for u in d.get("users", []):
                _add_user_arg(specs, str(u))
    for d in domains:
        spec = parse_domain_arg(d)
        specs.setdefault(spec.name, spec).mx_count = spec.mx_count
    for u in users:
        _add_user_arg(specs, u)
    for item in down or []:
        host = item.strip().lower()
        m = re.match(r"^mx(\d+)\.(.+)$", host)
        if not m or m.group(2) not in specs:
            raise SandboxError(f"bad --down {item!r}: expected mx<k>.<sandbox domain>")
        specs[m.group(2)].down.add(int(m.group(1)))
    if not specs:
        raise SandboxError("no domains: give --domain NAME (repeatable) or a config file")
    return SandboxSpec(list(specs.values()))


def _add_user_arg(specs: dict[str, DomainSpec], text: str) -> None:
    address, sep, password = text.partition(":")
    address = address.strip().lower()
    if not sep or not password or "@" not in address:
        raise SandboxError(f"bad --user {text!r}: expected ADDRESS:PASSWORD")
    domain = address.rpartition("@")[2]
    if domain not in specs:
        specs[domain] = DomainSpec(domain)
    specs[domain].users[address] = password


@dataclass
class Instance:
    domain: DomainSpec
    config: Config
    server: Server
    exchangers: list[tuple[str, str, int, bool]]  # (name, address, preference, up)

    @property
    def address(self) -> str:
        return next(a for _, a, _, up in self.exchangers if up)


class Sandbox:
    """Start/stop the DNS server and every domain's serpentmail instance."""

    def __init__(self, spec: SandboxSpec, root: Path) -> None:
        self.spec = spec
        self.root = root
        self.dns: DNSServer | None = None
        self.instances: list[Instance] = []

    @property
    def dns_endpoint(self) -> Endpoint:
        return Endpoint(f"{self.spec.base}.0.1", self.spec.dns_port or self.spec.ports()["dns"])

    def _instance_config(self, index: int, domain: DomainSpec) -> tuple[Config, list[tuple[str, str, int, bool]]]:
        ports = self.spec.ports()
        exchangers = [
            (f"mx{k}.{domain.name}", f"{self.spec.base}.{index}.{k}", 10 * k, k not in domain.down)
            for k in range(1, domain.mx_count + 1)
        ]
        up = [addr for _, addr, _, is_up in exchangers if is_up]
        if not up:
            raise SandboxError(f"{domain.name}: every exchanger is down; at least one must listen")
        first = up[0]
        base = embedded_default(self.root / domain.name)

        def listen(kind: str, addrs: list[str]) -> Listener:
            return Listener(tuple(Endpoint(a, ports[kind]) for a in addrs))

        cfg = replace(
            base,
            hostname=next(n for n, _, _, is_up in exchangers if is_up),
            smtp=listen("smtp", up),
            submission=listen("submission", [first]),
            submissions=listen("submissions", [first]),
            pop3=listen("pop3", [first]),
            pop3s=listen("pop3s", [first]),
            dns=DNSConfig(nameservers=(self.dns_endpoint,), timeout=2.0),
            delivery=DeliveryConfig(port=ports["smtp"], retry_schedule=self.spec.retry_schedule,
                                    max_lifetime=3600.0, connect_timeout=3.0),
            limits=LimitsConfig(auth_failure_delay=0.3),
            default_domains=(domain.name,),
        )
        return cfg, exchangers

    def _publish(self, dns: DNSServer, instance_exchangers: list[tuple[str, str, int, bool]], domain: str) -> None:
        for name, addr, pref, _ in instance_exchangers:
            dns.add_mx(domain, pref, name)
            dns.add_a(name, addr)

    def _accounts(self, cfg: Config, domain: DomainSpec) -> None:
        db = AccountDB(cfg.db_path)
        try:
            db.ensure_domain(domain.name)
            existing = {u.address for u in db.list_users()}
            for address, password in domain.users.items():
                if address in existing:
                    db.set_password(address, password)
                else:
                    db.add_user(address, password)
            if domain.users and not any(a.address == f"postmaster@{domain.name}" for a in db.list_aliases()):
                db.add_alias(f"postmaster@{domain.name}", next(iter(domain.users)))
        finally:
            db.close()

    async def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        ep = self.dns_endpoint
        dns = DNSServer(ep.host, ep.port, {})
        try:
            await dns.start()
        except OSError as exc:
            raise SandboxError(f"cannot start the sandbox DNS on {ep}: {exc.strerror or exc}") from exc
        self.dns = dns
        try:
            for i, domain in enumerate(self.spec.domains, 1):
                cfg, exchangers = self._instance_config(i, domain)
                self._publish(dns, exchangers, domain.name)
                self._accounts(cfg, domain)
                server = Server(cfg)
                try:
                    await server.start()
                except StartupError as exc:
                    raise SandboxError(f"{domain.name}: {exc}") from exc
                self.instances.append(Instance(domain, cfg, server, exchangers))
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        for inst in reversed(self.instances):
            await inst.server.stop(grace=5)
        self.instances.clear()
        if self.dns is not None:
            await self.dns.stop()
            self.dns = None

    def instance(self, domain: str) -> Instance:
        for inst in self.instances:
            if inst.domain.name == domain:
                return inst
        raise KeyError(domain)

    def describe(self) -> dict[str, Any]:
        """A JSON-able description: endpoints, users and passwords (written to state.json)."""
        return {
            "dns": str(self.dns_endpoint),
            "domains": [
                {
                    "domain": inst.domain.name,
                    "data_dir": str(inst.config.data_dir),
                    "exchangers": [{"name": n, "address": a, "preference": p, "up": up} for n, a, p, up in inst.exchangers],
                    "smtp": [str(e) for e in inst.config.smtp.listen],
                    "submission": [str(e) for e in inst.config.submission.listen],
                    "submissions": [str(e) for e in inst.config.submissions.listen],
                    "pop3": [str(e) for e in inst.config.pop3.listen],
                    "pop3s": [str(e) for e in inst.config.pop3s.listen],
                    "users": dict(inst.domain.users),
                }
                for inst in self.instances
            ],
        }
