"""The durable spool: enqueue commits both files, recovery drops half-made items, updates are
atomic, listing never reads bodies."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from serpentmail.queue.store import EnvelopeRecord, QueueError, QueueStore, valid_id
from serpentmail.storage.journal import Journal, records, replay_all
from serpentmail.storage.maildir import Committer, SpoolFile, SpoolPool
from tests.helpers import crash_committer, watch_creations


def _spool(store: QueueStore, content: bytes) -> SpoolFile:
    sp = SpoolFile(store.spool_tmp)
    sp.write(content)
    return sp


@pytest.mark.parametrize("with_committer", [True, False])
def test_enqueue_is_durable_and_complete(tmp_path: Path, with_committer: bool) -> None:
    committer = Committer() if with_committer else None
    store = QueueStore(tmp_path, committer, clock=lambda: 1000.0)
    try:
        sp = _spool(store, b"Subject: x\r\n\r\nbody\r\n")
        rec = asyncio.run(store.enqueue(sp, "a@b.test", ["x@y.test", "X@y.test", "z@w.test"], smtputf8=True))
    finally:
        if committer:
            committer.close()
    assert valid_id(rec.id)
    assert store.data_path(rec.id).read_bytes() == b"Subject: x\r\n\r\nbody\r\n"
    assert not sp.path.exists()  # the spool was renamed into place, not copied
    loaded = store.load(rec.id)
    assert loaded is not None
    assert loaded.sender == "a@b.test" and loaded.arrival == 1000.0 and loaded.size == 20 and loaded.smtputf8
    # duplicates (case-insensitively) collapse; every recipient starts pending, due now
    assert [(r.address, r.state, r.next_attempt) for r in loaded.recipients] == [
        ("x@y.test", "pending", 1000.0), ("z@w.test", "pending", 1000.0)]
    assert os.listdir(store.spool_tmp) == []


@pytest.mark.parametrize("journaled", [False, True])
def test_enqueue_that_fails_for_one_file_leaves_neither(tmp_path: Path, journaled: bool) -> None:
    """The envelope cannot be put in place (its directory is gone): the enqueue raises (the
    session answers 451) once both files' commits have ended, and the data file that did land
    is removed again: no half item stays behind."""
    if journaled:
        store, committer, journal = _journaled_store(tmp_path)
        journal.max_record = 4  # too big for the journal: a journaled store's recipe path
    else:
        committer = Committer()
        store = QueueStore(tmp_path, committer)
    try:
        sp = _spool(store, b"Subject: x\r\n\r\nbody\r\n")
        os.rmdir(store.env)
        with pytest.raises(OSError):
            asyncio.run(store.enqueue(sp, "a@b.test", ["x@y.test"]))
    finally:
        committer.close()
    assert os.listdir(store.data) == []
    assert not sp.path.exists()


def test_a_journaled_item_whose_directory_is_gone_stays_in_the_journal(tmp_path: Path) -> None:
    """A journaled item gets its names only at the checkpoint: if they cannot be made then, the
    checkpoint fails and moves nothing on, so the records stay until a start replays them."""
    store, committer, journal = _journaled_store(tmp_path)
    body = b"Subject: x\r\n\r\nbody\r\n"
    qid = _enqueue(store, body)
    os.rmdir(store.env)
    with pytest.raises(OSError):
        journal.checkpoint()
    assert journal.start < journal.end and journal.unplaced
    crash_committer(committer)
    report = replay_all(tmp_path)
    assert report.restored + report.intact == 2 and report.restored >= 1  # the env/ one at least
    assert store.data_path(qid).read_bytes() == body and store.env_path(qid).exists()


def test_recover_discards_half_made_items(tmp_path: Path) -> None:
    store = QueueStore(tmp_path)
    good = store.enqueue_bytes(b"m1\r\n", "a@b.test", ["x@y.test"])
    assert good is not None
    # envelope whose data never landed (crash between the two renames, never acknowledged)
    orphan_env = store.enqueue_bytes(b"m2\r\n", "a@b.test", ["x@y.test"])
    assert orphan_env is not None
    store.data_path(orphan_env.id).unlink()
    # data without an envelope: never acknowledged either
    (store.data / "0000000000000000ABCDEF").write_bytes(b"junk")
    (store.tmp / "partial").write_bytes(b"{")
    assert store.recover() == (1, 1)
    assert sorted(store.ids()) == [good.id]
    assert os.listdir(store.tmp) == []
    assert [r.id for r in store.scan()] == [good.id]


def test_save_is_atomic_and_never_resurrects_a_deleted_item(tmp_path: Path) -> None:
    store = QueueStore(tmp_path)
    rec = store.enqueue_bytes(b"m\r\n", "a@b.test", ["x@y.test"])
    assert rec is not None
    rec.recipients[0].state = "delivered"
    assert store.save(rec)
    loaded = store.load(rec.id)
    assert loaded is not None and loaded.recipients[0].state == "delivered"
    assert os.listdir(store.tmp) == []
    assert store.remove(rec.id)
    assert not store.save(rec)  # deleted meanwhile: nothing written
    assert store.load(rec.id) is None and not store.remove(rec.id)


def test_enqueue_bytes_with_explicit_id_is_idempotent(tmp_path: Path) -> None:
    store = QueueStore(tmp_path)
    first = store.enqueue_bytes(b"dsn", "", ["a@b.test"], qid="ABCDEF0123456789B0")
    assert first is not None
    assert store.enqueue_bytes(b"other", "", ["a@b.test"], qid="ABCDEF0123456789B0") is None
    assert store.data_path(first.id).read_bytes() == b"dsn"


def test_scan_does_not_read_bodies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = QueueStore(tmp_path)
    for i in range(50):
        store.enqueue_bytes(b"x" * 1000, "a@b.test", [f"u{i}@y.test"])
    opened: list[str] = []
    real_open = Path.read_bytes

    def spy(self: Path) -> bytes:
        opened.append(str(self))
        return real_open(self)

    monkeypatch.setattr(Path, "read_bytes", spy)
    assert len(list(store.scan())) == 50
    assert opened and all("/env/" in p for p in opened)


def test_headers_and_control_requests(tmp_path: Path) -> None:
    store = QueueStore(tmp_path)
    rec = store.enqueue_bytes(b"Subject: s\r\nFrom: a@b\r\n\r\nsecret body\r\n", "a@b.test", ["x@y.test"])
    assert rec is not None
    assert store.read_headers(rec.id) == b"Subject: s\r\nFrom: a@b\r\n\r\n"
    store.request("flush")
    store.request("retry", rec.id)
    with pytest.raises(QueueError):
        store.request("flush", "../etc")
    assert sorted(store.take_requests(), key=str) == sorted([("flush", None), ("retry", rec.id)], key=str)
    assert store.take_requests() == []


def test_envelope_round_trip() -> None:
    store_rec = EnvelopeRecord("0123456789ABCDEF", "", 1.5, 3, [])
    assert EnvelopeRecord.from_json(store_rec.to_json()) == store_rec
    with pytest.raises(ValueError):
        EnvelopeRecord.from_json(b'{"version": 99}')


def test_envelope_json_is_what_asdict_gave() -> None:
    """to_dict is written out by hand for speed: it must keep every field, with the keys and
    values dataclasses.asdict gave (queue files written before still load, byte for byte)."""
    import dataclasses
    import json

    from serpentmail.queue.store import RecipientRecord

    rcpt = RecipientRecord("x@y.test", "failed", 3, "550 5.1.1 no", 7.25, 9.5, "mx.y.test", "smtp", True, True)
    rec = EnvelopeRecord("0123456789ABCDEF", "a@b.test", 1.5, 3, [rcpt, RecipientRecord("z@\u00e9.test")],
                         True, True, True, 2, extra={"k": [1, {"n": None}]})
    assert rec.to_dict() == dataclasses.asdict(rec)
    assert set(rcpt.to_dict()) == {f.name for f in dataclasses.fields(RecipientRecord)}
    assert rec.to_json() == json.dumps(dataclasses.asdict(rec), ensure_ascii=False, sort_keys=True).encode()
    assert EnvelopeRecord.from_json(rec.to_json()) == rec


def test_remove_many_commits_a_batch_with_one_directory_fsync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import serpentmail.queue.store as store_mod

    store = QueueStore(tmp_path)
    ids = []
    for i in range(5):
        rec = store.enqueue_bytes(f"Subject: {i}\r\n\r\nx\r\n".encode(), "a@b.test", ["x@y.test"])
        assert rec is not None
        ids.append(rec.id)
    synced: list[Path] = []
    monkeypatch.setattr(store_mod, "fsync_dir", synced.append)
    assert store.remove_many([*ids, "0000000000000000AAAAAA"]) == set(ids)
    # env/ once (the commit point for all five); data/ never: a data file without its
    # envelope is removed by recover() anyway.
    assert synced == [store.env]
    assert list(store.ids()) == [] and list(store.data.iterdir()) == []
    assert store.remove_many(ids) == set() and synced == [store.env]


def test_remove_batched_groups_concurrent_removals(tmp_path: Path) -> None:
    class Counting(QueueStore):
        batches: list[list[str]] = []

        def remove_many(self, qids: list[str]) -> set[str]:
            self.batches.append(list(qids))
            return super().remove_many(qids)

    store = Counting(tmp_path)
    ids = []
    for i in range(20):
        rec = store.enqueue_bytes(f"Subject: {i}\r\n\r\nx\r\n".encode(), "a@b.test", ["x@y.test"])
        assert rec is not None
        ids.append(rec.id)

    async def go() -> tuple[list[bool], bool]:
        results = await asyncio.gather(*(store.remove_batched(q) for q in ids))
        return list(results), await store.remove_batched(ids[0])

    results, again = asyncio.run(go())
    assert results == [True] * 20 and again is False  # the second time it was already gone
    # All twenty were asked before the first batch ran: one batch, one env/ fsync.
    assert store.batches == [ids, [ids[0]]]
    assert list(store.ids()) == []


def test_removals_run_in_the_committer_thread_and_its_errors_reach_the_caller(tmp_path: Path) -> None:
    """With a committer (the server), a batch of removals runs in the committer's thread after
    the commits it queued behind, not in a thread of its own; a failure is the caller's, and
    the committer goes on committing."""
    import threading

    ran_in: list[str] = []

    class Watching(QueueStore):
        fail = False

        def remove_many(self, qids: list[str]) -> set[str]:
            ran_in.append(threading.current_thread().name)
            if self.fail:
                raise OSError("disk gone")
            return super().remove_many(qids)

    committer = Committer()
    store = Watching(tmp_path, committer)
    try:
        async def go() -> tuple[list[bool], str]:
            ids = [(await store.enqueue(_spool(store, b"Subject: %d\r\n\r\nx\r\n" % i), "a@b.test",
                                        ["x@y.test"])).id for i in range(5)]
            gone = list(await asyncio.gather(*(store.remove_batched(q) for q in ids)))
            store.fail = True
            with pytest.raises(OSError, match="disk gone"):
                await store.remove_batched("NOSUCHITEM01")
            store.fail = False
            later = await store.enqueue(_spool(store, b"Subject: later\r\n\r\nx\r\n"), "a@b.test", ["x@y.test"])
            return gone, later.id

        gone, later = asyncio.run(go())
    finally:
        committer.close()
    assert gone == [True] * 5
    assert ran_in and set(ran_in) == {"committer-0"}
    assert list(store.ids()) == [later] and store.exists(later)  # committed after the failure


def test_new_envelopes_use_spare_files_made_off_the_event_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from serpentmail.queue.store import SPARE_ENVELOPE_FILES

    store = QueueStore(tmp_path, clock=lambda: 1000.0)
    made_in = watch_creations(monkeypatch, store.tmp)

    async def go() -> list[str]:
        ids = []
        for i in range(3):
            rec = await store.enqueue(_spool(store, b"Subject: %d\r\n\r\nx\r\n" % i), "a@b.test", ["x@y.test"])
            ids.append(rec.id)
            await asyncio.sleep(0.05)  # let the refill run
        return ids

    ids = asyncio.run(go())
    main = threading.main_thread().name
    assert made_in[0] == main and len(made_in) > 1 and main not in made_in[1:]  # the first inline
    assert 0 < len(store.spares) <= SPARE_ENVELOPE_FILES
    for qid in ids:  # the envelopes are complete and durable as before
        rec = store.load(qid)
        assert rec is not None and rec.id == qid and store.exists(qid)
    store.discard_spares()
    assert list(store.tmp.iterdir()) == []
    # Spares left by a crash are temp files like any other: recover() removes them.
    asyncio.run(go())
    assert list(store.tmp.iterdir())
    store.recover()
    assert list(store.tmp.iterdir()) == []


# --- items journaled by the process that removes them (storage/journal.py) ------------------


def _journaled_store(tmp_path: Path) -> tuple[QueueStore, Committer, Journal]:
    journal = Journal(tmp_path / "journal" / "w0.log", tmp_path)
    committer = Committer(journal=journal)
    return QueueStore(tmp_path, committer, journal=True), committer, journal


def _enqueue(store: QueueStore, content: bytes) -> str:
    rec = asyncio.run(store.enqueue(_spool(store, content), "a@b.test", ["x@y.test"]))
    return rec.id


def _placed(store: QueueStore, qid: str) -> str:
    """Give a journaled item its names as a checkpoint does before its flush (no flush here)."""
    assert store.journal is not None
    for sp in store._spools[qid]:
        store.journal.place_now(sp)
    return qid


def test_a_journaled_item_lives_in_its_spools_until_a_checkpoint(tmp_path: Path) -> None:
    """Accepted through the journal, an item is not given its names: it is read from its spool
    files, and its files appear in data/ and env/ only when a checkpoint comes first."""
    store, committer, journal = _journaled_store(tmp_path)
    try:
        body = b"Subject: q\r\n\r\nheld\r\n"
        qid = _enqueue(store, body)
        assert os.listdir(store.data) == [] and os.listdir(store.env) == []
        assert store.exists(qid)
        assert store.data_file(qid).read_bytes() == body
        assert os.pread(store.data_fd(qid), 100, 0) == body  # what the remote courier reads
        rec = store.load(qid)
        assert rec is not None and rec.id == qid and rec.recipients[0].address == "x@y.test"
        journal.checkpoint()
        assert store.data_path(qid).read_bytes() == body
        assert EnvelopeRecord.from_json(store.env_path(qid).read_bytes()).id == qid
        assert not journal.unplaced and store.exists(qid)
        # Covered by the checkpoint: removed with the durable recipe, its spools let go.
        assert store.remove_many([qid]) == {qid}
        assert os.listdir(store.data) == [] and os.listdir(store.env) == [] and not store._spools
        assert store.data_fd(qid) == -1
    finally:
        committer.close()


def test_an_item_delivered_before_the_checkpoint_never_gets_a_file(tmp_path: Path) -> None:
    """The common case in submission: removed in the same epoch, it leaves a removal record and
    its two spools go back, still open, to the pools they came from; no file is made."""
    store, committer, journal = _journaled_store(tmp_path)
    try:
        pool = SpoolPool(store.spool_tmp, size=2)
        store.data_pool = pool
        qid = _enqueue(store, b"Subject: q\r\n\r\nbrief\r\n")
        data_spool, env_spool = store._spools[qid]
        spares = len(store.spares)
        assert store.remove_many([qid]) == {qid}
        assert not store.exists(qid) and not journal.unplaced
        assert list(pool._spares) == [data_spool] and len(store.spares) == spares + 1
        assert env_spool in store.spares._spares and not env_spool.closed
        journal.checkpoint()
        assert os.listdir(store.data) == [] and os.listdir(store.env) == []
        # The pool's next user writes over it from the start; its commit cuts it to length.
        pool._refilling = True  # (no event loop here to top the pool up)
        again = pool.take()
        assert again is data_spool and again.size == 0
        again.write(b"x")
        again.trim()
        assert again.path.read_bytes() == b"x"
    finally:
        committer.close()


def test_remove_now_takes_a_never_placed_item_on_the_loop_and_records_it(tmp_path: Path) -> None:
    """The event loop's removal (no thread hop): the spools go back, the removal record is
    written at once when nothing holds the journal, and a kill then brings nothing back.
    An item a checkpoint covered is not its business (False: remove_batched takes it)."""
    store, committer, journal = _journaled_store(tmp_path)
    gone = _enqueue(store, b"Subject: g\r\n\r\ndelivered\r\n")
    covered = _enqueue(store, b"Subject: c\r\n\r\nstill queued at the checkpoint\r\n")
    assert store.remove_now(gone)
    assert not store.exists(gone) and gone not in store._spools and not journal.removals
    assert [t for ts, _ in records(journal.path) for t in ts if t.startswith("-")] == [
        f"-queue/env/{gone}.json", f"-queue/data/{gone}"]
    journal.checkpoint()
    assert not store.remove_now(covered) and store.exists(covered)
    fresh = _enqueue(store, b"Subject: f\r\n\r\nafter the checkpoint\r\n")
    with journal.lock:  # a flush in progress: the record waits for the next write
        assert store.remove_now(fresh)
        assert journal.removals == [f"-queue/env/{fresh}.json", f"-queue/data/{fresh}"]
    journal.flush_removals()
    assert not journal.removals
    crash_committer(committer)
    report = replay_all(tmp_path)
    assert (report.restored, report.removed) == (0, 0)  # the delivered one stays delivered
    assert sorted(QueueStore(tmp_path).ids()) == [covered]


def test_a_kill_before_a_queued_removal_is_written_sends_the_item_again(tmp_path: Path) -> None:
    """The window the queued record leaves (a quarter of a second at most): a kill in it finds
    the item's records with no removal after them, so it is restored and sent twice, as after
    an operating-system crash: never lost."""
    store, committer, journal = _journaled_store(tmp_path)
    committer._stop.set()  # no checkpointer round to write the record meanwhile
    for t in committer._threads:
        if t.name == "checkpointer":
            t.join(timeout=10)
    body = b"Subject: w\r\n\r\nin the window\r\n"
    qid = _enqueue(store, body)
    with journal.lock:
        assert store.remove_now(qid)
    crash_committer(committer)
    assert replay_all(tmp_path).restored == 2
    assert store.data_path(qid).read_bytes() == body


def test_a_held_item_deleted_by_the_cli_after_its_checkpoint_is_let_go(tmp_path: Path) -> None:
    """`queue delete` waits for the checkpoint, which gives the item its files, then removes
    them: the server finds the item gone and closes its spools (forget); before the checkpoint
    nothing can have deleted it, and forget keeps it."""
    store, committer, journal = _journaled_store(tmp_path)
    try:
        qid = _enqueue(store, b"Subject: d\r\n\r\ndeleted\r\n")
        spools = store._spools[qid]
        store.forget(qid)
        assert store._spools[qid] == spools and store.exists(qid)
        journal.checkpoint()
        assert QueueStore(tmp_path).remove(qid)  # the CLI, another process
        assert not store.exists(qid)
        store.forget(qid)
        assert qid not in store._spools and all(sp.closed and not sp.path.exists() for sp in spools)
    finally:
        committer.close()


def test_an_item_half_journaled_half_committed_by_the_recipe_is_placed_at_once(tmp_path: Path) -> None:
    """The message fits a journal record and its envelope does not (or the journal filled up
    between the two jobs): the envelope takes the fsync recipe, so nothing will defer to the
    checkpoint; the message is linked into place before the 250 and its spool let go."""
    store, committer, journal = _journaled_store(tmp_path)
    try:
        journal.max_record = 100  # the 24-octet message fits, its envelope does not
        body = b"Subject: s\r\n\r\nsplit\r\n"
        sp = _spool(store, body)
        qid = asyncio.run(store.enqueue(sp, "a@b.test", ["x@y.test"])).id
        assert store.data_path(qid).read_bytes() == body
        assert EnvelopeRecord.from_json(store.env_path(qid).read_bytes()).id == qid
        assert not store._spools and not journal.unplaced
        assert sp.closed and not sp.path.exists()
    finally:
        committer.close()


def test_past_the_limit_of_held_items_new_ones_are_placed_at_once(tmp_path: Path) -> None:
    """Each held item keeps two descriptors open: a burst to a slow destination must not run
    the process out of them, so past ``held_max`` an item is put in place as it is accepted."""
    store, committer, _journal = _journaled_store(tmp_path)
    try:
        store.held_max = 1
        held = _enqueue(store, b"Subject: 1\r\n\r\none\r\n")
        placed = _enqueue(store, b"Subject: 2\r\n\r\ntwo\r\n")
        assert list(store._spools) == [held]
        assert os.listdir(store.data) == [placed] and store.data_file(placed) == store.data_path(placed)
        assert store.data_path(placed).read_bytes() == b"Subject: 2\r\n\r\ntwo\r\n"
        assert store.remove_many([held, placed]) == {held, placed}
        assert os.listdir(store.data) == [] and os.listdir(store.env) == []
    finally:
        committer.close()


def test_an_envelope_rewrite_places_the_item_and_lets_its_spools_go(tmp_path: Path) -> None:
    """A delivery attempt that leaves the item queued rewrites its envelope: the item gets its
    names then, and its temp files are released (no descriptor held for a long-queued item)."""
    store, committer, journal = _journaled_store(tmp_path)
    try:
        body = b"Subject: q\r\n\r\ndeferred\r\n"
        qid = _enqueue(store, body)
        spools = store._spools[qid]
        rec = store.load(qid)
        assert rec is not None
        rec.recipients[0].attempts = 1
        assert store.save(rec)
        assert qid not in store._spools and not journal.unplaced
        assert all(sp.closed and not sp.path.exists() for sp in spools)
        assert store.data_path(qid).read_bytes() == body and store.data_file(qid) == store.data_path(qid)
        loaded = store.load(qid)
        assert loaded is not None and loaded.recipients[0].attempts == 1
    finally:
        committer.close()


def test_a_journaled_item_lost_in_a_crash_comes_back_whole(tmp_path: Path) -> None:
    store, committer, journal = _journaled_store(tmp_path)
    body = b"Subject: q\r\n\r\nqueued once\r\n"
    qid = _placed(store, _enqueue(store, body))  # placed by a checkpoint whose flush the crash cut
    never = _enqueue(store, b"Subject: n\r\n\r\nnever placed\r\n")
    env = store.env_path(qid).read_bytes()
    assert {t for targets, _ in records(journal.path) for t in targets} == {
        f"queue/data/{qid}", f"queue/env/{qid}.json", f"queue/data/{never}", f"queue/env/{never}.json"}
    crash_committer(committer)
    # An operating-system crash lost what no flush had covered: the links and the blocks.
    os.unlink(store.env_path(qid))
    store.data_path(qid).write_bytes(b"\0" * len(body))

    report = replay_all(tmp_path)
    assert (report.restored, report.rewritten) == (3, 1)
    assert store.data_path(qid).read_bytes() == body
    assert store.env_path(qid).read_bytes() == env
    assert store.data_path(never).read_bytes() == b"Subject: n\r\n\r\nnever placed\r\n"
    assert QueueStore(tmp_path).recover() is not None and sorted(QueueStore(tmp_path).ids()) == sorted([qid, never])


def test_a_removal_recorded_in_the_journal_is_finished_not_undone_after_a_crash(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Delivered within milliseconds: removed with no flush, the removal recorded in the journal.
    A kill before the checkpoint must neither bring the item back (delivered twice) nor leave
    half of it."""
    import serpentmail.queue.store as store_mod

    store, committer, journal = _journaled_store(tmp_path)
    a = _enqueue(store, b"Subject: a\r\n\r\nfirst\r\n")
    b = _placed(store, _enqueue(store, b"Subject: b\r\n\r\nsecond\r\n"))
    synced: list[Path] = []
    with monkeypatch.context() as m:
        m.setattr(store_mod, "fsync_dir", synced.append)
        assert store.remove_many([a]) == {a}
    assert synced == []  # no flush: the next checkpoint covers the removal
    assert not store.env_path(a).exists() and not store.data_path(a).exists()
    # A crash between the removal record and the files going: the replay finishes the job.
    with journal.lock:
        journal.append_removal([store.env_path(b), store.data_path(b)])
    crash_committer(committer)

    report = replay_all(tmp_path)
    assert (report.restored, report.rewritten, report.removed) == (0, 0, 2)
    assert list(QueueStore(tmp_path).ids()) == [] and list(store.data.iterdir()) == []


