"""The remote courier reads a queued message file in chunks: whole, in order, whatever the
size hint says (the hint only sizes the first read)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from serpentmail.delivery.remote import CHUNK, _Chunks, _open_and_read


async def _collect(path: Path, hint: int, fd: int = -1) -> list[bytes]:
    chunks = _Chunks(path, hint, fd)
    out = []
    while (chunk := await chunks.next()) is not None:
        out.append(chunk)
    assert chunks.f is None  # closed at the end
    return out


@pytest.mark.parametrize(("size", "hint"), [
    (0, 0), (1, 1), (1500, 1500), (1500, 10), (1500, 0), (1500, 99999),
    (CHUNK, CHUNK), (CHUNK + 7, CHUNK + 7), (CHUNK + 7, 100), (2 * CHUNK + 3, 2 * CHUNK + 3),
])
def test_chunks_are_the_whole_file(tmp_path: Path, size: int, hint: int) -> None:
    data = bytes(i % 251 for i in range(size))
    path = tmp_path / "msg"
    path.write_bytes(data)
    chunks = asyncio.run(_collect(path, hint))
    assert b"".join(chunks) == data
    assert all(chunks) and all(len(c) <= CHUNK for c in chunks)
    if hint >= size:  # the usual case, the hint is the queued size: full chunks, as before
        assert [len(c) for c in chunks] == [min(CHUNK, size - i) for i in range(0, size, CHUNK)]


@pytest.mark.parametrize(("size", "hint"), [(0, 0), (21, 21), (21, 5), (1500, 1500), (CHUNK + 7, CHUNK + 7)])
def test_an_open_descriptor_is_read_whole_whatever_the_hint(tmp_path: Path, size: int, hint: int) -> None:
    """A held spool's descriptor (Envelope.data_fd): a small message is one pread from the
    start, whatever the descriptor's position; a file longer than said falls back to the path."""
    import os

    data = bytes(i % 251 for i in range(size))
    path = tmp_path / "msg"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDWR)
    try:
        os.lseek(fd, 0, os.SEEK_END)
        assert b"".join(asyncio.run(_collect(path, hint, fd))) == data
        os.fstat(fd)  # still open: the descriptor is the queue's, not the reader's
    finally:
        os.close(fd)


def test_small_message_is_closed_after_one_read(tmp_path: Path) -> None:
    path = tmp_path / "msg"
    path.write_bytes(b"Subject: x\r\n\r\nbody\r\n")
    f, chunk = _open_and_read(path, 20)
    assert f is None and chunk == b"Subject: x\r\n\r\nbody\r\n"
    f, chunk = _open_and_read(path, 3)  # the hint was short: the rest is still readable
    assert f is not None
    try:
        assert chunk == b"Subj" and f.read(CHUNK) == b"ect: x\r\n\r\nbody\r\n"
    finally:
        f.close()


def test_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        _open_and_read(tmp_path / "gone", 10)
