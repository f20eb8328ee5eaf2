"""``python3 -m bench.micro {files,scan,flush,dns,session}``: the microbenchmarks quoted in bench/README.md.

Small, single-threaded timings of the primitives a change was chosen on. They need no peer
and no server, and print a table. They are not the benchmark itself, only the evidence for
picking one primitive over another (``python3 -m bench`` and ``python3 -m bench.ab`` measure
the server):

* ``files``: emptying a kept 4 KiB file and writing the next message into it, four ways:
  truncate then write (the Recycler at first), ``FALLOC_FL_ZERO_RANGE`` then write over,
  zeros written over it then write over, and plain overwrite (no blanking). CPU (this process)
  and wall time per file, ``sync`` included.
* ``scan``: what the SMTP DATA path does to a 100 KiB message: the bare CR/LF check, the
  terminator search, and the two ways to copy a chunk out of a bytearray.
* ``flush``: ``pwrite`` + ``fdatasync`` of 4 KiB and 100 KiB records into a sparse, a
  fallocated and a written file (the delivery journal's first lap against later ones), and
  the journal's way since session 21 into the written file: whole blocks with ``O_DIRECT`` and
  ``RWF_DSYNC`` from an aligned buffer. ``--busy`` times them while another process writes
  100 KiB files (about 40 MB/s) with a ``syncfs`` every second, as the mailboxes' own files
  are written back beside a server's journal. ``--pace MS`` waits between appends, as they
  come at one session (each then starts on an idle machine), and ``--cpu N`` runs on one CPU:
  on a VM, the CPU that takes the disk's interrupts (``/proc/interrupts``) waits less for
  each completion than the other one.
* ``session``: the CPU of each step of an inbound SMTP session (connect, EHLO, NOOP, MAIL,
  RCPT, RSET, QUIT), driven in this process through the server's own session class with a
  stand-in transport (no network, no disk): back to back ("hot"), and after copying 16 MiB
  before each step ("cold": the L1 and L2 caches, 4 MiB here, and the TLB then hold other
  data), as a lone client's commands find them on a VM where each one arrives on an idle
  vCPU. Run it with ``PYTHONPATH`` set to a build (``bench.common.build_package``) to time
  the compiled modules.
* ``dns``: the remote courier's MX lookup (MX, then A and AAAA of the exchanger) against the
  sandbox DNS server in a process of its own on 127.0.5.53, with the answer cache off
  (``cache_max_ttl = 0``) and on: CPU of this process and wall time per lookup.

The files go under ``--dir`` (default /var/tmp), which should be on the disk the server uses.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
import time
import timeit
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table

from serpentmail.proto.smtp_server import _find_line_dot
from serpentmail.storage import fsutil

from .common import DnsProcess


def _files(where: Path, n: int = 500, rounds: int = 3) -> Table:
    data = os.urandom(4300)
    paths = [where / f"f{i}" for i in range(n)]
    for p in paths:
        p.write_bytes(data)
    os.sync()

    def one(mode: str) -> tuple[float, float]:
        c0, t0 = time.process_time(), time.perf_counter()
        for p in paths:
            if mode == "truncate":
                os.truncate(p, 0)
            elif mode == "zero range":
                fsutil.blank(p)
            elif mode == "zero write":
                fd = os.open(p, os.O_WRONLY)
                try:
                    os.pwrite(fd, bytes(os.fstat(fd).st_size), 0)
                finally:
                    os.close(fd)
        for p in paths:
            fd = os.open(p, os.O_RDWR)
            try:
                os.write(fd, data)
                os.ftruncate(fd, len(data))
            finally:
                os.close(fd)
        os.sync()
        return (time.process_time() - c0) / n * 1e6, (time.perf_counter() - t0) / n * 1e6

    got: dict[str, list[tuple[float, float]]] = {m: [] for m in ("truncate", "zero range", "zero write", "overwrite")}
    for _ in range(rounds):
        for mode in got:
            got[mode].append(one(mode))
    table = Table(title=f"empty a 4 KiB file and write the next message into it ({n} files, {rounds} rounds, medians)")
    for col in ("way", "CPU µs/file", "wall µs/file"):
        table.add_column(col, justify="right" if col != "way" else "left")
    for mode, rows in got.items():
        table.add_row(mode, f"{statistics.median(r[0] for r in rows):.0f}", f"{statistics.median(r[1] for r in rows):.0f}")
    if not fsutil._zero_range_works:
        table.caption = "this filesystem has no FALLOC_FL_ZERO_RANGE: 'zero range' truncated"
    return table


def _scan() -> Table:
    data = (b"X" * 78 + b"\r\n") * 1280  # 100 KiB of lines, no dots
    buf = bytearray(data)
    table = Table(title="SMTP DATA primitives on 100 KiB (µs per call, median of 3 runs of 1,000)")
    table.add_column("operation")
    table.add_column("µs", justify="right")

    def timed(name: str, fn: Callable[[], object]) -> None:
        runs = [timeit.timeit(fn, number=1000) / 1000 * 1e6 for _ in range(3)]
        table.add_row(name, f"{statistics.median(runs):.1f}")

    # First, while nothing else big is allocated: the copy of a bytearray slice is slow when
    # glibc can give the heap's top back after each call (as in a process like this one).
    timed("copy out: bytes(buf[:n])", lambda: bytes(buf[: len(buf) - 2]))
    timed("copy out: bytes(memoryview(buf)[:n])", lambda: bytes(memoryview(buf)[: len(buf) - 2]))
    timed("bare CR/LF check: translate(None, CRLF)", lambda: data.translate(None, b"\r\n"))
    timed("bare CR/LF check: count(CRLF)", lambda: data.count(b"\r\n"))
    timed("line-start dot search: find(CRLF.), no dots", lambda: buf.find(b"\r\n."))
    timed("line-start dot search: memchr + windows, no dots", lambda: _find_line_dot(buf))
    text = bytearray(b"Hello. This is a line of text, with a dot.\r\n" * 2300)  # a dot on every line
    timed("line-start dot search: find(CRLF.), dotted text", lambda: text.find(b"\r\n."))
    timed("line-start dot search: memchr + windows, dotted text", lambda: _find_line_dot(text))
    return table


_BUSY_WRITER = """
import ctypes, os, sys, time
libc = ctypes.CDLL(None)
d = sys.argv[1]
data = b"y" * 102400
i, last = 0, time.monotonic()
while True:
    fd = os.open(f"{d}/f{i % 2000}", os.O_WRONLY | os.O_CREAT, 0o600)
    os.pwrite(fd, data, 0)
    os.close(fd)
    i += 1
    time.sleep(0.002)
    if time.monotonic() - last > 1:
        fd = os.open(d, os.O_RDONLY)
        libc.syncfs(fd)
        os.close(fd)
        last = time.monotonic()
