# ruff: noqa: RUF001  (typographic signs in the report text are intended)
"""``python -m bench.ab REV``: serpentmail at git revision REV against the working tree.

How a change is measured before it is kept: two servers run side by side (REV from a
temporary ``git worktree``, the working tree as it is now), and short runs of one scenario
alternate between them, pair after pair, the order flipping each pair. The ratio is taken
within each pair, so the machine's drift between pairs cancels out. Prints a table of the
pairs and the median ratio of messages per second and of server CPU per message.

    python3 -m bench.ab HEAD                                   # inbound, 10 sessions, 4 KiB
    python3 -m bench.ab HEAD~3 --sessions 1 --count 300 --pairs 16
    python3 -m bench.ab HEAD --scenario submission --count 1000 --pairs 6 --workers 2
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .common import build_package, recent_cleanup, remove_tree, wait_count
from .scenarios import Sink, _inbound_once, _submit_load
from .servers import Serpent

REPO = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def worktree(rev: str) -> Iterator[Path]:
    """REV checked out in a temporary directory (removed afterwards)."""
    where = Path(tempfile.mkdtemp(prefix="serpentmail-ab-"))
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "--force", str(where), rev],
                   check=True, capture_output=True)
    try:
        yield where
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(where)], capture_output=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("rev", help="the revision to compare the working tree with (e.g. HEAD, HEAD~2, a hash)")
    ap.add_argument("--scenario", choices=["inbound", "submission"], default="inbound")
    ap.add_argument("--sessions", type=int, default=10, help="concurrent client sessions")
    ap.add_argument("--count", type=int, default=1500, help="messages per run")
    ap.add_argument("--size", type=int, default=4096, help="message size in octets (inbound)")
    ap.add_argument("--pairs", type=int, default=8, help="runs of each side, alternating")
    ap.add_argument("--workers", default="1", help="serpentmail's `workers` setting for both sides")
    ap.add_argument("--keep", action="store_true", help="keep the data directory (logs, mailboxes)")
    ap.add_argument("--build", choices=["none", "both", "working"], default="none",
                    help="run a side as `pip install .` builds it (mypyc-compiled modules where its "
                         "setup.py has them) instead of its sources: neither (default), both, or only "
                         "the working tree (with REV = HEAD: the compiled build against the pure sources)")
    args = ap.parse_args(argv)
    console = Console()
    settling = recent_cleanup()
    if settling:
        console.print(f"[yellow]{settling}[/]")
    root = Path(tempfile.mkdtemp(prefix="serpentmail-ab-data-", dir="/var/tmp"))
    os.chmod(root, 0o755)
    Serpent.workers = args.workers
    sink: Sink | None = None
    sides: dict[str, Serpent] = {}
    try:
        with worktree(args.rev) as old:
            if args.scenario == "submission":
                sink = Sink(root)
                sink.start()
            codes = {args.rev: old / "src", "working tree": REPO / "src"}
            for i, (name, checkout) in enumerate(((args.rev, old), ("working tree", REPO))):
                if args.build == "both" or (args.build == "working" and checkout == REPO):
                    with console.status(f"building {name} as `pip install .` does (a minute or two)"):
                        compiled = build_package(checkout, root / f"build-{i}")
                    codes[name] = root / f"build-{i}"
                    console.print(f"{name}: built, {'compiled modules' if compiled else 'nothing compiled'}")
            for name, src in codes.items():
                srv = (Serpent(root / f"side{len(sides)}", submission=True, sink=(sink.ip, sink.port))
                       if sink is not None else Serpent(root / f"side{len(sides)}"))
                srv.setup()
                srv.start(src)
                sides[name] = srv
            run = _runner(args, sink)
            for srv in sides.values():  # warm up both
                run(srv, max(100, args.count // 10))
            rows: list[tuple[int, dict[str, tuple[float, float]]]] = []
            names = list(sides)
            for i in range(args.pairs):
                got: dict[str, tuple[float, float]] = {}
                for name in (names if i % 2 == 0 else names[::-1]):
                    got[name] = run(sides[name], args.count)
                rows.append((i + 1, got))
                a, b = got[names[0]], got[names[1]]
                console.print(f"pair {i + 1}/{args.pairs}: {names[0]} {a[0]:,.0f} msg/s, "
                              f"working tree {b[0]:,.0f} msg/s (×{b[0] / a[0]:.2f})")
            _report(console, args, names, rows)
    finally:
        for srv in sides.values():
            srv.stop()
        if sink is not None:
            sink.stop()
        if args.keep:
            console.print(f"kept {root}")
        else:
            # Every message of every run is in there: hundreds of megabytes per A/B.
            remove_tree(root)
    return 0


def _runner(args: argparse.Namespace, sink: Sink | None) -> Callable[[Serpent, int], tuple[float, float]]:
    """A function that runs the scenario once: (msg/s, server ms of CPU per message)."""
    if sink is None:
        def inbound(srv: Serpent, n: int) -> tuple[float, float]:
            smp = _inbound_once(srv, args.sessions, n, args.size)
            return smp.value, float(smp.extra["cpu_ms_per_msg"])
        return inbound

    def submission(srv: Serpent, n: int) -> tuple[float, float]:
        sink.clear()
        cpu0 = srv.cpu()
        t0 = time.monotonic()
        _submit_load(srv.ip, srv.submission_port, n, args.sessions, auth=True)
        got, t_last = wait_count([sink.dir], n, settle=5.0, timeout=300)
        return got / max(t_last - t0, 1e-6), (srv.cpu() - cpu0) * 1000 / max(got, 1)
    return submission


def _report(console: Console, args: argparse.Namespace, names: list[str],
            rows: list[tuple[int, dict[str, tuple[float, float]]]]) -> None:
    what = (f"{args.scenario}, {args.sessions} session{'s' if args.sessions != 1 else ''}, "
            f"{args.count} msgs{f' of {args.size} octets' if args.scenario == 'inbound' else ''}, "
            f"workers = {args.workers}")
    table = Table(title=f"A/B: {what}")
    table.add_column("pair", justify="right")
    for name in names:
        table.add_column(f"{name} msg/s", justify="right")
    table.add_column("msg/s ratio", justify="right")
    for name in names:
        table.add_column(f"{name} CPU ms/msg", justify="right")
    table.add_column("CPU ratio", justify="right")
    ratios, cpu_ratios = [], []
    for i, got in rows:
        (a, ca), (b, cb) = got[names[0]], got[names[1]]
        ratios.append(b / a)
        cpu_ratios.append(cb / ca if ca else float("nan"))
        table.add_row(str(i), f"{a:,.0f}", f"{b:,.0f}", f"{b / a:.3f}", f"{ca:.2f}", f"{cb:.2f}", f"{cpu_ratios[-1]:.3f}")
    table.add_row("median", *(f"{statistics.median(got[n][0] for _, got in rows):,.0f}" for n in names),
                  f"{statistics.median(ratios):.3f}",
                  *(f"{statistics.median(got[n][1] for _, got in rows):.2f}" for n in names),
                  f"{statistics.median(cpu_ratios):.3f}")
    console.print(table)
    console.print(f"working tree ÷ {names[0]}: msg/s ×{statistics.median(ratios):.3f} "
                  f"(pairs {min(ratios):.2f}–{max(ratios):.2f}), CPU per message ×{statistics.median(cpu_ratios):.3f}")


if __name__ == "__main__":
    sys.exit(main())
