"""The file operations that follow a durable journal append: storage.journal.run_ops and the
C module's write_then (serpentmail._commit, built by setup.py), which must agree."""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from serpentmail.storage import journal as jmod
from serpentmail.storage import maildir
from serpentmail.storage.journal import OP_CLOSE, OP_LINK, OP_RENAME, OP_UNLINK, FileOp, run_ops

write_then: Callable[..., tuple[int, list[int]]] | None
create_files: Callable[..., list[int]] | None
gather: Callable[..., int] | None
try:
    from serpentmail._commit import create_files, gather, write_then
except ImportError:  # an editable install builds no C module
    write_then = create_files = gather = None

needs_c = pytest.mark.skipif(write_then is None, reason="serpentmail._commit is not built (editable install)")


def _scene(root: Path) -> tuple[list[FileOp], dict[str, Path]]:
    """Three jobs: one renamed into its mailbox, one linked into two and its temp name
    removed, one whose rename fails (its mailbox is missing) so that its unlink is skipped."""
    tmp, box1, box2 = root / "tmp", root / "one" / "new", root / "two" / "new"
    for d in (tmp, box1, box2):
        d.mkdir(parents=True)
    p = {name: tmp / name for name in ("a", "b", "c")}
    fds = []
    for path in p.values():
        path.write_bytes(f"message {path.name}\r\n".encode())
        fds.append(os.open(path, os.O_RDONLY))
    p.update(a_final=box1 / "a", b1=box1 / "b", b2=box2 / "b", c_final=root / "gone" / "new" / "c")
    fs = os.fsencode
    ops: list[FileOp] = [
        (OP_CLOSE, 0, fds[0], b""), (OP_RENAME, 0, fs(p["a"]), fs(p["a_final"])),
        (OP_CLOSE, 1, fds[1], b""), (OP_LINK, 1, fs(p["b"]), fs(p["b1"])), (OP_LINK, 1, fs(p["b"]), fs(p["b2"])),
        (OP_UNLINK, 1, fs(p["b"]), b""),
        (OP_CLOSE, 2, fds[2], b""), (OP_RENAME, 2, fs(p["c"]), fs(p["c_final"])), (OP_UNLINK, 2, fs(p["c"]), b""),
    ]
    return ops, p


def _check(errors: list[int], p: dict[str, Path]) -> None:
    assert errors == [0, 0, errno.ENOENT]
    assert p["a_final"].read_bytes() == b"message a\r\n" and not p["a"].exists()
    assert p["b1"].read_bytes() == p["b2"].read_bytes() == b"message b\r\n" and not p["b"].exists()
    assert p["c"].read_bytes() == b"message c\r\n"  # its failed rename stopped its unlink


def test_run_ops_runs_each_jobs_operations_until_one_fails(tmp_path: Path) -> None:
    ops, p = _scene(tmp_path)
    _check(run_ops(ops, 3), p)
    with pytest.raises(OSError):  # and each descriptor was closed
        os.fstat(ops[0][2])  # type: ignore[arg-type]


@needs_c
def test_write_then_writes_and_runs_the_same_operations(tmp_path: Path) -> None:
    assert write_then is not None
    ops, p = _scene(tmp_path)
    target = tmp_path / "journal"
    target.write_bytes(b"\0" * 8192)
    fd = os.open(target, os.O_WRONLY)
    buf = mmap.mmap(-1, 8192)
    buf[:4096] = b"r" * 4096
    try:
        n, errors = write_then(fd, buf, 4096, 4096, 0, ops, 3)
    finally:
        os.close(fd)
    assert n == 4096
    assert target.read_bytes() == b"\0" * 4096 + b"r" * 4096
    _check(errors, p)


@needs_c
def test_write_then_runs_nothing_when_the_write_fails(tmp_path: Path) -> None:
    assert write_then is not None
    ops, p = _scene(tmp_path)
    ro = os.open(tmp_path / "tmp" / "a", os.O_RDONLY)  # writing to it fails: EBADF
    try:
        n, errors = write_then(ro, mmap.mmap(-1, 4096), 4096, 0, 0, ops, 3)
    finally:
        os.close(ro)
    assert n == -errno.EBADF and errors == [0, 0, 0]
    assert p["a"].exists() and not p["a_final"].exists() and not p["b1"].exists()
    os.fstat(ops[0][2])  # type: ignore[arg-type]  # still open: nothing ran
    for op in ops:
        if op[0] == OP_CLOSE:
            os.close(op[2])  # type: ignore[arg-type]


