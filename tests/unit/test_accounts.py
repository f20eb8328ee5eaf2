"""The SQLite accounts database: domains, users, aliases, catch-all, resolution."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from serpentmail.accounts.db import AccountDB, AccountError, verify_password
from serpentmail.proto.address import Address, parse_mailbox


@pytest.fixture
def db(tmp_path: Path) -> AccountDB:
    d = AccountDB(tmp_path / "accounts.sqlite3")
    d.add_domain("winview.test")
    d.add_domain("other.test")
    return d


def addr(text: str) -> Address:
    return parse_mailbox(text)


def test_wal_mode(db: AccountDB, tmp_path: Path) -> None:
    mode = sqlite3.connect(tmp_path / "accounts.sqlite3").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_domains_case_insensitive_and_duplicates(db: AccountDB) -> None:
    assert db.add_domain("Example.TEST.") == "example.test"
    with pytest.raises(AccountError, match="already exists"):
        db.add_domain("EXAMPLE.test")
    assert db.is_local_domain("EXAMPLE.TEST")
    assert db.list_domains() == ["example.test", "other.test", "winview.test"]
    db.del_domain("example.test")
    with pytest.raises(AccountError, match="no such domain"):
        db.del_domain("example.test")


@pytest.mark.parametrize("bad", ["", "no spaces.test x", "-x.test", "a..b", "[127.0.0.1]", "x@y"])
def test_bad_domains(db: AccountDB, bad: str) -> None:
    with pytest.raises(AccountError):
        db.add_domain(bad)


def test_users_case_insensitive_and_duplicates(db: AccountDB) -> None:
    u = db.add_user("Bill@WinView.Test", "secret")
    assert u.address == "bill@winview.test"
    with pytest.raises(AccountError, match="already exists"):
        db.add_user("BILL@winview.test", "x")
    assert db.resolve(addr("BILL@WINVIEW.TEST")).users == (u,)
    user, stored = db.password_hash("Bill@winview.test")
    assert user == u and verify_password(stored, "secret") and not verify_password(stored, "Secret")
    assert not verify_password(None, "secret")


@pytest.mark.parametrize("bad", ["bill", "bill@", "@winview.test", "bi ll@winview.test", "a@b@winview.test"])
def test_bad_user_addresses(db: AccountDB, bad: str) -> None:
    with pytest.raises(AccountError, match="invalid address"):
        db.add_user(bad, "secret")


def test_user_in_unknown_domain(db: AccountDB) -> None:
    with pytest.raises(AccountError, match="unknown domain"):
        db.add_user("bill@nowhere.test", "secret")
    with pytest.raises(AccountError, match="unknown domain"):
        db.add_alias("x@nowhere.test", "bill@winview.test")


def test_empty_password(db: AccountDB) -> None:
    with pytest.raises(AccountError):
        db.add_user("bill@winview.test", "")


def test_del_domain_with_users_needs_force(db: AccountDB) -> None:
    db.add_user("bill@winview.test", "secret")
    db.add_alias("info@winview.test", "bill@winview.test")
    with pytest.raises(AccountError, match="still has 1 user"):
        db.del_domain("winview.test")
    db.del_domain("winview.test", force=True)
    assert db.list_users() == []
    assert db.list_aliases() == []


def test_resolution_kinds(db: AccountDB) -> None:
    bill = db.add_user("bill@winview.test", "secret")
    assert db.resolve(addr("bill@winview.test")).users == (bill,)
    unknown = db.resolve(addr("nobody@winview.test"))
    assert unknown.local and not unknown.exists
    foreign = db.resolve(addr("bill@elsewhere.test"))
    assert not foreign.local and not foreign.exists
    # address tricks are just unknown local parts
    for trick in ("bill%elsewhere.test@winview.test", "elsewhere.test!bill@winview.test", '"bill@elsewhere.test"@winview.test'):
        res = db.resolve(addr(trick))
        assert res.local and not res.exists, trick


def test_alias_chain_and_multiple_targets(db: AccountDB) -> None:
    bill = db.add_user("bill@winview.test", "secret")
    ann = db.add_user("ann@other.test", "secret")
    db.add_alias("sales@winview.test", "team@winview.test")
    db.add_alias("team@winview.test", "bill@winview.test")
    db.add_alias("team@winview.test", "ANN@other.test")
    res = db.resolve(addr("Sales@WinView.test"))
    assert set(res.users) == {bill, ann}
    assert res.remote == ()
    with pytest.raises(AccountError, match="already exists"):
        db.add_alias("team@winview.test", "bill@winview.test")
    assert [(a.address, a.targets) for a in db.list_aliases()] == [
        ("sales@winview.test", ("team@winview.test",)),
        ("team@winview.test", ("ann@other.test", "bill@winview.test")),
    ]
    db.del_alias("team@winview.test", "ann@other.test")
    assert db.resolve(addr("sales@winview.test")).users == (bill,)
    with pytest.raises(AccountError, match="no such alias"):
        db.del_alias("nope@winview.test")


def test_remote_targets(db: AccountDB) -> None:
    bill = db.add_user("bill@winview.test", "secret")
    db.add_alias("fwd@winview.test", "someone@remote.test")
    db.add_alias("fwd@winview.test", "bill@winview.test")
    db.add_alias("fwd2@winview.test", "fwd@winview.test")
    res = db.resolve(addr("fwd2@winview.test"))
    assert res.users == (bill,)
    assert res.remote == ("someone@remote.test",)


def test_catch_all(db: AccountDB) -> None:
    bill = db.add_user("bill@winview.test", "secret")
    ann = db.add_user("ann@winview.test", "secret")
    db.add_alias("@WinView.test", "bill@winview.test")
    db.add_alias("info@winview.test", "ann@winview.test")
    assert db.resolve(addr("anything@winview.test")).users == (bill,)
    assert db.resolve(addr("ANN@winview.test")).users == (ann,)  # a real user wins
    assert db.resolve(addr("info@winview.test")).users == (ann,)  # an explicit alias wins
    assert not db.resolve(addr("anything@other.test")).exists  # only that domain
    assert db.resolve(Address("Anything", "WinView.Test")).users == (bill,)


def test_alias_loop_terminates(db: AccountDB) -> None:
    db.add_alias("a@winview.test", "b@winview.test")
    db.add_alias("b@winview.test", "a@winview.test")
    res = db.resolve(addr("a@winview.test"))
    assert res.local and not res.exists


def test_addresses_of(db: AccountDB) -> None:
    bill = db.add_user("bill@winview.test", "secret")
    db.add_alias("info@winview.test", "bill@winview.test")
    db.add_alias("@other.test", "bill@winview.test")
    assert db.addresses_of(bill) == {"bill@winview.test", "info@winview.test"}


def test_may_send_as_agrees_with_addresses_of(db: AccountDB) -> None:
    bill = db.add_user("bill@winview.test", "secret")
    ann = db.add_user("ann@winview.test", "secret")
    db.add_alias("info@winview.test", "bill@winview.test")
    db.add_alias("chain@winview.test", "info@winview.test")  # alias of an alias
    db.add_alias("both@winview.test", "ann@winview.test")
    db.add_alias("both@winview.test", "bill@winview.test")
    db.add_alias("out@winview.test", "someone@remote.test")
    db.add_alias("@other.test", "bill@winview.test")  # a catch-all never counts
    db.add_alias("via-catchall@winview.test", "nobody@other.test")
    db.add_alias("ann@winview.test", "bill@winview.test")  # the user wins over the alias
    candidates = ["bill@winview.test", "ann@winview.test", "info@winview.test", "chain@winview.test",
                  "both@winview.test", "out@winview.test", "x@other.test", "@other.test",
                  "via-catchall@winview.test", "nobody@winview.test", "bill@winview.test."]
    for user in (bill, ann):
        owned = db.addresses_of(user)
        assert {c for c in candidates if db.may_send_as(user, c)} == owned & set(candidates)
    assert db.addresses_of(bill) == {"bill@winview.test", "info@winview.test", "chain@winview.test",
                                     "both@winview.test", "via-catchall@winview.test"}
    db.del_alias("info@winview.test")  # takes effect at once (the change stamp moved)
    assert not db.may_send_as(bill, "info@winview.test")


def test_changes_visible_to_another_connection(db: AccountDB, tmp_path: Path) -> None:
    other = AccountDB(tmp_path / "accounts.sqlite3")
    assert not other.resolve(addr("new@winview.test")).exists
    db.add_user("new@winview.test", "secret")
    assert other.resolve(addr("new@winview.test")).exists
    db.del_user("new@winview.test")
    assert not other.resolve(addr("new@winview.test")).exists
    with pytest.raises(AccountError, match="no such user"):
        db.del_user("new@winview.test")


def test_remembered_lookups_follow_another_process_changes(db: AccountDB, tmp_path: Path) -> None:
    """The server's AccountDB remembers lookups; a change through another AccountDB (the CLI,
    another process) is seen by the next lookup: password, alias, sender check, deletion."""
    server = AccountDB(tmp_path / "accounts.sqlite3")
    cli = AccountDB(tmp_path / "accounts.sqlite3")
    bill = cli.add_user("bill@winview.test", "old")
    assert verify_password(server.password_hash("bill@winview.test")[1], "old")
    assert not server.may_send_as(bill, "info@winview.test")
    assert server.resolve(addr("info@winview.test")).users == ()
    cli.set_password("bill@winview.test", "new")
    cli.add_alias("info@winview.test", "bill@winview.test")
    assert verify_password(server.password_hash("bill@winview.test")[1], "new")
    assert server.may_send_as(bill, "info@winview.test")
    assert server.resolve(addr("Info@WinView.test")).users == (bill,)
    cli.del_user("bill@winview.test")
    assert server.password_hash("bill@winview.test") == (None, None)
    assert not server.resolve(addr("bill@winview.test")).exists


def test_change_around_serpentmail_needs_the_stamp_touched(db: AccountDB, tmp_path: Path) -> None:
    """What the cache is: a write that bypasses AccountDB (the sqlite3 shell) is not seen
    until the stamp file is touched; then it is."""
    path = tmp_path / "accounts.sqlite3"
    stamp = tmp_path / "accounts.sqlite3-stamp"
    assert stamp.exists()
    assert not db.resolve(addr("raw@winview.test")).exists
    raw = sqlite3.connect(path)
    with raw:
        raw.execute("INSERT INTO users(address, domain_id, password_hash) "
                    "SELECT 'raw@winview.test', id, 'x' FROM domains WHERE name='winview.test'")
    raw.close()
    assert not db.resolve(addr("raw@winview.test")).exists  # remembered
    os.utime(stamp, ns=(stamp.stat().st_mtime_ns + 10**9,) * 2)
    assert db.resolve(addr("raw@winview.test")).exists


def test_a_removed_stamp_is_made_again_by_the_next_change(db: AccountDB, tmp_path: Path) -> None:
    stamp = tmp_path / "accounts.sqlite3-stamp"
    server = AccountDB(tmp_path / "accounts.sqlite3")
    assert not server.resolve(addr("late@winview.test")).exists
    stamp.unlink()
    assert not server.resolve(addr("late@winview.test")).exists
    db.add_user("late@winview.test", "pw")
    assert stamp.exists()
    assert server.resolve(addr("late@winview.test")).exists


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to act as another user")
def test_a_stamp_another_user_owns_is_replaced_by_the_writer() -> None:
    """The CLI run as another user than the one who made the stamp cannot set its time
    (utime with explicit times needs the owner): it puts a fresh stamp in its place, and
    the server still sees the change."""
    import shutil
    import tempfile

    where = Path(tempfile.mkdtemp(prefix="serpentmail-stamp-"))  # not under pytest's 0700 tmp
    try:
        where.chmod(0o777)
        path = where / "accounts.sqlite3"
        server = AccountDB(path)
        server.add_domain("winview.test")
        stamp = where / "accounts.sqlite3-stamp"
        for f in where.iterdir():
            f.chmod(0o666 if f != stamp else 0o644)  # the database is the other user's to write
        assert not server.resolve(addr("made@winview.test")).exists
        pid = os.fork()
        if pid == 0:  # the child: as nobody, add a user
            code = 1
            try:
                os.setgid(65534)
                os.setuid(65534)
                AccountDB(path).add_user("made@winview.test", "pw")
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert stamp.stat().st_uid == 65534  # replaced, not touched
        assert server.resolve(addr("made@winview.test")).exists
    finally:
        shutil.rmtree(where, ignore_errors=True)


def test_remembered_lookups_are_bounded(db: AccountDB) -> None:
    from serpentmail.accounts import db as dbmod

    for i in range(dbmod.CACHE_MAX + 5):
        assert not db.resolve(addr(f"nobody{i}@winview.test")).exists
    assert len(db._cache) <= dbmod.CACHE_MAX


def test_passwd(db: AccountDB) -> None:
    db.add_user("bill@winview.test", "old")
    db.set_password("BILL@winview.test", "new")
    _, stored = db.password_hash("bill@winview.test")
    assert verify_password(stored, "new")
    with pytest.raises(AccountError):
        db.set_password("nobody@winview.test", "x")