def test_an_item_a_checkpoint_covered_is_removed_durably(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import serpentmail.queue.store as store_mod

    store, committer, journal = _journaled_store(tmp_path)
    qid = _enqueue(store, b"Subject: c\r\n\r\ndeferred a while\r\n")
    journal.checkpoint()  # its records are redundant now: a removal must not rely on them
    synced: list[Path] = []
    with monkeypatch.context() as m:
        m.setattr(store_mod, "fsync_dir", synced.append)
        assert store.remove_many([qid]) == {qid}
    assert synced == [store.env]
    assert list(records(journal.path)) == []  # no removal record either
    committer.close()


def test_a_rewritten_envelope_is_left_alone_by_the_replay(tmp_path: Path) -> None:
    """Delivery attempts rewrite the envelope with the durable recipe: the journal's first
    version must not overwrite it (recipients already done would get the mail again)."""
    store, committer, _ = _journaled_store(tmp_path)
    qid = _enqueue(store, b"Subject: r\r\n\r\nrewritten\r\n")
    rec = store.load(qid)
    assert rec is not None
    rec.recipients[0].state = "delivered"
    store.save(rec)
    crash_committer(committer)

    report = replay_all(tmp_path)
    assert (report.restored, report.rewritten, report.intact) == (0, 0, 2)
    again = store.load(qid)
    assert again is not None and again.recipients[0].state == "delivered"


def test_only_a_journaling_store_takes_the_journal(tmp_path: Path) -> None:
    """Another worker's items are removed by the primary: they keep the durable recipe."""
    journal = Journal(tmp_path / "journal" / "w1.log", tmp_path)
    committer = Committer(journal=journal)
    store = QueueStore(tmp_path, committer)
    try:
        _enqueue(store, b"Subject: f\r\n\r\nforwarded\r\n")
        assert list(records(journal.path)) == []
    finally:
        committer.close()


def test_an_envelope_showing_another_items_bytes_is_written_again(tmp_path: Path) -> None:
    """After a power cut a reused file can show the blocks of the envelope it held before:
    valid JSON, but not this item's."""
    store, committer, _ = _journaled_store(tmp_path)
    old = _placed(store, _enqueue(store, b"Subject: o\r\n\r\nold\r\n"))
    qid = _placed(store, _enqueue(store, b"Subject: n\r\n\r\nnew\r\n"))
    env = store.env_path(qid).read_bytes()
    crash_committer(committer)
    store.env_path(qid).write_bytes(store.env_path(old).read_bytes())

    report = replay_all(tmp_path)
    assert report.rewritten == 1
    assert store.env_path(qid).read_bytes() == env


def test_an_item_in_a_running_checkpoint_is_removed_only_once_it_has_ended(tmp_path: Path) -> None:
    """Its records are in the checkpoint's snapshot but stay pending until its flush ends: a
    durable removal before that, then a crash, and the replay would send the item again."""
    import threading
    import time

    store, committer, journal = _journaled_store(tmp_path)
    qid = _enqueue(store, b"Subject: s\r\n\r\nstraddles a checkpoint\r\n")
    real, entered = journal.flush_fs, threading.Event()

    def slow_syncfs(fd: int) -> None:
        entered.set()
        time.sleep(0.3)
        real(fd)

    journal.flush_fs = slow_syncfs
    flush = threading.Thread(target=journal.checkpoint)
    flush.start()
    assert entered.wait(5)
    assert store.remove_many([qid]) == {qid}
    assert list(records(journal.path)) == []  # the checkpoint had ended before the files went
    flush.join()
    committer.close()