@needs_c
def test_write_then_refuses_bad_arguments_before_writing(tmp_path: Path) -> None:
    assert write_then is not None
    target = tmp_path / "j"
    target.write_bytes(b"")
    fd = os.open(target, os.O_WRONLY)
    try:
        buf = mmap.mmap(-1, 4096)
        with pytest.raises(ValueError):
            write_then(fd, buf, 8192, 0, 0, [], 0)  # longer than the buffer
        with pytest.raises(ValueError):
            write_then(fd, buf, 10, 0, 0, [(OP_UNLINK, 1, b"x", b"")], 1)  # no job 1
        with pytest.raises(TypeError):
            write_then(fd, buf, 10, 0, 0, [(OP_UNLINK, 0, "x", b"")], 1)  # a str path
        with pytest.raises(ValueError):
            write_then(fd, buf, 10, 0, 0, [(OP_UNLINK, 0, b"x\0y", b"")], 1)
        with pytest.raises(TypeError):
            write_then(fd, buf, 10, 0, 0, [("unlink", 0, b"x", b"")], 1)  # a kind that is no number
        with pytest.raises(TypeError):
            write_then(fd, buf, 10, 0, 0, [(OP_CLOSE, 0, b"3", b"")], 1)  # a close of no descriptor
    finally:
        os.close(fd)
    assert target.read_bytes() == b""


@pytest.mark.skipif(not os.environ.get("SERPENTMAIL_EXPECT_COMPILED"),
                    reason="only in scripts/test.sh's run against the compiled build")
def test_the_compiled_build_appends_with_write_then_and_refills_with_create_files() -> None:
    assert write_then is not None and create_files is not None
    assert jmod._write_then is write_then
    assert jmod._gather is gather
    assert maildir._create_files is create_files


@needs_c
def test_gather_copies_the_pieces_in_order_and_zeros_to_the_block() -> None:
    assert gather is not None
    buf = mmap.mmap(-1, 8192)
    buf[:] = b"\xff" * 8192  # stale bytes of an earlier record
    pieces = [b"tail-", b"", bytearray(b"head"), memoryview(b"-meta-data")]
    n = gather(buf, pieces, 4096)
    assert n == 19
    assert buf[:n] == b"tail-head-meta-data"
    assert buf[n:4096] == bytes(4096 - n)  # zeros to the block boundary: a scan stops there
    assert buf[4096:] == b"\xff" * 4096  # nothing past it
    assert gather(buf, [b"x" * 4096], 4096) == 4096 and buf[4096:4097] == b"\xff"  # a whole block: no zeros
    buf[:] = b"\xff" * 8192
    with pytest.raises(ValueError):
        gather(buf, [b"x" * 5000, b"y" * 4000], 4096)  # 12 KiB padded: does not fit
    assert buf[:] == b"\xff" * 8192  # nothing copied
    with pytest.raises(TypeError):
        gather(buf, [b"ok", "text"], 4096)
    with pytest.raises(BufferError):
        gather(b"read-only", [b"x"], 4096)


@needs_c
def test_create_files_makes_each_new_file_and_reports_the_ones_it_cannot(tmp_path: Path) -> None:
    assert create_files is not None
    (tmp_path / "taken").write_bytes(b"someone's")
    fds = create_files(os.fsencode(tmp_path), [b"one", b"taken", b"two"])
    assert fds[1] == -errno.EEXIST  # O_EXCL: an existing file is never opened as a spool
    try:
        for fd, name in ((fds[0], "one"), (fds[2], "two")):
            assert fd >= 0
            os.write(fd, b"x")
            st = os.fstat(fd)
            assert st.st_mode & 0o777 == 0o600 and st.st_ino == (tmp_path / name).stat().st_ino
    finally:
        for fd in (fds[0], fds[2]):
            os.close(fd)
    assert (tmp_path / "taken").read_bytes() == b"someone's"
    assert create_files(os.fsencode(tmp_path / "missing"), [b"a"]) == [-errno.ENOENT]
    with pytest.raises(ValueError):
        create_files(os.fsencode(tmp_path), [b"../escape"])
    assert not (tmp_path.parent / "escape").exists()
