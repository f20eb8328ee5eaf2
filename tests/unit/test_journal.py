"""The delivery journal (storage/journal.py): appends, checkpoints and the replay after a crash."""

from __future__ import annotations

import os
import struct
import threading
from pathlib import Path

import pytest

from serpentmail.storage import journal as jmod
from serpentmail.storage.journal import (
    DATA_START,
    Entry,
    Journal,
    JournalBusy,
    JournalFull,
    pending_targets,
    records,
    replay,
    replay_all,
    wait_checkpointed,
)
from serpentmail.storage.maildir import KEEP_MAX, CommitJob, Committer, SpoolFile, ensure_maildir
from tests.helpers import crash_committer, drop_journal


def _maildir(root: Path, uid: int) -> Path:
    md = root / "mail" / str(uid)
    ensure_maildir(md)
    return md


def _header(path: Path) -> tuple[int, int]:
    raw = path.read_bytes()[:jmod.HEADER.size]
    _, gen, start, _ = jmod.HEADER.unpack(raw)
    return gen, start


def _crashed_after(root: Path, entries: list[Entry], name: str = "w0.log") -> Path:
    """A journal that took ``entries`` and then "crashed": nothing renamed, no checkpoint."""
    j = Journal(root / "journal" / name, root)
    with j.lock:
        j.append(entries)
    drop_journal(j)
    return j.path


def test_records_not_placed_before_a_crash_are_restored_byte_for_byte(tmp_path: Path) -> None:
    md1, md2 = _maildir(tmp_path, 1), _maildir(tmp_path, 2)
    one = b"Subject: one\r\n\r\nfirst\r\n"
    two = b"Subject: two\r\n\r\nsecond, for two mailboxes\r\n"
    path = _crashed_after(tmp_path, [Entry(one, [md1 / "new" / "a,S=23"]),
                                     Entry(two, [md1 / "new" / "b,S=42", md2 / "new" / "b,S=42"])])

    report = replay(path, tmp_path)
    assert (report.restored, report.rewritten, report.intact) == (3, 0, 0)
    assert (md1 / "new" / "a,S=23").read_bytes() == one
    assert (md1 / "new" / "b,S=42").read_bytes() == two
    assert (md2 / "new" / "b,S=42").read_bytes() == two
    assert list((md1 / "tmp").iterdir()) == []
    # done once: the header moved on, so a second start finds nothing to do
    again = replay(path, tmp_path)
    assert (again.restored, again.rewritten, again.intact) == (0, 0, 0)


def test_replay_rewrites_a_damaged_file_and_leaves_intact_ones_alone(tmp_path: Path) -> None:
    md = _maildir(tmp_path, 1)
    good, bad = b"good message\r\n", b"this one lost its blocks\r\n"
    path = _crashed_after(tmp_path, [Entry(good, [md / "new" / "g"]), Entry(bad, [md / "new" / "d"])])
    (md / "new" / "g").write_bytes(good)
    (md / "new" / "d").write_bytes(b"\0" * len(bad))  # the name survived, the content did not
    ino = os.stat(md / "new" / "g").st_ino

    report = replay(path, tmp_path)
    assert (report.intact, report.rewritten, report.restored) == (1, 1, 0)
    assert (md / "new" / "d").read_bytes() == bad
    assert os.stat(md / "new" / "g").st_ino == ino  # untouched


def test_a_message_pop3_moved_to_cur_is_found_there(tmp_path: Path) -> None:
    md = _maildir(tmp_path, 1)
    path = _crashed_after(tmp_path, [Entry(b"seen already\r\n", [md / "new" / "m,S=14"])])
    (md / "cur" / "m,S=14:2,S").write_bytes(b"seen already\r\n")

    report = replay(path, tmp_path)
    assert report.intact == 1
    assert list((md / "new").iterdir()) == []


