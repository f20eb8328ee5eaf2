"""``python -m bench.paths``: where one inbound session's time and CPU go, from the kernel's view.

Runs serpentmail (the working tree, built as ``pip install .`` builds it) under scenario 1's
load at one session (smtp-source, one 4 KiB message per connection) and prints two tables:

* **timeline**: the system calls of the worker that serves the connections, one session
  after the other, as the median time between each call's entry and exit and the next call's
  entry. The gaps between a call's exit and the next entry are the server's own work
  between them (Python, compiled or not); a ``write`` to the client's socket includes
  running the client's TCP input and waking it; an ``epoll_pwait`` that blocks is the client's
  turn. Recorded with ``perf record -e syscalls:*`` (tracepoints: a few microseconds each,
  not ptrace's tens).
* **interpreted**: the share of the server's CPU samples spent in Python code that is not
  compiled, called from code that is (``perf record --call-graph dwarf``, each sample's
  nearest mypyc function above the interpreter's frame). mypyc compiles serpentmail's
  modules, but a call into the standard library's Python code (pathlib, os.fsencode,
  logging, asyncio's executor machinery) runs in the interpreter; this finds such calls on
  the message path. Session 24 found Paths made per message, ``os.fsencode``, the logging
  handler's lock and flush methods and ``asyncio.to_thread`` this way (5.3% of the
  samples before, 0.8% after: bench/profiles/inbound-1session-paths.txt).

    python3 -m bench.paths                    # 1,000 messages, both tables
    python3 -m bench.paths --build /tmp/b     # a build made earlier (bench.common.build_package)

Needs ``perf`` (Debian: linux-perf) and root; run it under ``taskset -c 0,1`` where a
session's commands start pinned to one CPU.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .common import Unavailable, build_package, descendants, remove_tree
from .scenarios import _inbound_once
from .servers import Serpent

REPO = Path(__file__).resolve().parent.parent
SYSCALLS = ("accept4", "read", "write", "pwritev2", "close", "rename", "epoll_pwait", "epoll_ctl", "newfstatat")
_EVENT = re.compile(r"\s*(\d+)\s+([\d.]+):\s+syscalls:sys_(enter|exit)_(\w+):")
_FRAME = re.compile(r"\s*[0-9a-f]+ (.*?)(?: \((.*)\))?$")


def _record(server: Serpent, args: list[str], out: Path, count: int) -> None:
    """``perf record ARGS`` on the server's processes while ``count`` messages go in."""
    pids = ",".join(str(p) for p in [server.pid, *descendants(server.pid)])
    perf = subprocess.Popen(["perf", "record", "-q", "-o", str(out), *args, "-p", pids],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    try:
        _inbound_once(server, 1, count, 4096)
    finally:
        perf.send_signal(2)
        perf.wait(timeout=120)
    if not out.exists():
        raise Unavailable("perf recorded nothing (is it allowed here? try as root)")


def timeline(data: Path) -> tuple[list[tuple[str, str, float]], int, int]:
    """The median gap between consecutive system-call events of the worker that accepted the
    most connections, over the sessions whose calls came in the most common order; the
    sessions counted and the sessions seen."""
    text = subprocess.run(["perf", "script", "-i", str(data), "-F", "tid,time,event"],
                          capture_output=True, text=True, check=True).stdout
    events = [(int(m[1]), float(m[2]), m[3], m[4]) for m in map(_EVENT.match, text.splitlines()) if m]
    accepts = collections.Counter(tid for tid, _, kind, call in events if call == "accept4" and kind == "enter")
    if not accepts:
        return [], 0, 0
    busiest = accepts.most_common(1)[0][0]
    sessions: list[list[tuple[float, str]]] = []
    for tid, when, kind, call in events:
        if tid != busiest:
            continue
        if call == "accept4" and kind == "enter":
            sessions.append([])
        if sessions:
            sessions[-1].append((when, f"{kind[:2]}:{call}"))
    shapes = collections.Counter(tuple(name for _, name in s) for s in sessions)
    shape, _ = shapes.most_common(1)[0]
    gaps: list[list[float]] = [[] for _ in shape]
    kept = 0
    for s in sessions:
        if tuple(name for _, name in s) != shape:
            continue
        kept += 1
        for i in range(1, len(s)):
            gaps[i].append((s[i][0] - s[i - 1][0]) * 1e6)
    rows = [(shape[i - 1], shape[i], statistics.median(gaps[i])) for i in range(1, len(shape))]
    return rows, kept, len(sessions)


def interpreted(data: Path) -> tuple[list[tuple[str, float]], float, int]:
    """Per compiled caller, the share of all samples in interpreted code it called; the total
    share; the number of samples."""
    text = subprocess.run(["perf", "script", "-i", str(data), "-F", "comm,tid,ip,sym,dso"],
                          capture_output=True, text=True, check=True).stdout
    by_caller: collections.Counter[str] = collections.Counter()
    samples = 0
    for block in text.split("\n\n"):
        frames = [m[1] for m in map(_FRAME.match, block.strip().splitlines()[1:]) if m]
        if not frames:
            continue
        samples += 1
        for i, name in enumerate(frames):  # leaf first
            if name.startswith("CPyDef_"):
                if any("_PyEval_EvalFrameDefault" in f for f in frames[:i]):
                    by_caller[name.removeprefix("CPyDef_")] += 1
                break
    total = sum(by_caller.values()) * 100 / max(samples, 1)
    return [(k, v * 100 / max(samples, 1)) for k, v in by_caller.most_common(15)], total, samples


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.paths", description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", type=Path, help="a build to run (default: build the working tree)")
    ap.add_argument("--count", type=int, default=1000, help="messages per recording")
    args = ap.parse_args()
    console = Console()
    if shutil.which("perf") is None:
        raise SystemExit("perf is not installed (Debian: apt-get install linux-perf)")
    work = Path(tempfile.mkdtemp(prefix="bench-paths-", dir="/var/tmp"))
    work.chmod(0o755)
    server: Serpent | None = None
    try:
        build = args.build
        if build is None:
            build = work / "build"
            with console.status("building the working tree (mypyc: a minute or two)"):
                if not build_package(REPO, build):
                    console.print("[yellow]nothing was compiled: the interpreted share is everything")
        server = Serpent(work / "serpent")
        server.setup()
        server.start(build)
        _inbound_once(server, 1, 300, 4096)  # warm up
        with console.status("recording system calls"):
            events = ",".join(f"syscalls:sys_{k}_{c}" for c in SYSCALLS for k in ("enter", "exit"))
            _record(server, ["-e", events], work / "calls.data", args.count)
        rows, kept, seen = timeline(work / "calls.data")
        table = Table(title=f"one session's system calls (median µs; {kept} of {seen} sessions in this order)")
        for col in ("#", "from", "to", "µs"):
            table.add_column(col, justify="right" if col in ("#", "µs") else "left")
        for i, (a, b, us) in enumerate(rows, 1):
            table.add_row(str(i), a, b, f"{us:.0f}")
        console.print(table)
        with console.status("recording call graphs"):
            _record(server, ["-F", "4000", "--call-graph", "dwarf,16384"], work / "graph.data", args.count)
        callers, total, samples = interpreted(work / "graph.data")
        table = Table(title=f"interpreted code called from compiled code: {total:.1f}% of {samples} samples")
        table.add_column("compiled caller")
        table.add_column("% of samples", justify="right")
        for name, share in callers:
            table.add_row(name, f"{share:.2f}")
        console.print(table)
    except Unavailable as exc:
        raise SystemExit(f"bench.paths: {exc}") from None
    finally:
        if server is not None:
            server.stop()
        remove_tree(work)


if __name__ == "__main__":
    main()
