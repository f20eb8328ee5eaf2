"""Typed configuration loaded from TOML.

Every key has a default. An unknown key or a bad value raises :class:`ConfigError` whose text
names the key, the file and the line, so the CLI can print it instead of a traceback.
With no file at all, :func:`embedded_default` gives a self-contained setup: data in
``./serpentmail-data``, the domain ``localhost`` and listeners on 127.0.0.1 high ports.
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .proto.smtp_server import SessionLimits


class ConfigError(ValueError):
    """A configuration problem, with a message fit for a person."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Listener:
    listen: tuple[Endpoint, ...]


@dataclass(frozen=True, slots=True)
class TLSConfig:
    cert: Path | None = None
    key: Path | None = None


@dataclass(frozen=True, slots=True)
class DNSConfig:
    nameservers: tuple[Endpoint, ...] = ()  # empty: the system resolver
    timeout: float = 5.0
    cache_max_ttl: float = 3600.0  # answers are kept for their TTL, at most this long; 0: no cache


@dataclass(frozen=True, slots=True)
class DeliveryConfig:
    port: int = 25
    retry_schedule: tuple[float, ...] = (60.0, 300.0, 900.0, 1800.0, 3600.0)
    max_lifetime: float = 5 * 86400.0
    delay_warning: float = 0.0  # 0: no delay warnings
    max_concurrency: int = 50
    max_per_domain: int = 10
    max_mx_attempts: int = 5
    connect_timeout: float = 30.0
    relay: Endpoint | None = None
    relay_username: str = ""
    relay_password: str = ""
    relay_tls: str = "starttls"
    tls_verify_domains: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_message_size: int = 25_000_000  # "25MB", as the config documents it
    max_recipients: int = 100
    max_line_length: int = 2048
    max_errors: int = 20
    max_hops: int = 50
    idle_timeout: float = 300.0
    pop3_idle_timeout: float = 600.0  # RFC 1939 §3: at least 10 minutes
    max_connections: int = 1000
    max_connections_per_ip: int = 50
    auth_failure_delay: float = 1.5
    auth_max_failures: int = 5  # per IP or account, within auth_failure_window
    auth_failure_window: float = 300.0
    auth_cooldown: float = 300.0
    # A successful login is remembered this long (0 = never): the same password for the same
    # stored hash is then checked by a keyed SHA-256, not argon2 (server/context.py).
    auth_cache_ttl: float = 300.0
    submission_max_recipients: int = 50  # per message, for authenticated users
    submission_max_messages_per_hour: int = 200

    def session_limits(self) -> SessionLimits:
        return SessionLimits(
            max_message_size=self.max_message_size,
            max_recipients=self.max_recipients,
            max_line_length=self.max_line_length,
            max_errors=self.max_errors,
            max_hops=self.max_hops,
        )


@dataclass(frozen=True, slots=True)
class LogConfig:
    format: str = "plain"  # or "json"
    level: str = "info"
    file: Path | None = None  # default: stderr


@dataclass(frozen=True, slots=True)
class Config:
    hostname: str
    data_dir: Path
    smtp: Listener
    submission: Listener
    submissions: Listener
    pop3: Listener
    pop3s: Listener
    tls: TLSConfig = field(default_factory=TLSConfig)
    dns: DNSConfig = field(default_factory=DNSConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    user: str = ""  # drop privileges to this user after binding (when run as root)
    # Server processes sharing the listeners (see server/workers.py); 1 = one process.
    workers: int = 1
    # Local deliveries, and the queue items of the scheduler's process, made durable through the
    # delivery journal (storage/journal.py): one flush before the 250 instead of two or more.
    # False: the plain fsync recipe for every file.
    journal: bool = True
    default_domains: tuple[str, ...] = ()  # domains created at start (embedded default: localhost)
    source: Path | None = None

    @property
    def db_path(self) -> Path:
        return self.data_dir / "accounts.sqlite3"

    def with_data_dir(self, path: Path) -> Config:
        return replace(self, data_dir=path)


# --- parsing helpers -------------------------------------------------------------------------

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
               "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4, "tb": 1000**4, "tib": 1024**4}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "": 1, "m": 60, "h": 3600, "d": 86400}


def parse_size(value: object) -> int:
    if isinstance(value, bool):
        raise ValueError("expected a size like 25MB")
    if isinstance(value, int) and value >= 0:
        return value
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m:
            unit = (m.group(2) or "").lower()
            if unit in _SIZE_UNITS:
                return int(float(m.group(1)) * _SIZE_UNITS[unit])
    raise ValueError(f"expected a size like 25MB, got {value!r}")


def parse_duration(value: object) -> float:
    if isinstance(value, bool):
        raise ValueError("expected a duration like 5m")
    if isinstance(value, int | float) and value >= 0:
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return float(m.group(1)) * _DURATION_UNITS[m.group(2) or ""]
    raise ValueError(f"expected a duration like 30s, 5m, 2h or 5d, got {value!r}")


MAX_WORKERS = 64


def parse_workers(value: object) -> int:
    """``workers = 4`` or ``workers = "auto"`` (one per CPU the process may run on)."""
    if value == "auto":
        try:
            return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))
        except (AttributeError, OSError):
            return max(1, min(MAX_WORKERS, os.cpu_count() or 1))
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError('expected a number of processes (1, 2, ...) or "auto"')
    if not 1 <= value <= MAX_WORKERS:
        raise ValueError(f"must be between 1 and {MAX_WORKERS}")
    return value


