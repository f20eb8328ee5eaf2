"""Recycler: a removed queue item's files are kept, blanked, and reused for new spools."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from serpentmail.queue.store import QueueStore
from serpentmail.storage import fsutil
from serpentmail.storage.journal import Journal
from serpentmail.storage.maildir import (
    Committer,
    Recycler,
    SpoolFile,
    SpoolPool,
    commit_async,
    final_name,
)


def _enqueue(store: QueueStore, content: bytes) -> str:
    sp = SpoolFile(store.spool_tmp)
    sp.write(content)
    return asyncio.run(store.enqueue(sp, "a@b.test", ["x@y.test"])).id


def test_removed_items_are_blanked_and_reused_for_new_messages(tmp_path: Path) -> None:
    recycler = Recycler(tmp_path / "tmp" / "recycled", prefix="w0")
    store = QueueStore(tmp_path, recycler=recycler)
    qid = _enqueue(store, b"Subject: secret\r\n\r\nconfidential body\r\n")
    inodes = {store.data_path(qid).stat().st_ino, store.env_path(qid).stat().st_ino}

    assert store.remove_many([qid, "nosuchid"]) == {qid}
    # gone from the queue as before (the envelope's disappearance is the commit point)
    assert not store.exists(qid) and store.load(qid) is None and list(store.ids()) == []
    kept = sorted(recycler.dir.iterdir())
    assert len(kept) == 2 == len(recycler)
    assert {p.stat().st_ino for p in kept} == inodes
    # the content does not linger: zeros where it was (or an empty file, where the filesystem
    # cannot zero a range in place)
    assert all(p.read_bytes().strip(b"\0") == b"" for p in kept)

    # A pool hands the same inodes out again; a message written to one is exactly its bytes.
    pool = SpoolPool(tmp_path / "tmp", recycler=recycler)
    reused = pool.make(3)
    assert {os.fstat(s.fd).st_ino for s in reused[:2]} == inodes
    assert reused[2].path.parent == tmp_path / "tmp"  # none left: a new file is made
    assert len(recycler) == 0
    spool = reused[0]
    spool.write(b"new\r\n")
    maildir = tmp_path / "mail" / "1"
    (maildir / "new").mkdir(parents=True)
    target = maildir / "new" / final_name(spool.name, spool.size)
    committer = Committer()
    try:
        asyncio.run(commit_async(committer, spool, [target]))
    finally:
        committer.close()
    assert target.read_bytes() == b"new\r\n"
    assert not spool.path.exists()  # the recycled name went away once linked
    for s in reused[1:]:
        s.discard()


@pytest.mark.parametrize("path", ["recipe", "journal", "queue"])
def test_a_reused_file_holds_exactly_the_new_message(tmp_path: Path, path: str) -> None:
    """A file that held a longer message is written over, not emptied first: what is put in
    place (by the fsync recipe, through the journal, or by the queue's own commit) is the new
    message's bytes and nothing of the old one's tail."""
    recycler = Recycler(tmp_path / "tmp" / "recycled", prefix="w0")
    old = tmp_path / "old"
    old.write_bytes(b"Subject: old\r\n\r\n" + b"o" * 9000 + b"\r\n")
    recycler.put(old)
    kept = next(recycler.dir.iterdir())
    assert b"old" not in kept.read_bytes()
    (spool,) = SpoolPool(tmp_path / "tmp", recycler=recycler).make(1)
    assert spool.path == kept  # the same file, written over from its start
    new = b"Subject: new\r\n\r\nshort\r\n"
    spool.write(new)
    (tmp_path / "mail" / "new").mkdir(parents=True)
    target = tmp_path / "mail" / "new" / final_name(spool.name, spool.size)
    if path == "queue":
        store = QueueStore(tmp_path / "q")
        qid = asyncio.run(store.enqueue(spool, "a@b.test", ["x@y.test"])).id
        target = store.data_path(qid)
    else:
        journal = Journal(tmp_path / "journal" / "w0.log", tmp_path) if path == "journal" else None
        committer = Committer(journal=journal)
        try:
            asyncio.run(commit_async(committer, spool, [target], journal=journal is not None))
        finally:
            committer.close()  # closes the journal too
    assert target.read_bytes() == new


def test_blank_on_a_filesystem_without_zero_range_truncates_there_only(tmp_path: Path) -> None:
    """tmpfs refuses FALLOC_FL_ZERO_RANGE: files there are emptied, and that filesystem's
    answer does not change how files elsewhere are blanked."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == tmp_path.stat().st_dev:
        pytest.skip("no separate tmpfs to try")
    f = shm / f"serpentmail-blank-test-{os.getpid()}"
    try:
        f.write_bytes(b"secret" * 100)
        fsutil.blank(f)
        assert f.read_bytes().strip(b"\0") == b""
    finally:
        f.unlink(missing_ok=True)
    g = tmp_path / "g"
    g.write_bytes(b"secret" * 100)
    fsutil.blank(g)
    assert g.read_bytes().strip(b"\0") == b""
    assert fsutil._zero_range_works  # tmpfs's refusal did not switch it off everywhere
    if g.stat().st_dev not in fsutil._no_zero_range:
        assert g.stat().st_size == 600  # zeroed in place, not truncated


def test_blank_falls_back_to_truncating(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the filesystem cannot zero a range in place, the file is emptied as before."""
    monkeypatch.setattr(fsutil, "_zero_range_works", False)
    f = tmp_path / "f"
    f.write_bytes(b"secret" * 100)
    fsutil.blank(f)
    assert f.read_bytes() == b""


def test_blank_zeroes_in_place_and_keeps_the_blocks(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"secret" * 2000)
    os.sync()
    fsutil.blank(f)
    if not fsutil._zero_range_works or f.stat().st_dev in fsutil._no_zero_range:
        pytest.skip("this filesystem cannot zero a range in place")
    assert f.read_bytes() == b"\0" * 12000
    assert f.stat().st_blocks > 0


def test_the_limit_and_a_restarted_owner(tmp_path: Path) -> None:
    d = tmp_path / "recycled"
    recycler = Recycler(d, prefix="w1", limit=2)
    files = []
    for i in range(3):
        f = tmp_path / f"f{i}"
        f.write_bytes(b"x" * 100)
        files.append(f)
        recycler.put(f)
    assert not any(f.exists() for f in files)
    assert len(recycler) == 2 and len(list(d.iterdir())) == 2  # the third was deleted
    with pytest.raises(FileNotFoundError):
        recycler.put(tmp_path / "missing")
    # Another process's files are left alone; a successor with the same prefix removes them.
    Recycler(d, prefix="w2")
    assert len(list(d.iterdir())) == 2
    Recycler(d, prefix="w1")
    assert list(d.iterdir()) == []


def test_workers_share_the_surplus_and_no_file_is_handed_out_twice(tmp_path: Path) -> None:
    """With workers, the first one removes every queue item but all of them receive mail: past
    half its limit it offers files to the others, each claimed by exactly one of them."""
    d = tmp_path / "recycled"
    first = Recycler(d, prefix="w0", limit=4, share=True)
    others = [Recycler(d, prefix="w1", share=True), Recycler(d, prefix="w2", share=True)]
    for i in range(4):
        f = tmp_path / f"f{i}"
        f.write_bytes(b"queued message")
        first.put(f)
    assert len(first) == 2  # kept for itself; the other two were offered
    offered = sorted(p.name for p in d.iterdir() if p.name.startswith(Recycler.SHARED))
    assert len(offered) == 2
    got = [p for p in (others[0].take(), first.take(), others[1].take(), first.take(), first.take(),
                       others[0].take(), others[1].take()) if p is not None]
    assert len(got) == 4 == len(set(got))  # each file once, whoever took it
    assert [p.name.split("-")[0] for p in got[:3]] == ["w1", "w0", "w2"]  # the others claimed theirs
    assert {os.stat(p).st_ino for p in got} == {os.stat(p).st_ino for p in d.iterdir()}
    assert all(p.read_bytes().strip(b"\0") == b"" for p in got)
    assert not any(p.name.startswith(Recycler.SHARED) for p in d.iterdir())


def test_offered_files_are_bounded_when_nobody_claims_them(tmp_path: Path) -> None:
    d = tmp_path / "recycled"
    first = Recycler(d, prefix="w0", limit=4, share=True)
    for i in range(80):
        f = tmp_path / f"f{i}"
        f.write_bytes(b"x")
        first.put(f)
        assert not f.exists()
    shared = [p for p in d.iterdir() if p.name.startswith(Recycler.SHARED)]
    # counted every 32 offers: at most the limit plus one round of 32, the rest deleted
    assert 4 <= len(shared) <= 4 + 32
    assert len(first) == 2 and len(list(d.iterdir())) == 2 + len(shared)


@pytest.mark.parametrize("blank_first", [False, True])
def test_a_file_with_another_name_is_never_blanked(tmp_path: Path, blank_first: bool) -> None:
    """Nothing another path still shows (a hard link, say into a mailbox) is truncated."""
    recycler = Recycler(tmp_path / "recycled", prefix="w0")
    item = tmp_path / "item"
    item.write_bytes(b"Subject: kept\r\n\r\nstill readable elsewhere\r\n")
    other = tmp_path / "elsewhere"
    os.link(item, other)
    recycler.put(item, blank_first=blank_first)
    assert not item.exists()
    assert other.read_bytes() == b"Subject: kept\r\n\r\nstill readable elsewhere\r\n"
    assert len(recycler) == 0 and list(recycler.dir.iterdir()) == []


def test_without_its_directory_it_deletes_as_before(tmp_path: Path) -> None:
    recycler = Recycler(tmp_path / "recycled", prefix="w0")
    recycler.dir.rmdir()  # removed by hand while the server runs
    for i, blank_first in enumerate((False, True)):
        f = tmp_path / f"f{i}"
        f.write_bytes(b"x")
        recycler.put(f, blank_first=blank_first)  # no error: the file is simply deleted
        assert not f.exists()
    assert len(recycler) == 0
