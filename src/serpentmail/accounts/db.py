"""Domains, users and aliases in SQLite (WAL mode).

Invariants:

* Addresses are stored lower-cased: the domain is case-insensitive (RFC 5321 §2.4) and, by the
  project's default, so is the local part. Lookups lower-case their input the same way.
* A user's mailbox directory is derived from the user's numeric id (``mail/<id>``), never from
  text a client sent.
* Every CLI change is a committed transaction, and changes take effect in a running server
  without a restart. The server remembers its lookups (:meth:`AccountDB.resolve`,
  :meth:`AccountDB.may_send_as`, :meth:`AccountDB.password_hash`), each tagged with the
  change stamp it was made under: a file beside the database (``<db>-stamp``) whose
  modification time every write transaction sets to a new value, before it begins and after
  it commits. A lookup costs one ``stat`` of the stamp while nothing changes, and the first
  lookup after a change queries the database again. A change made around serpentmail (the
  ``sqlite3`` shell) takes effect once something touches the stamp (``touch <db>-stamp``).
* Password hashes are argon2id; verification is a blocking call the server runs off the event
  loop (:meth:`AccountDB.password_hash` on the loop, :func:`verify_password` in a thread).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from ..proto.address import Address, AddressError, parse_mailbox

# Remembered lookups per AccountDB: past this many, they are all dropped (a client trying
# random recipients must not grow the process without bound).
CACHE_MAX = 8192

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
        self._stamp = path.with_name(path.name + "-stamp")
        self._stamp_name = os.fspath(self._stamp)  # stat'd per RCPT: no Path conversion each time
        # key -> (the stamp's state when the answer was read, the answer). An entry is used
        # only while the stamp is unchanged, so threads sharing this object need no lock.
        self._cache: dict[tuple[str, str], tuple[tuple[int, int, int] | None, object]] = {}
        self._db.executescript(_SCHEMA)
        if not self._stamp.exists():
            # Created here, so a lookup's stat finds it (a missing stamp works, more slowly).
            with contextlib.suppress(OSError):
                os.close(os.open(self._stamp, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))

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
        # The stamp moves before the change (a server's lookup that reads the old data from
        # here on is tagged with a state that is about to end) and after the commit (so the
        # state such a lookup saw never comes back).
        self._bump()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        with contextlib.suppress(AccountError):  # committed: the first bump did work a moment ago
            self._bump()

    # --- the change stamp ------------------------------------------------------------------

    def _stamp_state(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self._stamp_name)
        except OSError:
            return None
        # The ctime too: the kernel sets it at each utime() and no caller can set it back.
        return st.st_mtime_ns, st.st_ctime_ns, st.st_ino

    def _bump(self) -> None:
        """Give the stamp a modification time it has not had (created if missing).

        Setting an explicit time needs the file's owner; another user who may write the
        database (and so its directory) puts a fresh file in its place instead, whose inode
        number is new. Failing both, nothing is changed: the caller's transaction has not
        begun (or has committed, and the first bump already told the servers)."""
        state = self._stamp_state()
        try:
            if state is None:
                os.close(os.open(self._stamp, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))
                state = self._stamp_state()
            t = max(time.time_ns(), (state[0] if state else 0) + 1)
            try:
                os.utime(self._stamp, ns=(t, t))
            except PermissionError:
                fresh = self._stamp.with_name(f"{self._stamp.name}.{os.getpid()}")
                os.close(os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644))
                os.replace(fresh, self._stamp)
        except OSError as exc:
            raise AccountError(f"cannot update {self._stamp} (running servers would not see the change): "
                               f"{exc.strerror or exc}") from exc

    def _cached(self, key: tuple[str, str]) -> tuple[tuple[int, int, int] | None, object | None]:
        """(the stamp's state now, the answer remembered under it or None)."""
        state = self._stamp_state()
        hit = self._cache.get(key)
        if hit is not None and hit[0] == state:
            return state, hit[1]
        return state, None

    def _remember(self, key: tuple[str, str], state: tuple[int, int, int] | None, answer: object) -> None:
        cache = self._cache
        if len(cache) >= CACHE_MAX:
            cache.clear()
        cache[key] = (state, answer)

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
        ckey = ("pw", address.lower())
        state, hit = self._cached(ckey)
        if hit is not None:
            return cast(tuple[User | None, str | None], hit)
        row = self._db.execute(
            "SELECT id, address, password_hash FROM users WHERE address=?", (ckey[1],)
        ).fetchone()
        answer: tuple[User | None, str | None] = (None, None) if row is None else (User(int(row[0]), row[1]), str(row[2]))
        self._remember(ckey, state, answer)
        return answer

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

    def resolve(self, address: Address) -> Resolution:
        """Expand ``address`` into local users and remote targets (aliases followed 10 deep).
        Runs per RCPT: answered from memory while the change stamp is unchanged."""
        ckey = ("rcpt", address.key)  # the whole address, lower-cased: all _resolve reads of it
        state, hit = self._cached(ckey)
        if hit is not None:
            return cast(Resolution, hit)
        answer = self._resolve(address, 0)
        self._remember(ckey, state, answer)
        return answer

    def _resolve(self, address: Address, depth: int) -> Resolution:
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
                sub = self._resolve(Address(local, tdomain), depth + 1)
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
        if key.startswith("@"):
            return False
        ckey = ("send", f"{user.id}:{key}")
        state, hit = self._cached(ckey)
        if hit is not None:
            return hit is True
        if self._db.execute("SELECT 1 FROM aliases WHERE address=? LIMIT 1", (key,)).fetchone() is None:
            ok = False
        else:
            local, _, domain = key.rpartition("@")
            ok = any(u.id == user.id for u in self._resolve(Address(local, domain), 0).users)
        self._remember(ckey, state, ok)
        return ok

    def addresses_of(self, user: User) -> set[str]:
        """Every address that delivers to ``user``: its own and the aliases pointing at it."""
        out = {user.address}
        for (alias,) in self._db.execute("SELECT DISTINCT address FROM aliases WHERE address NOT LIKE '@%'"):
            local, _, domain = alias.rpartition("@")
            if alias not in out and any(u.id == user.id for u in self._resolve(Address(local, domain), 0).users):
                out.add(alias)
        return out