def test_a_torn_append_ends_the_scan_and_earlier_records_still_count(tmp_path: Path) -> None:
    md = _maildir(tmp_path, 1)
    path = tmp_path / "journal" / "w0.log"
    j = Journal(path, tmp_path)
    with j.lock:
        j.append([Entry(b"whole\r\n", [md / "new" / "w"])])
        torn_at = j.end
        j.append([Entry(b"cut short by the crash\r\n", [md / "new" / "t"]),
                  Entry(b"never written\r\n", [md / "new" / "n"])])
    drop_journal(j)
    with open(path, "r+b") as f:  # the second append's content did not reach the disk
        f.seek(torn_at + jmod.RECORD.size + 5)
        f.write(b"\0\0\0\0")

    assert [t for t, _ in records(path)] == [["mail/1/new/w"]]
    replay(path, tmp_path)
    assert sorted(p.name for p in (md / "new").iterdir()) == ["w"]


def test_a_checkpointed_record_is_not_replayed(tmp_path: Path) -> None:
    md = _maildir(tmp_path, 1)
    path = tmp_path / "journal" / "w0.log"
    j = Journal(path, tmp_path)
    with j.lock:
        j.append([Entry(b"placed and made durable\r\n", [md / "new" / "x"])])
    (md / "new" / "x").write_bytes(b"placed and made durable\r\n")
    gen_before, _ = _header(path)
    j.checkpoint()
    assert _header(path) == (gen_before + 1, DATA_START)  # nothing pending: started over
    (md / "new" / "x").unlink()  # downloaded and deleted later: it must stay deleted
    drop_journal(j)
    assert list(records(path)) == []
    assert replay(path, tmp_path).restored == 0
    assert not (md / "new" / "x").exists()


def test_checkpoint_with_appends_in_between_keeps_the_newer_records(tmp_path: Path) -> None:
    md = _maildir(tmp_path, 1)
    path = tmp_path / "journal" / "w0.log"
    j = Journal(path, tmp_path)
    with j.lock:
        j.append([Entry(b"old\r\n", [md / "new" / "old"])])
    (md / "new" / "old").write_bytes(b"old\r\n")
    real = j.flush_fs

    def append_during_flush(fd: int) -> None:  # another message arrives while syncfs runs
        with j.lock:
            j.append([Entry(b"new\r\n", [md / "new" / "new"])])
        real(fd)

    j.flush_fs = append_during_flush
    j.checkpoint()
    j.flush_fs = real
    drop_journal(j)
    assert [t for t, _ in records(path)] == [["mail/1/new/new"]]
    replay(path, tmp_path)
    assert (md / "new" / "new").read_bytes() == b"new\r\n"


def test_records_of_an_earlier_lap_are_ignored(tmp_path: Path) -> None:
    md = _maildir(tmp_path, 1)
    path = tmp_path / "journal" / "w0.log"
    j = Journal(path, tmp_path)
    with j.lock:
        j.append([Entry(b"a long first-lap message " * 20, [md / "new" / "lap1"])])
    (md / "new" / "lap1").write_bytes(b"a long first-lap message " * 20)
    j.checkpoint()  # starts over at DATA_START, one generation up
    with j.lock:
        j.append([Entry(b"short\r\n", [md / "new" / "lap2"])])
    drop_journal(j)
    (md / "new" / "lap1").unlink()
    assert [t for t, _ in records(path)] == [["mail/1/new/lap2"]]