def parse_endpoint(value: object, default_port: int | None = None) -> Endpoint:
    if not isinstance(value, str):
        raise ValueError(f"expected \"host:port\", got {value!r}")
    text = value.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            if text.endswith("]") and default_port is not None:
                return Endpoint(text[1:-1], default_port)
            raise ValueError(f"expected \"[v6addr]:port\", got {value!r}")
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    elif default_port is not None and ":" not in text:
        host, port = text, str(default_port)
    else:
        raise ValueError(f"expected \"host:port\", got {value!r}")
    if not port.isdigit() or not 0 <= int(port) <= 65535 or not host:
        raise ValueError(f"bad port or host in {value!r}")
    return Endpoint(host, int(port))


def _int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"expected a non-negative integer, got {value!r}")
    return value


def _port(value: object) -> int:
    port = _int(value)
    if port > 65535:
        raise ValueError(f"expected a port number (0-65535), got {value!r}")
    return port


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def _choice(*choices: str) -> Any:
    def check(value: object) -> str:
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {value!r}")
        return str(value)

    return check


def _list(item: Any) -> Any:
    def check(value: object) -> tuple[Any, ...]:
        if not isinstance(value, list):
            raise ValueError(f"expected a list, got {value!r}")
        return tuple(item(v) for v in value)

    return check


def _path(value: object) -> Path:
    return Path(_str(value)).expanduser()


_SECTIONS: dict[str, dict[str, Any]] = {
    "tls": {"cert": _path, "key": _path},
    "dns": {"nameservers": _list(lambda v: parse_endpoint(v, 53)), "timeout": parse_duration,
            "cache_max_ttl": parse_duration},
    "delivery": {
        "port": _port,
        "retry_schedule": _list(parse_duration),
        "max_lifetime": parse_duration,
        "delay_warning": parse_duration,
        "max_concurrency": _int,
        "max_per_domain": _int,
        "max_mx_attempts": _int,
        "connect_timeout": parse_duration,
        "relay": lambda v: parse_endpoint(v, 25),
        "relay_username": _str,
        "relay_password": _str,
        "relay_tls": _choice("starttls", "tls", "none"),
        "tls_verify_domains": _list(_str),
    },
    "limits": {
        "max_message_size": parse_size,
        "max_recipients": _int,
        "max_line_length": _int,
        "max_errors": _int,
        "max_hops": _int,
        "idle_timeout": parse_duration,
        "pop3_idle_timeout": parse_duration,
        "max_connections": _int,
        "max_connections_per_ip": _int,
        "auth_failure_delay": parse_duration,
        "auth_max_failures": _int,
        "auth_failure_window": parse_duration,
        "auth_cooldown": parse_duration,
        "auth_cache_ttl": parse_duration,
        "submission_max_recipients": _int,
        "submission_max_messages_per_hour": _int,
    },
    "log": {"format": _choice("plain", "json"), "level": _choice("debug", "info", "warning", "error"), "file": _path},
}
_LISTENERS = ("smtp", "submission", "submissions", "pop3", "pop3s")
_DEFAULT_PORTS = {"smtp": 25, "submission": 587, "submissions": 465, "pop3": 110, "pop3s": 995}
EMBEDDED_PORTS = {"smtp": 2525, "submission": 2587, "submissions": 2465, "pop3": 2110, "pop3s": 2995}
_SECTION_TYPES = {"tls": TLSConfig, "dns": DNSConfig, "delivery": DeliveryConfig, "limits": LimitsConfig, "log": LogConfig}


def _line_of(text: str, section: str | None, key: str) -> int | None:
    """Best-effort line number of ``key`` (inside ``[section]``) in the TOML text."""
    current: str | None = None
    header = re.compile(r"^\s*\[\s*([A-Za-z0-9_.\-]+)\s*\]")
    keyline = re.compile(rf"^\s*{re.escape(key)}\s*=")
    for n, line in enumerate(text.splitlines(), 1):
        m = header.match(line)
        if m:
            current = m.group(1)
            if (section is None or current == section) and key == current:
                return n  # the [table] header itself (an unknown or mistyped section)
            continue
        if current == section and keyline.match(line):
            return n
        # inline tables: [smtp] listen can also be written smtp = { listen = [...] }
        if section is not None and current is None and re.match(rf"^\s*{re.escape(section)}\s*=.*\b{re.escape(key)}\b", line):
            return n
    return None


