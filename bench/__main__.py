# ruff: noqa: RUF001  (typographic signs in the report text are intended)
"""``python -m bench [--quick] [--reps N] [--only SCENARIO ...]``: serpentmail vs Postfix/Dovecot.

See bench/README.md. Writes bench/results/<timestamp>.md, bench/results/latest.md and a PNG
chart beside them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from . import report, scenarios
from .common import (
    Unavailable,
    build_package,
    raise_nofile,
    recent_cleanup,
    remove_tree,
    settle_remaining,
)
from .servers import Dovecot, Postfix, Serpent, ensure_packages

RESULTS = Path(__file__).parent / "results"
ORDER = ["inbound", "latency", "memory", "pop3", "submission"]
QUICK = ["inbound", "latency", "memory", "pop3", "submission"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--quick", action="store_true",
                    help="reduced set, under about two minutes (runs the sources, as --pure: no build)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions per scenario (at least 3 for the report)")
    ap.add_argument("--only", nargs="*", choices=ORDER, help="run only these scenarios")
    ap.add_argument("--no-install", action="store_true", help="do not apt-get install missing peers")
    ap.add_argument("--keep", action="store_true", help="keep the temp directory (logs, mailboxes)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    ap.add_argument("--settle", action="store_true",
                    help="first wait until 10 minutes have passed since a bench run deleted many files")
    ap.add_argument("--pure", action="store_true",
                    help="run serpentmail from the sources as they are, not built as `pip install .` "
                         "builds it (mypyc-compiled modules where a C compiler is at hand)")
    ap.add_argument("--workers", default="auto", help='serpentmail\'s `workers` setting ("auto" = one per CPU, or a number)')
    args = ap.parse_args(argv)
    console = Console()
    Serpent.workers = args.workers
    names = args.only or (QUICK if args.quick else ORDER)
    started = time.monotonic()
    cpu_at_start = report.cpu_times()
    # SIGTERM unwinds like Ctrl-C, so the private Postfix/Dovecot/serpentmail are stopped.
    signal.signal(signal.SIGTERM, _interrupt)
    nofile = raise_nofile(65536)
    if nofile < 21000:
        console.print(f"[yellow]open files limit is {nofile}: the 10,000-connection memory run may fall short[/]")
    if _cpus() < (os.cpu_count() or 1):
        # Inherited by every server and client started here (`taskset -c 0-N python3 -m bench`).
        console.print(f"[yellow]this process may run on {_cpus()} of the machine's {os.cpu_count()} CPUs "
                      "(its CPU affinity), and so may every server it starts[/]")

    if args.settle and settle_remaining() > 0:
        with Progress(TextColumn("waiting for the disk to settle after the last clean-up"), BarColumn(),
                      TimeRemainingColumn(), console=console, transient=True) as wait:
            total = settle_remaining()
            bar = wait.add_task("settle", total=total)
            while (left := settle_remaining()) > 0:
                wait.update(bar, completed=total - left)
                time.sleep(min(left, 1.0))
    settling = recent_cleanup()
    if settling:
        console.print(f"[yellow]{settling}[/]")

    peer_errors: dict[str, str] = {}
    if not args.no_install:
        try:
            ensure_packages(console.print)
        except (Unavailable, OSError) as exc:
            console.print(f"[yellow]peers unavailable: {exc}[/]")
    root = Path(tempfile.mkdtemp(prefix="serpentmail-bench-", dir="/var/tmp"))
    os.chmod(root, 0o755)
    code_note = ("the sources as they are (--quick skips the build): pure-Python modules" if args.quick
                 else "the sources as they are (--pure): pure-Python modules")
    if not args.pure and not args.quick:
        with console.status("building serpentmail as `pip install .` does (mypyc: a minute or two)"):
            try:
                compiled = build_package(Path(__file__).resolve().parent.parent, root / "build")
            except Unavailable as exc:
                console.print(f"[red]{exc}[/]")
                return 1
        Serpent.code = root / "build"
        code_note = ("built as `pip install .` builds it: hot-path modules compiled with mypyc" if compiled
                     else "built as `pip install .` builds it, but nothing was compiled (no C compiler?)")
    console.print(f"serpentmail code: {code_note}")
    need_pop3 = "pop3" in names
    serpent = Serpent(root, pop3=need_pop3 and scenarios.serpent_pop3_available() is None)
    postfix: Postfix | None = Postfix(root, smtpd_limit=1100)
    dovecot: Dovecot | None = Dovecot(root) if need_pop3 else None
    rows: list[scenarios.Row] = []
    try:
        serpent.setup()
        serpent.start()
        try:
            assert postfix is not None
            postfix.setup()
            postfix.start()
        except (Unavailable, OSError) as exc:
            peer_errors["postfix"] = str(exc)
            console.print(f"[yellow]Postfix not available: {exc}[/]")
            postfix = None
        if dovecot is not None:
            try:
                dovecot.setup()
                dovecot.start()
            except (Unavailable, OSError) as exc:
                peer_errors["dovecot"] = str(exc)
                console.print(f"[yellow]Dovecot not available: {exc}[/]")
                dovecot = None
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                      console=console, transient=False) as progress:
            task = progress.add_task("starting", total=len(names))
            for name in names:
                env = scenarios.Env(root, serpent, postfix, dovecot, args.reps, args.quick,
                                    lambda text: progress.update(task, description=text), peer_errors)
                try:
                    for row in scenarios.ALL[name](env):
                        rows.append(row)
                        progress.console.print(_line(row))
                except Unavailable as exc:
                    rows.append(scenarios.Row(name, "—", "", True, "", status=f"not available: {exc}"))
                    progress.console.print(f"[yellow]{name}: not available: {exc}[/]")
                except Exception as exc:  # report and go on with the other scenarios
                    rows.append(scenarios.Row(name, "—", "", True, "", status=f"failed: {exc!r}"[:300]))
                    progress.console.print_exception()
                progress.advance(task)
            progress.update(task, description="done")
    finally:
        serpent.stop()
        if postfix is not None:
            postfix.stop()
        if dovecot is not None:
            dovecot.stop()
        if args.keep:
            console.print(f"kept {root}")
        else:
            remove_tree(root)

    elapsed = time.monotonic() - started
    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python -m bench" + (" --quick" if args.quick else "") + (f" --reps {args.reps}" if args.reps != 3 else "") \
        + (f" --only {' '.join(args.only)}" if args.only else "") \
        + (f" --workers {args.workers}" if args.workers != "auto" else "") + (" --pure" if args.pure else "") + (" --settle" if args.settle else "")
    png = args.out / f"{stamp}.png"
    has_chart = report.chart(rows, png)
    text = report.markdown(rows, title=f"serpentmail benchmark {stamp}" + (" (quick)" if args.quick else ""),
                           command=command, reps=args.reps, elapsed=elapsed,
                           setup=f"serpentmail `workers = {args.workers}` ({_cpus()} CPUs), {code_note}"
                           + (f"; **{settling}**" if settling else ""),
                           load=report.load_note(cpu_at_start, report.cpu_times()))
    if has_chart:
        shutil.copyfile(png, args.out / "latest.png")
        text += f"\n![throughput]({png.name})\n"
    (args.out / f"{stamp}.md").write_text(text)
    (args.out / "latest.md").write_text(text.replace(f"]({png.name})", "](latest.png)"))
    console.print(text, markup=False, highlight=False)
    console.print(f"written {args.out / f'{stamp}.md'}" + (f" and {png}" if has_chart else " (no chart: pip install matplotlib)"))
    return 0


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _line(row: scenarios.Row) -> str:
    s = scenarios.summary([x.value for x in row.serpent])
    p = scenarios.summary([x.value for x in row.other])
    r = scenarios.summary(row.ratios())
    parts = [f"[bold]{row.scenario}[/] {row.label}:"]
    parts.append(f"serpentmail {s[0]:,.2f} {row.unit}" if s else "serpentmail —")
    parts.append(f"{row.peer} {p[0]:,.2f}" if p else f"{row.peer or 'peer'} —")
    if r:
        parts.append(f"ratio {r[0]:.2f}× ({r[1]:.2f}–{r[2]:.2f})")
    if row.status:
        parts.append(f"[dim]{row.status}[/]")
    return " ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