def test_full_journal_raises_and_the_committer_checkpoints_and_goes_on(tmp_path: Path) -> None:
    md = _maildir(tmp_path, 1)
    path = tmp_path / "journal" / "w0.log"
    j = Journal(path, tmp_path, size=DATA_START + 16 * 1024)
    with j.lock, pytest.raises(JournalFull):
        j.append([Entry(b"x" * 20000, [md / "new" / "big"])])

    committer = Committer(journal=j)
    gen0, _ = _header(path)
    done: list[BaseException | None] = []
    answered = threading.Semaphore(0)
    n = 40

    def on_done(err: BaseException | None) -> None:
        done.append(err)
        answered.release()

    try:
        for i in range(n):
            sp = SpoolFile(tmp_path / "tmp" if (tmp_path / "tmp").is_dir() else _mk(tmp_path / "tmp"))
            sp.write(f"message {i}\r\n".encode() * 100)  # ~1.2 KiB: a dozen fill the journal
            committer.submit(CommitJob(sp, [md / "new" / f"m{i}"], on_done, keep_spool=True, journal=True))
            # One job at a time, so the journal fills record by record. Submitted all at once,
            # they could form one batch larger than the whole journal, which goes to the fsync
            # recipe without a checkpoint (correct, but not what this test is about; it made
            # the test fail once in CI).
            assert answered.acquire(timeout=30)
    finally:
        committer.close()
    assert done == [None] * n
    for i in range(n):
        assert (md / "new" / f"m{i}").read_bytes() == f"message {i}\r\n".encode() * 100
    assert _header(path)[0] > gen0  # it started over at least once
    assert list(records(path)) == []  # close() checkpointed everything


