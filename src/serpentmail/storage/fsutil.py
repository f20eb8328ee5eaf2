"""Small durable-filesystem helpers shared by the Maildir recipe, the delivery journal and the queue."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from collections.abc import Callable
from pathlib import Path

_FALLOC_FL_ZERO_RANGE = 0x10  # linux/falloc.h
_fallocate: Callable[[int, int, int, int], int] | None = None
_zero_range_works = True  # False when the C library has no fallocate
_no_zero_range: set[int] = set()  # filesystems (st_dev) that refused FALLOC_FL_ZERO_RANGE


class JournalBusy(OSError):
    """Another live process holds this journal (and replays it itself if need be). Defined
    here, in a module mypyc does not compile, since a compiled class cannot subclass OSError;
    :mod:`.journal` re-exports it."""


def fsync_dir(path: str | Path) -> None:
    """Make the entries added to or removed from directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(tmp: Path, content: bytes, final: Path) -> None:
    """The recipe for bytes in memory: ``tmp`` written and fsync'd, renamed over ``final``,
    then ``final``'s directory fsync'd. ``tmp`` is removed if a step fails."""
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(content)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(final.parent)


def blank(path: Path) -> None:
    """Make the file's content unreadable (all zeros) but keep its blocks: the next message
    written into it (see ``SpoolFile.reuse``) then allocates nothing. Emptying it with a
    truncate instead frees every block, which on the reference disk (ext4 mounted with
    ``discard``, no journal) costs about four times the CPU and five times the wall time of
    this, and the next write allocates them all again. Uses fallocate(2)'s
    ``FALLOC_FL_ZERO_RANGE`` (ext4, XFS); on a filesystem without it (tmpfs), truncates as
    before."""
    global _fallocate, _zero_range_works
    if _zero_range_works:
        if _fallocate is None:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
            fn = getattr(libc, "fallocate", None)
            if fn is None:
                _zero_range_works = False
            else:
                fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
                fn.restype = ctypes.c_int
                _fallocate = fn
        if _fallocate is not None:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                st = os.fstat(fd)
                if st.st_dev not in _no_zero_range:
                    if st.st_size == 0 or _fallocate(fd, _FALLOC_FL_ZERO_RANGE, 0, st.st_size) == 0:
                        return
                    err = ctypes.get_errno()
                    if err not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                        raise OSError(err, os.strerror(err), str(path))
                    _no_zero_range.add(st.st_dev)  # tmpfs, for one: truncate there from now on
            finally:
                os.close(fd)
    os.truncate(path, 0)
