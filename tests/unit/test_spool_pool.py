"""SpoolPool: temp files made ahead of need in a worker thread, handed out on the event loop."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from serpentmail.storage.maildir import SpoolFile, SpoolPool


def test_spares_are_made_in_a_thread_and_renamed_into_place_when_taken(tmp_path: Path) -> None:
    spare_dir, live = tmp_path / "spare", tmp_path
    spare_dir.mkdir()
    made_in: set[str] = set()

    class Watching(SpoolPool):
        def make(self, n: int) -> list[SpoolFile]:
            made_in.add(threading.current_thread().name)
            return super().make(n)

    pool = Watching(spare_dir, 4, hand_out_in=live)

    async def go() -> list[SpoolFile]:
        first = pool.take()  # the pool is empty: made inline, and a refill starts
        await asyncio.sleep(0.2)
        return [first, *(pool.take() for _ in range(3))]

    spools = asyncio.run(go())
    assert made_in and threading.main_thread().name not in made_in
    names = [s.name for s in spools]
    assert len(set(names)) == 4
    for s in spools:
        assert s.path.parent == live and s.path.name == s.name and s.path.exists()
        s.write(b"x")
        assert s.size == 1
    # named when taken, so Maildir unique names follow the order messages arrive in
    assert names[1:] == sorted(names[1:], key=lambda n: int(n.split("Q")[1].split(".")[0]))
    for s in spools:
        s.discard()
    left = len(list(spare_dir.iterdir()))
    assert left == len(pool) > 0
    pool.close()
    assert list(spare_dir.iterdir()) == [] and [p for p in live.iterdir() if p.is_file()] == []