"""


def _flush(where: Path, count: int = 150, busy: bool = False, pace: float = 0.0) -> Table:
    import mmap
    import subprocess
    import sys

    title = f"one durable journal append, {count} records each (p50 µs)"
    if busy:
        title += ", beside a busy writer"
    if pace:
        title += f", one every {pace * 1000:g} ms"
    try:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < (os.cpu_count() or 1):
            title += f", on CPU {','.join(map(str, cpus))}"
    except (AttributeError, OSError):
        pass
    table = Table(title=title)
    table.add_column("file")
    table.add_column("write")
    table.add_column("4 KiB", justify="right")
    table.add_column("100 KiB", justify="right")
    writer = None
    if busy:
        (where / "busy").mkdir()
        writer = subprocess.Popen([sys.executable, "-c", _BUSY_WRITER, str(where / "busy")])
        time.sleep(1.5)
    try:
        for kind, direct in (("sparse", False), ("fallocated", False), ("written", False), ("written", True)):
            path = where / f"journal-{kind}"
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            dfd = -1
            try:
                size = 32 << 20
                if kind == "sparse":
                    os.ftruncate(fd, size)
                elif kind == "fallocated":
                    os.posix_fallocate(fd, 0, size)
                else:
                    os.pwrite(fd, bytes(size), 0)
                os.fsync(fd)
                write = "O_DIRECT + RWF_DSYNC" if direct else "pwrite + fdatasync"
                if direct:
                    try:
                        dfd = os.open(path, os.O_WRONLY | os.O_DIRECT)
                    except OSError as exc:  # the server's journal falls back to the page cache here
                        table.add_row(kind, write, f"refused: {exc.strerror}", "")
                        continue
                cells = []
                for rec, start in ((4096, 1 << 20), (102400, 4 << 20)):
                    buf = os.urandom(rec)
                    aligned = mmap.mmap(-1, rec + 8192)
                    off = start
                    lat = []
                    for _ in range(count):
                        t = time.perf_counter()
                        if direct:  # as Journal._append_direct: from the block boundary, padded
                            first = off - off % 4096
                            n = -(-(off + rec - first) // 4096) * 4096
                            aligned[off - first:off - first + rec] = buf
                            os.pwritev(dfd, [memoryview(aligned)[:n]], first, os.RWF_DSYNC)
                        else:
                            os.pwrite(fd, buf, off)
                            os.fdatasync(fd)
                        lat.append(time.perf_counter() - t)
                        off += rec + 85  # records are not block-aligned
                        if pace:
                            time.sleep(pace)
                    cells.append(f"{statistics.median(lat) * 1e6:.0f}")
                table.add_row(kind, write, *cells)
            finally:
                if dfd >= 0:
                    os.close(dfd)
                os.close(fd)
                path.unlink()
    finally:
        if writer is not None:
            writer.kill()
            writer.wait()
    return table


def _dns(count: int = 300) -> Table:
    from serpentmail.config import Endpoint
    from serpentmail.delivery.dns import DNSResolver

    table = Table(title=f"resolve_mx of one domain, {count} times (µs per lookup)")
    for col in ("cache", "CPU", "wall", "answers from the cache"):
        table.add_column(col, justify="right" if col != "cache" else "left")
    server = DnsProcess({"winview.test": {"MX": ["10 mx1.winview.test"]}, "mx1.winview.test": {"A": ["127.0.5.2"]}},
                        host="127.0.5.53")
    try:
        async def run(max_ttl: float) -> tuple[float, float, int]:
            r = DNSResolver([Endpoint(server.host, server.port)], 3.0, cache_max_ttl=max_ttl)
            await r.resolve_mx("winview.test")
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(count):
                res = await r.resolve_mx("winview.test")
                assert res.kind == "mx"
            return (time.process_time() - c0) / count, (time.perf_counter() - t0) / count, r.cache_hits

        for label, max_ttl in (("off", 0.0), ("on (TTL 300 s)", 3600.0)):
            cpu, wall, hits = asyncio.run(run(max_ttl))
            table.add_row(label, f"{cpu * 1e6:.0f}", f"{wall * 1e6:.0f}", f"{hits:,}")
    finally:
        server.stop()
    return table


class _Transport:
    """Enough of an asyncio transport for a session: what it writes is kept."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.sent.append(data)

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("192.0.2.1", 40000) if name == "peername" else default

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def _session(where: Path, rounds: int = 400) -> Table:
    from dataclasses import replace

    import uvloop

    from serpentmail.accounts.db import AccountDB
    from serpentmail.config import Listener, embedded_default
    from serpentmail.server.context import ServerContext
    from serpentmail.server.smtp import SMTPSession
    from serpentmail.storage.maildir import Committer

    none = Listener(())
    cfg = replace(embedded_default(where), hostname="mx.bench.test", default_domains=(), smtp=none,
                  submission=none, submissions=none, pop3=none, pop3s=none)
    db = AccountDB(cfg.db_path)
    db.ensure_domain("bench.test")
    db.add_user("u@bench.test", "bench-password")
    steps = [("EHLO", b"EHLO client.test\r\n"), ("NOOP", b"NOOP\r\n"), ("MAIL", b"MAIL FROM:<s@client.test>\r\n"),
             ("RCPT", b"RCPT TO:<u@bench.test>\r\n"), ("RSET", b"RSET\r\n"), ("QUIT", b"QUIT\r\n")]
    junk, junk_copy = bytearray(16 * 1024 * 1024), bytearray(16 * 1024 * 1024)
    times: dict[str, tuple[list[int], list[int]]] = {name: ([], []) for name in ["connect", *(n for n, _ in steps)]}

    def flush_caches(cold: bool) -> None:
        if cold:  # a 16 MiB copy between buffers made once (see the module docstring)
            junk_copy[:] = junk

    async def run() -> None:
        committer = Committer()
        ctx = ServerContext(cfg, AccountDB(cfg.db_path), committer, None)
        for cold, n in ((False, rounds * 10), (True, rounds)):  # all the hot rounds, then the cold ones
            for i in range(n):
                flush_caches(cold)
                t0 = time.perf_counter_ns()
                session = SMTPSession(ctx, "smtp")
                session.connection_made(_Transport())  # type: ignore[arg-type]
                took = [time.perf_counter_ns() - t0]
                for _, line in steps:
                    flush_caches(cold)
                    t0 = time.perf_counter_ns()
                    session.data_received(line)
                    took.append(time.perf_counter_ns() - t0)
                session.connection_lost(None)
                if i >= n // 10:  # the first ones warm up
                    for name, ns in zip(times, took, strict=True):
                        times[name][cold].append(ns)
        sweep = getattr(ctx, "idle_sweep", None)  # (a build from before session 23 has none)
        if sweep is not None:
            sweep.cancel()
        committer.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(run())
    import serpentmail.server.session as session_module

    compiled = not session_module.__file__.endswith(".py") if session_module.__file__ else False
    table = Table(title=f"one SMTP session's steps, CPU µs (p50; {'compiled' if compiled else 'pure Python'} modules)")
    for col in ("step", "hot", "cold"):
        table.add_column(col, justify="right")
    total = [0.0, 0.0]
    for name, (hot, cold) in times.items():
        h, c = statistics.median(hot) / 1000, statistics.median(cold) / 1000
        total[0] += h
        total[1] += c
        table.add_row(name, f"{h:.2f}", f"{c:.1f}")
    table.add_row("sum", f"{total[0]:.2f}", f"{total[1]:.1f}")
    return table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.micro", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["files", "scan", "flush", "dns", "session"])
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp"), help="where to make the test files")
    ap.add_argument("--busy", action="store_true", help="flush: time the appends beside a process writing files")
    ap.add_argument("--pace", type=float, default=0.0, metavar="MS",
                    help="flush: wait this long between appends, as a server at one session does (1.2)")
    ap.add_argument("--cpu", type=int, default=None,
                    help="run on this CPU only (flush: compare the disk interrupt's CPU with another)")
    args = ap.parse_args(argv)
    if args.cpu is not None:
        try:
            os.sched_setaffinity(0, {args.cpu})
        except (AttributeError, OSError) as exc:
            ap.error(f"--cpu {args.cpu}: {exc}")
    console = Console()
    if args.what in ("scan", "dns"):
        console.print(_scan() if args.what == "scan" else _dns())
        return 0
    where = Path(tempfile.mkdtemp(prefix="serpentmail-micro-", dir=args.dir))
    try:
        if args.what == "session":
            console.print(_session(where))
        else:
            console.print(_files(where) if args.what == "files" else _flush(where, busy=args.busy, pace=args.pace / 1000))
    finally:
        shutil.rmtree(where, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
