"""Domains, users and aliases in SQLite (WAL mode).

Invariants:

* Addresses are stored lower-cased: the domain is case-insensitive (RFC 5321 §2.4) and, by the
  project's default, so is the local part. Lookups lower-case their input the same way.
* A user's mailbox directory is derived from the user's numeric id (``mail/<id>``), never from
  text a client sent.
* Every CLI change is a committed transaction, and a running server queries the database on
  each lookup, so changes take effect without a restart.
* Password hashes are argon2id; verification is a blocking call the server runs off the event
  loop (:meth:`AccountDB.password_hash` on the loop, :func:`verify_password` in a thread).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from ..proto.address import Address, AddressError, parse_mailbox

_SCHEMA = """
CREATE TABLE IF NOT EXISTS domains (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created REAL NOT NULL DEFAULT (CAST(strftime('%s','now') AS REAL))
);
CREATE TABLE IF NOT EXISTS users (
    id INTEGER PRIMARY KEY,
    address TEXT NOT NULL UNIQUE,
    domain_id INTEGER NOT NULL REFERENCES domains(id) ON DELETE CASCADE,
    password_hash TEXT NOT NULL,
    created REAL NOT NULL DEFAULT (CAST(strftime('%s','now') AS REAL))
);
CREATE TABLE IF NOT EXISTS aliases (
    id INTEGER PRIMARY KEY,
    address TEXT NOT NULL,
    target TEXT NOT NULL,
    domain_id INTEGER NOT NULL REFERENCES domains(id) ON DELETE CASCADE,
    UNIQUE(address, target)
);
CREATE INDEX IF NOT EXISTS aliases_address ON aliases(address);
"""

# Time cost tuned so one verification takes tens of milliseconds, not hundreds: the server
# runs them in a thread pool and brute force is throttled separately.
_HASHER = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1)
_DUMMY_HASH = _HASHER.hash("serpentmail-dummy-password")


class AccountError(ValueError):
    """A user-facing error: duplicate, unknown domain, bad address."""


@dataclass(frozen=True, slots=True)
class User:
    id: int
    address: str


@dataclass(frozen=True, slots=True)
class Alias:
    address: str
    targets: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Resolution:
    """Where mail for one address goes.

    ``local`` is False for a domain we do not serve. For a local domain, ``users`` are the
    local mailboxes and ``remote`` the non-local alias targets; both empty means unknown user.
    """

    local: bool
    users: tuple[User, ...] = ()
    remote: tuple[str, ...] = ()

    @property
    def exists(self) -> bool:
        return bool(self.users or self.remote)


def hash_password(password: str) -> str:
    return _HASHER.hash(password)


def verify_password(stored_hash: str | None, password: str) -> bool:
    """Check ``password`` against ``stored_hash`` (blocking: run off the event loop).

    With no hash (unknown user) a dummy hash is verified anyway, so the time taken does not
    reveal whether the account exists.
    """
    try:
        return _HASHER.verify(stored_hash or _DUMMY_HASH, password) and stored_hash is not None
    except (VerificationError, InvalidHashError):
        return False


def normalize_domain(name: str) -> str:
    name = name.strip().rstrip(".").lower()
    try:
        parse_mailbox(f"x@{name}")
    except AddressError as exc:
        raise AccountError(f"invalid domain name: {name!r}") from exc
    if name.startswith("["):
        raise AccountError(f"invalid domain name: {name!r}")
    return name


def normalize_address(text: str) -> str:
    """Lower-case and validate ``local@domain``; raise AccountError with a clear message."""
    text = text.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    try:
        addr = parse_mailbox(text)
    except AddressError as exc:
        raise AccountError(f"invalid address {text!r}: {exc}") from exc
    return addr.key


class AccountDB:
    """The accounts database. One instance per thread (sqlite3 connections are per thread)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._db.executescript(_SCHEMA)

    @property
    def _db(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=True)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
        return conn

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    # --- domains -------------------------------------------------------------------------

    def add_domain(self, name: str) -> str:
        name = normalize_domain(name)
        with self._tx() as db:
            try:
                db.execute("INSERT INTO domains(name) VALUES (?)", (name,))
            except sqlite3.IntegrityError as exc:
                raise AccountError(f"domain {name} already exists") from exc
        return name

    def ensure_domain(self, name: str) -> None:
        name = normalize_domain(name)
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO domains(name) VALUES (?)", (name,))

    def del_domain(self, name: str, *, force: bool = False) -> None:
        name = normalize_domain(name)
        with self._tx() as db:
            row = db.execute("SELECT id FROM domains WHERE name=?", (name,)).fetchone()
            if row is None:
                raise AccountError(f"no such domain: {name}")
            n = db.execute("SELECT count(*) FROM users WHERE domain_id=?", (row[0],)).fetchone()[0]
            if n and not force:
                raise AccountError(f"domain {name} still has {n} user(s); delete them first or use --force")
            db.execute("DELETE FROM domains WHERE id=?", (row[0],))

    def list_domains(self) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT name FROM domains ORDER BY name")]

    def is_local_domain(self, name: str) -> bool:
        row = self._db.execute("SELECT 1 FROM domains WHERE name=?", (name.lower().rstrip("."),)).fetchone()
        return row is not None

    def _domain_id(self, db: sqlite3.Connection, address: str) -> int:
        domain = address.rpartition("@")[2]
        row = db.execute("SELECT id FROM domains WHERE name=?", (domain,)).fetchone()
        if row is None:
            raise AccountError(f"unknown domain {domain!r}: add it first with 'serpentmail domain add {domain}'")
        return int(row[0])

    # --- users ---------------------------------------------------------------------------

    def add_user(self, address: str, password: str, *, password_hash: str | None = None) -> User:
        address = normalize_address(address)
        if not password and password_hash is None:
            raise AccountError("empty password")
        hashed = password_hash or hash_password(password)
        with self._tx() as db:
            domain_id = self._domain_id(db, address)
            try:
                cur = db.execute(
                    "INSERT INTO users(address, domain_id, password_hash) VALUES (?,?,?)",
                    (address, domain_id, hashed),
                )
            except sqlite3.IntegrityError as exc:
                raise AccountError(f"user {address} already exists") from exc
        return User(int(cur.lastrowid or 0), address)

    def del_user(self, address: str) -> User:
        address = normalize_address(address)
        with self._tx() as db:
            row = db.execute("SELECT id FROM users WHERE address=?", (address,)).fetchone()
            if row is None:
                raise AccountError(f"no such user: {address}")
            db.execute("DELETE FROM users WHERE id=?", (row[0],))
        return User(int(row[0]), address)

    def set_password(self, address: str, password: str) -> None:
        address = normalize_address(address)
        if not password:
            raise AccountError("empty password")
        hashed = hash_password(password)
        with self._tx() as db:
            cur = db.execute("UPDATE users SET password_hash=? WHERE address=?", (hashed, address))
            if cur.rowcount == 0:
                raise AccountError(f"no such user: {address}")

    def list_users(self, domain: str | None = None) -> list[User]:
        if domain:
            rows = self._db.execute(
                "SELECT u.id, u.address FROM users u JOIN domains d ON d.id=u.domain_id WHERE d.name=? ORDER BY u.address",
                (domain.lower(),),
            )
        else:
            rows = self._db.execute("SELECT id, address FROM users ORDER BY address")
        return [User(int(r[0]), r[1]) for r in rows]

    def get_user(self, address: str) -> User | None:
        row = self._db.execute("SELECT id, address FROM users WHERE address=?", (address.lower(),)).fetchone()
        return User(int(row[0]), row[1]) if row else None

    def password_hash(self, address: str) -> tuple[User | None, str | None]:
        """The user and stored hash for a login name (both None if there is no such user)."""
        row = self._db.execute(
            "SELECT id, address, password_hash FROM users WHERE address=?", (address.lower(),)
        ).fetchone()
        if row is None:
            return None, None
        return User(int(row[0]), row[1]), str(row[2])

    # --- aliases -------------------------------------------------------------------------

    def add_alias(self, alias: str, target: str) -> None:
        alias = alias.strip().lower()
        if alias.startswith("@"):  # catch-all for a domain
            normalize_domain(alias[1:])
        else:
            alias = normalize_address(alias)
        target = normalize_address(target)
        with self._tx() as db:
            domain_id = self._domain_id(db, alias)
            try:
                db.execute("INSERT INTO aliases(address, target, domain_id) VALUES (?,?,?)", (alias, target, domain_id))
            except sqlite3.IntegrityError as exc:
                raise AccountError(f"alias {alias} -> {target} already exists") from exc

    def del_alias(self, alias: str, target: str | None = None) -> None:
        alias = alias.strip().lower()
        with self._tx() as db:
            if target is None:
                cur = db.execute("DELETE FROM aliases WHERE address=?", (alias,))
            else:
                cur = db.execute("DELETE FROM aliases WHERE address=? AND target=?", (alias, normalize_address(target)))
            if cur.rowcount == 0:
                raise AccountError(f"no such alias: {alias}" + (f" -> {target}" if target else ""))

    def list_aliases(self) -> list[Alias]:
        out: dict[str, list[str]] = {}
        for addr, target in self._db.execute("SELECT address, target FROM aliases ORDER BY address, target"):
            out.setdefault(addr, []).append(target)
        return [Alias(a, tuple(t)) for a, t in out.items()]

    # --- resolution ----------------------------------------------------------------------

    def resolve(self, address: Address, *, depth: int = 0) -> Resolution:
        """Expand ``address`` into local users and remote targets (aliases followed 10 deep)."""
        key = address.key
        domain = address.domain.lower().rstrip(".")  # the catch-all key below is lower-case
        db = self._db
        # One statement for the common case (domain check and user lookup): each statement
        # outside a transaction takes and drops SQLite's file locks, and this runs per RCPT.
        row = db.execute("SELECT (SELECT 1 FROM domains WHERE name=?), (SELECT id FROM users WHERE address=?)",
                         (domain, key.lower())).fetchone()
        if row[0] is None:
            return Resolution(local=False)
        if row[1] is not None:
            return Resolution(True, (User(int(row[1]), key.lower()),))  # stored lower-cased
        targets = [r[0] for r in db.execute("SELECT target FROM aliases WHERE address=?", (key,))]
        if not targets:
            targets = [r[0] for r in db.execute("SELECT target FROM aliases WHERE address=?", ("@" + domain,))]
        users: dict[int, User] = {}
        remote: list[str] = []
        for target in targets:
            local, _, tdomain = target.rpartition("@")
            if depth < 10 and self.is_local_domain(tdomain):
                sub = self.resolve(Address(local, tdomain), depth=depth + 1)
                for u in sub.users:
                    users[u.id] = u
                remote.extend(r for r in sub.remote if r not in remote)
            elif not self.is_local_domain(tdomain) and target not in remote:
                remote.append(target)
        return Resolution(True, tuple(users.values()), tuple(remote))

    def may_send_as(self, user: User, key: str) -> bool:
        """Is ``key`` (an :attr:`Address.key`) in :meth:`addresses_of` ``user``?

        The same answer without scanning every alias: the user's own address costs no query;
        otherwise ``key`` must be an explicit alias (a catch-all never counts) that resolves
        to ``user``. This runs at every MAIL on submission.
        """
        if key == user.address:
            return True
        if key.startswith("@") or self._db.execute(
                "SELECT 1 FROM aliases WHERE address=? LIMIT 1", (key,)).fetchone() is None:
            return False
        local, _, domain = key.rpartition("@")
        return any(u.id == user.id for u in self.resolve(Address(local, domain)).users)

    def addresses_of(self, user: User) -> set[str]:
        """Every address that delivers to ``user``: its own and the aliases pointing at it."""
        out = {user.address}
        for (alias,) in self._db.execute("SELECT DISTINCT address FROM aliases WHERE address NOT LIKE '@%'"):
            local, _, domain = alias.rpartition("@")
            if alias not in out and any(u.id == user.id for u in self.resolve(Address(local, domain)).users):
                out.add(alias)
        return out