def machine_fqdn() -> str:
    name = socket.getfqdn()
    return name if name and name != "localhost.localdomain" else socket.gethostname() or "localhost"


def embedded_default(data_dir: Path | None = None) -> Config:
    """The configuration used when no config file exists."""
    def listener(name: str) -> Listener:
        return Listener((Endpoint("127.0.0.1", EMBEDDED_PORTS[name]),))

    return Config(
        hostname="localhost",
        data_dir=(data_dir or Path("serpentmail-data")).absolute(),
        smtp=listener("smtp"),
        submission=listener("submission"),
        submissions=listener("submissions"),
        pop3=listener("pop3"),
        pop3s=listener("pop3s"),
        delivery=DeliveryConfig(port=25),
        default_domains=("localhost",),
    )


def load(path: Path) -> Config:
    """Load and validate a TOML config file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from exc
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    return from_dict(raw, path=path, text=text)


def from_dict(raw: dict[str, Any], *, path: Path | None = None, text: str = "") -> Config:
    where = str(path) if path else "<config>"

    def fail(section: str | None, key: str, msg: str) -> ConfigError:
        line = _line_of(text, section, key) if text else None
        full = f"{section}.{key}" if section else key
        loc = f"{where}:{line}" if line else where
        return ConfigError(f"{loc}: key '{full}': {msg}")

    hostname = machine_fqdn()
    data_dir = Path("/var/lib/serpentmail")
    user = ""
    workers = 1
    journal = True
    default_domains: tuple[str, ...] = ()
    listeners: dict[str, Listener] = {
        name: Listener((Endpoint("0.0.0.0", port),)) for name, port in _DEFAULT_PORTS.items()
    }
    sections: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            if key == "hostname":
                hostname = _str(value).strip().rstrip(".").lower()
                if not hostname:
                    raise ValueError("must not be empty")
            elif key == "data_dir":
                data_dir = _path(value)
                if path is not None and not data_dir.is_absolute():
                    data_dir = (path.parent / data_dir)
                data_dir = data_dir.absolute()
            elif key == "user":
                user = _str(value)
            elif key == "workers":
                workers = parse_workers(value)
            elif key == "journal":
                journal = _bool(value)
            elif key == "domains":
                default_domains = _list(_str)(value)
            elif key in _LISTENERS:
                if not isinstance(value, dict):
                    raise ValueError("expected a table like [" + key + "] listen = [\"127.0.0.1:25\"]")
                for sub in value:
                    if sub != "listen":
                        raise fail(key, sub, "unknown key")
                try:
                    eps = _list(parse_endpoint)(value.get("listen", []))
                except ValueError as exc:
                    raise fail(key, "listen", str(exc)) from exc
                listeners[key] = Listener(eps)
            elif key in _SECTIONS:
                if not isinstance(value, dict):
                    raise ValueError(f"expected a table [{key}]")
                spec = _SECTIONS[key]
                kwargs: dict[str, Any] = {}
                for sub, subval in value.items():
                    if sub not in spec:
                        raise fail(key, sub, "unknown key")
                    try:
                        kwargs[sub] = spec[sub](subval)
                    except ValueError as exc:
                        raise fail(key, sub, str(exc)) from exc
                sections[key] = _SECTION_TYPES[key](**kwargs)
            else:
                raise fail(None, key, "unknown key")
        except ConfigError:
            raise
        except ValueError as exc:
            raise fail(None, key, str(exc)) from exc
    tls = sections.get("tls", TLSConfig())
    if (tls.cert is None) != (tls.key is None):
        raise fail("tls", "cert" if tls.cert is None else "key", "tls.cert and tls.key must be given together")
    return Config(
        hostname=hostname,
        data_dir=data_dir,
        smtp=listeners["smtp"],
        submission=listeners["submission"],
        submissions=listeners["submissions"],
        pop3=listeners["pop3"],
        pop3s=listeners["pop3s"],
        tls=tls,
        workers=workers,
        journal=journal,
        dns=sections.get("dns", DNSConfig()),
        delivery=sections.get("delivery", DeliveryConfig()),
        limits=sections.get("limits", LimitsConfig()),
        log=sections.get("log", LogConfig()),
        user=user,
        default_domains=default_domains,
        source=path,
    )


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """A JSON-able view of the effective configuration (for ``config show``)."""
    def conv(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, Endpoint):
            return str(value)
        if isinstance(value, tuple):
            return [conv(v) for v in value]
        if isinstance(value, Listener):
            return {"listen": conv(value.listen)}
        if hasattr(value, "__dataclass_fields__"):
            return {f.name: conv(getattr(value, f.name)) for f in fields(value)}
        return value

    out = conv(cfg)
    assert isinstance(out, dict)
    out.pop("source", None)
    return out