def _mk(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    return d


def test_queue_jobs_and_big_messages_take_the_fsync_recipe(tmp_path: Path) -> None:
    md = _maildir(tmp_path, 1)
    tmp = _mk(tmp_path / "tmp")
    j = Journal(tmp_path / "journal" / "w0.log", tmp_path)
    committer = Committer(journal=j)
    try:
        queue_item = SpoolFile(tmp)
        queue_item.write(b"a queue file\r\n")
        committer.commit_now(queue_item, [md / "new" / "q"], keep_spool=True)  # journal=False
        assert j.end == DATA_START
        big = SpoolFile(tmp)
        big.write(b"y" * (j.max_record + 1))
        committer.commit_now(big, [md / "new" / "big"], keep_spool=True, journal=True)
        assert j.end == DATA_START
        small = SpoolFile(tmp)
        small.write(b"a local delivery\r\n")
        committer.commit_now(small, [md / "new" / "s"], keep_spool=True, journal=True)
        assert j.end > DATA_START
    finally:
        committer.close()
    assert (md / "new" / "q").read_bytes() == b"a queue file\r\n"
    assert (md / "new" / "big").stat().st_size == j.max_record + 1
    assert (md / "new" / "s").read_bytes() == b"a local delivery\r\n"


def test_a_failing_journal_falls_back_to_fsync_and_loses_nothing(tmp_path: Path) -> None:
    md = _maildir(tmp_path, 1)
    tmp = _mk(tmp_path / "tmp")
    j = Journal(tmp_path / "journal" / "w0.log", tmp_path)

    # Every write to the journal now fails (EBADF: the descriptors are open for reading only).
    writable, direct = j.fd, j.wfd
    j.fd = os.open(j.path, os.O_RDONLY | os.O_CLOEXEC)
    if direct >= 0:
        j.wfd = os.open(j.path, os.O_RDONLY | os.O_CLOEXEC)
    committer = Committer(journal=j)
    try:
        sp = SpoolFile(tmp)
        sp.write(b"still delivered\r\n")
        committer.commit_now(sp, [md / "new" / "a", _maildir(tmp_path, 2) / "new" / "a"], journal=True)
    finally:
        committer.close()
        os.close(writable)
        if direct >= 0:
            os.close(direct)
    assert (md / "new" / "a").read_bytes() == b"still delivered\r\n"
    assert (tmp_path / "mail" / "2" / "new" / "a").read_bytes() == b"still delivered\r\n"
    assert list(tmp.iterdir()) == []
    assert list(records(j.path)) == []  # nothing went through the journal


def test_replay_all_covers_every_worker_and_skips_removed_mailboxes(tmp_path: Path) -> None:
    md = _maildir(tmp_path, 1)
    for w in (0, 1):
        _crashed_after(tmp_path, [Entry(f"from worker {w}\r\n".encode(), [md / "new" / f"w{w}"]),
                                  Entry(b"to a deleted account\r\n", [tmp_path / "mail" / "9" / "new" / f"gone{w}"])],
                       f"w{w}.log")
    report = replay_all(tmp_path)
    assert (report.restored, report.skipped) == (2, 2)
    assert (md / "new" / "w0").read_bytes() == b"from worker 0\r\n"
    assert (md / "new" / "w1").read_bytes() == b"from worker 1\r\n"
    assert not (tmp_path / "mail" / "9").exists()


def test_a_journal_with_a_bad_header_is_replaced_not_trusted(tmp_path: Path) -> None:
    path = tmp_path / "journal" / "w0.log"
    path.parent.mkdir()
    path.write_bytes(struct.pack("<4s", b"JUNK") + bytes(DATA_START * 2))
    j = Journal(path, tmp_path)  # no record in it was ever acknowledged: it starts afresh
    assert j.end == DATA_START
    drop_journal(j)
    assert list(records(path)) == []


def test_a_journal_in_use_is_not_opened_or_replayed_by_another(tmp_path: Path) -> None:
    md = _maildir(tmp_path, 1)
    path = tmp_path / "journal" / "w0.log"
    live = Journal(path, tmp_path)
    with live.lock:
        live.append([Entry(b"acknowledged, rename pending\r\n", [md / "new" / "p"])])
    with pytest.raises(JournalBusy):
        Journal(path, tmp_path)  # a second server on the same data directory
    assert replay_all(tmp_path).restored == 0  # skipped: the live process owns it
    assert not (md / "new" / "p").exists()
    assert [t for t, _ in records(path)] == [["mail/1/new/p"]]  # its header untouched
    drop_journal(live)
    assert replay_all(tmp_path).restored == 1  # once released, the next start replays it


def test_an_append_of_more_buffers_than_one_pwritev_takes_is_whole(tmp_path: Path) -> None:
    md = _maildir(tmp_path, 1)
    entries = [Entry(f"message {i}\r\n".encode(), [md / "new" / f"m{i}"]) for i in range(400)]  # 1,200 buffers
    path = _crashed_after(tmp_path, entries)
    assert [t for t, _ in records(path)] == [[f"mail/1/new/m{i}"] for i in range(400)]
    assert replay(path, tmp_path).restored == 400
    assert (md / "new" / "m399").read_bytes() == b"message 399\r\n"


def _direct_journal(root: Path) -> Journal:
    """A journal whose appends are direct writes (skips the test where the filesystem refuses)."""
    j = Journal(root / "journal" / "w0.log", root)
    if j.wfd < 0:
        j.close()
        pytest.skip("this filesystem refuses O_DIRECT: the appends go through the page cache")
    return j


def test_direct_appends_of_any_length_keep_every_record_whole(tmp_path: Path) -> None:
    """Appends start and end anywhere in a block (the block's earlier bytes are written again
    with each one), and one bigger than the aligned buffer goes in pieces."""
    md = _maildir(tmp_path, 1)
    j = _direct_journal(tmp_path)
    path = j.path
    sizes = [1, jmod.BLOCK - 1, jmod.BLOCK, jmod.BLOCK + 1, 10, jmod.DIRECT_BUFFER + 12345, 17]
    expected = []
    with j.lock:
        for i, n in enumerate(sizes):
            content = bytes([65 + i]) * n
            j.append([Entry(content, [md / "new" / f"m{i}"])])
            expected.append(([f"mail/1/new/m{i}"], content))
        batch = [Entry(f"batch {k}\r\n".encode() * (k + 1), [md / "new" / f"b{k}"]) for k in range(30)]
        j.append(batch)
        expected += [([f"mail/1/new/b{k}"], e.content) for k, e in enumerate(batch)]
        end = j.end
    assert j.wfd >= 0  # no append fell back to the page cache
    assert list(records(path)) == expected
    raw = path.read_bytes()
    assert raw[end:-(-end // jmod.BLOCK) * jmod.BLOCK] == bytes(-end % jmod.BLOCK)  # padded with zeros

    j.checkpoint()  # nothing was placed: only the header moves, the journal starts over
    with j.lock:
        j.append([Entry(b"second lap\r\n", [md / "new" / "lap2"])])
    drop_journal(j)
    assert list(records(path)) == [(["mail/1/new/lap2"], b"second lap\r\n")]


def test_a_refused_direct_write_falls_back_to_the_page_cache(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    md = _maildir(tmp_path, 1)
    j = _direct_journal(tmp_path)
    path = j.path
    with j.lock:
        j.append([Entry(b"first\r\n", [md / "new" / "a"])])
        # The next direct write would start one octet past a block boundary: the kernel refuses
        # it (EINVAL), as a filesystem without direct I/O would.
        j._tail = j._tail[1:]
        j.append([Entry(b"second\r\n", [md / "new" / "b"])])
        assert j.wfd == -1  # from now on, the page cache
        j.append([Entry(b"third\r\n", [md / "new" / "c"])])
    drop_journal(j)
    assert [c for _, c in records(path)] == [b"first\r\n", b"second\r\n", b"third\r\n"]
    assert "direct writes refused" in caplog.text


def test_the_last_partial_block_of_an_odd_sized_journal_takes_the_page_cache(tmp_path: Path) -> None:
    md = _maildir(tmp_path, 1)
    path = tmp_path / "journal" / "w0.log"
    j = Journal(path, tmp_path, size=DATA_START + 3 * jmod.BLOCK + 100)
    contents = [bytes([97 + i]) * 3040 for i in range(4)]  # the fourth ends in the last 100 octets
    with j.lock:
        for i, c in enumerate(contents):
            j.append([Entry(c, [md / "new" / f"m{i}"])])
        with pytest.raises(JournalFull):
            j.append([Entry(b"no room\r\n", [md / "new" / "x"])])
    assert [c for _, c in records(path)] == contents
    j.checkpoint()
    with j.lock:
        j.append([Entry(b"after the lap\r\n", [md / "new" / "y"])])  # direct again, from the start
    drop_journal(j)
    assert [c for _, c in records(path)] == [b"after the lap\r\n"]


def test_a_deletion_waits_for_the_checkpoint_of_its_record(tmp_path: Path) -> None:
    """What POP3's UPDATE relies on (server/pop3.py): a pending record names its file until a
    checkpoint; the process's own journal is checkpointed on demand, another's is waited for."""
    md = _maildir(tmp_path, 1)
    j = Journal(tmp_path / "journal" / "w0.log", tmp_path)
    target = md / "new" / "m,S=5"
    with j.lock:
        j.append([Entry(b"hello", [target])])
    target.write_bytes(b"hello")
    rel = "mail/1/new/m,S=5"
    assert pending_targets(tmp_path) == {rel}
    # Not ours and never checkpointed: still pending when the wait gives up.
    assert wait_checkpointed(tmp_path, {rel, "mail/1/new/other"}, None, 0.1) == {rel}
    # Another process's checkpointer moves on meanwhile: the wait ends with it.
    timer = threading.Timer(0.2, j.checkpoint)
    timer.start()
    assert wait_checkpointed(tmp_path, {rel}, None, 5.0) == set()
    timer.join()
    with j.lock:
        j.append([Entry(b"again", [md / "new" / "n"])])
    assert pending_targets(tmp_path) == {"mail/1/new/n"}
    # Our own journal: checkpointed at once.
    assert wait_checkpointed(tmp_path, {"mail/1/new/n"}, j, 0.0) == set()
    assert pending_targets(tmp_path) == set()
    j.close()


def test_record_names_are_the_targets_relative_to_the_data_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for root in (tmp_path, Path("data")):
        j = Journal(root / "journal" / "w0.log", root)
        try:
            for target in (root / "queue" / "env" / "A1.json", root / "mail" / "7" / "new" / "1.M2P3.vm",
                           root / "queue" / ".." / "mail" / "x", tmp_path.parent / "elsewhere"):
                assert j._name(target) == os.path.relpath(target, root)
        finally:
            drop_journal(j)


def test_a_record_holds_the_pieces_the_session_wrote_and_replays_byte_for_byte(tmp_path: Path) -> None:
    """A journaled commit makes its record from the pieces the spool kept as it was written (no
    read back), one checksum over them all; a spool that could not keep them (written from a
    memoryview) is read back. After a crash that lost the renames, the replay restores each
    message as it was written."""
    md = _maildir(tmp_path, 1)
    tmp = _mk(tmp_path / "tmp")
    j = Journal(tmp_path / "journal" / "w0.log", tmp_path)
    committer = Committer(journal=j)
    committer._stop.set()  # no checkpoint: the records must still be there to read
    three, many, viewed = SpoolFile(tmp), SpoolFile(tmp), SpoolFile(tmp)
    for piece in (b"Received: by test\r\n", b"Subject: three pieces\r\n\r\n", b"body\r\n" * 500):
        three.write(piece)
    written = b"Received: by test\r\nSubject: three pieces\r\n\r\n" + b"body\r\n" * 500
    # What the session wrote is the message: the file changed behind its back is not.
    os.pwrite(three.fd, b"X" * len(written), 0)
    for i in range(100):  # more pieces than one record takes as they are: joined
        many.write(f"line {i}\r\n".encode())
    viewed.write(memoryview(b"from a memoryview\r\n"))
    big = SpoolFile(tmp)  # more than a session keeps in memory: read back
    big_content = b"b" * KEEP_MAX + b"\r\n"
    big.write(big_content[:1000])
    big.write(big_content[1000:])
    assert big.kept is None
    try:
        for name, spool in (("three", three), ("many", many), ("viewed", viewed), ("big", big)):
            committer.commit_now(spool, [md / "new" / name], keep_spool=True, journal=True)
        assert [t for t, _ in records(j.path)] == [[f"mail/1/new/{n}"] for n in ("three", "many", "viewed", "big")]
        assert three.kept is None and many.kept is None  # released once the record was made
    finally:
        crash_committer(committer)
    for name in ("three", "many", "viewed", "big"):
        (md / "new" / name).unlink()  # lost with the page cache
    assert replay(j.path, tmp_path).restored == 4
    assert (md / "new" / "three").read_bytes() == written
    assert (md / "new" / "many").read_bytes() == b"".join(f"line {i}\r\n".encode() for i in range(100))
    assert (md / "new" / "viewed").read_bytes() == b"from a memoryview\r\n"
    assert (md / "new" / "big").read_bytes() == big_content


def test_a_batch_places_each_file_and_reports_the_one_whose_mailbox_is_gone(tmp_path: Path) -> None:
    """The renames and links after a journaled batch's flush (one call with the write where
    the C module is built): each job's outcome is its own. The job whose mailbox vanished gets
    the error (the session answers 451) and leaves no file behind; the others are in place."""
    md1, md2 = _maildir(tmp_path, 1), _maildir(tmp_path, 2)
    tmp = _mk(tmp_path / "tmp")
    j = Journal(tmp_path / "journal" / "w0.log", tmp_path)
    committer = Committer(journal=j)
    outcomes: dict[str, BaseException | None] = {}
    jobs = []
    for name, links, single in (("one", [md1 / "new" / "one"], True),
                                ("lost", [tmp_path / "mail" / "9" / "new" / "lost"], True),
                                ("both", [md1 / "new" / "both", md2 / "new" / "both"], False)):
        sp = SpoolFile(tmp)
        sp.write(f"Subject: {name}\r\n\r\n".encode())
        jobs.append(CommitJob(sp, links, lambda err, name=name: outcomes.__setitem__(name, err),
                              keep_spool=single, journal=True))
    try:
        committer._commit(jobs, wake=False)
    finally:
        committer.close()
    assert outcomes["one"] is None and outcomes["both"] is None
    lost = outcomes["lost"]
    assert isinstance(lost, FileNotFoundError)
    assert (md1 / "new" / "one").read_bytes() == b"Subject: one\r\n\r\n"
    assert (md1 / "new" / "both").read_bytes() == (md2 / "new" / "both").read_bytes() == b"Subject: both\r\n\r\n"
    assert list(tmp.iterdir()) == []  # every temp name gone: renamed, unlinked after its links, or cleaned
    assert all(job.spool.closed and job.done for job in jobs)
