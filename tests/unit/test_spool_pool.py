"""SpoolPool: temp files made ahead of need in a worker thread, handed out on the event loop."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from serpentmail.storage.maildir import SpoolFile, SpoolPool
from tests.helpers import watch_creations


def test_spares_are_made_in_a_thread_and_named_when_taken(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spare_dir = tmp_path / "spare"
    spare_dir.mkdir()
    made_in = watch_creations(monkeypatch, spare_dir)
    pool = SpoolPool(spare_dir, 4)

    taken_at = 0.0

    async def go() -> list[SpoolFile]:
        nonlocal taken_at
        first = pool.take()  # the pool is empty: made inline, and a refill starts
        await asyncio.sleep(0.2)  # the spares are made (and first named) now
        taken_at = time.time()
        return [first, *(pool.take() for _ in range(3))]

    spools = asyncio.run(go())
    main = threading.main_thread().name
    assert made_in[0] == main and len(made_in) > 1 and main not in made_in[1:]  # the first inline
    names = [s.name for s in spools]
    assert len(set(names)) == 4
    for s in spools:
        assert s.path.parent == spare_dir and s.path.exists()  # written where it was made
        s.write(b"x")
        assert s.size == 1
    # named when taken, so Maildir unique names carry the time the message began and follow
    # the order messages arrive in
    for n in names[1:]:
        sec, _, rest = n.partition(".M")
        assert int(sec) + int(rest.split("P")[0]) / 1e6 >= taken_at - 0.001
    assert names[1:] == sorted(names[1:], key=lambda n: int(n.split("Q")[1].split(".")[0]))
    for s in spools:
        s.discard()
    left = len(list(spare_dir.iterdir()))
    assert left == len(pool) > 0
    filler = pool._filler  # the pool's refill thread
    assert filler is not None and filler.is_alive() and filler.name == "spool-pool"
    pool.close()
    assert list(spare_dir.iterdir()) == []
    assert not filler.is_alive()  # it ended with the pool: a server's stop leaves no thread behind


def test_a_spool_given_back_is_written_over_and_keeps_only_its_new_pieces(tmp_path: Path) -> None:
    """give(): a delivered queue item's spool goes back to the pool as it is. Its next message
    is written over the old one from the start, and what it keeps for the journal's record
    (``kept``) is that message alone."""
    from serpentmail.storage.maildir import _read_spool

    pool = SpoolPool(tmp_path, 4)
    first = SpoolFile(tmp_path)
    first.write(b"an earlier, longer message\r\n")
    pool.give(first)

    async def take() -> SpoolFile:  # take() runs on the event loop
        return pool.take()

    again = asyncio.run(take())
    assert again is first
    again.write(b"the next one\r\n")
    assert again.kept == [b"the next one\r\n"]  # the record comes from memory, not a read back
    assert _read_spool(again) == [b"the next one\r\n"]
    again.trim()  # as the commit does: what is left of the earlier message goes
    assert again.path.read_bytes() == b"the next one\r\n"


def test_a_refill_makes_files_that_each_hold_their_own_message(tmp_path: Path) -> None:
    """make(): a refill's new files (created in one call where the C module is built) are
    distinct, private, empty files, each written and read back on its own."""
    pool = SpoolPool(tmp_path, 8)
    spools = pool.make(8)
    assert len(spools) == 8 and len({s.path for s in spools}) == 8
    for i, s in enumerate(spools):
        assert s.path.parent == tmp_path and s.path.stat().st_size == 0
        assert s.path.stat().st_mode & 0o777 == 0o600
        s.write(f"message {i}\r\n".encode())
    for i, s in enumerate(spools):
        assert s.path.read_bytes() == f"message {i}\r\n".encode()
        s.discard()
    assert list(tmp_path.iterdir()) == []


def test_a_refill_that_can_make_no_file_says_why(tmp_path: Path) -> None:
    pool = SpoolPool(tmp_path / "missing", 4)
    with pytest.raises(FileNotFoundError):
        pool.make(4)


def test_a_pool_refills_in_a_forked_child_too(tmp_path: Path) -> None:
    """A worker process is forked: a pool whose refill thread was started before the fork
    starts its own in the child (the parent's thread does not come along)."""
    import os

    pool = SpoolPool(tmp_path, 4)
    pool.take().discard()  # empty: made inline, and the refill thread starts here
    deadline = time.monotonic() + 5
    while len(pool) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(pool) >= 2
    pid = os.fork()
    if pid == 0:  # the child: take until a refill is needed, then wait for it
        ok = False
        try:
            while len(pool):
                pool.take().discard()
            pool.take().discard()
            deadline = time.monotonic() + 5
            while not len(pool) and time.monotonic() < deadline:
                time.sleep(0.01)
            ok = len(pool) > 0
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    pool.close()
    assert os.waitstatus_to_exitcode(status) == 0
