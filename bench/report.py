# ruff: noqa: RUF001  (typographic signs in the report text are intended)
"""Markdown table and PNG chart of a benchmark run."""

from __future__ import annotations

import platform
import subprocess
from collections.abc import Sequence
from pathlib import Path

from .scenarios import Row, summary


def _fmt(v: float) -> str:
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def _cell(values: list[float], suffix: str = "") -> str:
    s = summary(values)
    if s is None:
        return "—"
    med, lo, hi = s
    return f"**{_fmt(med)}**{suffix} ({_fmt(lo)}–{_fmt(hi)})"


def machine() -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 1024 / 1024:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return f"{os.cpu_count()} × {cpu}{mem}, Linux {platform.release()}, Python {platform.python_version()}"


def versions() -> str:
    out = []
    for cmd in (["postconf", "-h", "mail_version"], ["dovecot", "--version"]):
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
            if res.returncode == 0:
                out.append(f"{cmd[0]} {res.stdout.strip().split()[0]}")
        except OSError:
            pass
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False,
                             cwd=Path(__file__).parent).stdout.strip()
        out.insert(0, f"serpentmail @ {rev}")
    except OSError:
        pass
    return ", ".join(out)


def cpu_times() -> list[int] | None:
    """The machine's CPU time counters (``/proc/stat``, jiffies), or None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    return [int(x) for x in fields[1:9]] if fields and fields[0] == "cpu" else None


def load_note(before: list[int] | None, after: list[int] | None) -> str:
    """Where the machine's CPU time went during the run: busy, idle, and stolen by the
    hypervisor for other guests (a slow window shows as steal, and it slows both sides)."""
    if before is None or after is None:
        return ""
    d = [b - a for a, b in zip(before, after, strict=True)]
    total = sum(d)
    if total <= 0:
        return ""
    user, nice, system, idle, iowait, irq, softirq, steal = d
    busy = user + nice + system + irq + softirq
    return (f"CPU time during the run: {100 * busy / total:.0f}% busy, {100 * (idle + iowait) / total:.0f}% idle, "
            f"{100 * steal / total:.1f}% stolen by the hypervisor")


def markdown(rows: Sequence[Row], *, title: str, command: str, reps: int, elapsed: float, setup: str = "",
             load: str = "") -> str:
    lines = [f"# {title}", "",
             f"- command: `{command}`",
             f"- machine: {machine()}",
             f"- software: {versions()}" + (f"; {setup}" if setup else ""),
             f"- {reps} repetitions, serpentmail and the peer alternately (A B A B …); "
             "median **bold** (min–max); ratio = serpentmail ÷ peer within each repetition",
             f"- wall time {elapsed:.0f} s; other work shares this machine, so compare ratios, not absolute figures"
             + (f"; {load}" if load else ""),
             "", "| scenario | configuration | unit | serpentmail | peer | ratio (serpentmail/peer) | goal | notes |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = _cell(r.ratios(), "×") if r.ratios() else "—"
        better = "higher is better" if r.higher_is_better else "lower is better"
        lines.append(f"| {r.scenario} | {r.label} | {r.unit} ({better}) | {_cell([s.value for s in r.serpent])} "
                     f"| {r.peer}: {_cell([s.value for s in r.other])} | {ratio} | {r.goal} | {r.status} |")
    lines.append("")
    return "\n".join(lines)


def chart(rows: Sequence[Row], path: Path) -> bool:
    """Grouped bars, serpentmail beside the peer, one group per throughput row. False if no matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    data = [r for r in rows if r.chart and r.serpent]
    if not data:
        return False
    labels = [f"{r.scenario.split(' ', 1)[1]}\n{', '.join(r.label.split(', ')[:2])}" for r in data]
    fig, ax = plt.subplots(figsize=(max(8, 1.5 * len(data)), 5.5))
    width = 0.38
    for k, (attr, name, color) in enumerate((("serpent", "serpentmail", "#2a9d8f"), ("other", "peer", "#8d99ae"))):
        meds, err_lo, err_hi = [], [], []
        for r in data:
            vals = [s.value for s in getattr(r, attr)]
            s = summary(vals) or (0.0, 0.0, 0.0)
            meds.append(s[0])
            err_lo.append(s[0] - s[1])
            err_hi.append(s[2] - s[0])
        xs = [i + (k - 0.5) * width for i in range(len(data))]
        bars = ax.bar(xs, meds, width, yerr=[err_lo, err_hi], capsize=3, color=color,
                      label=name if attr == "serpent" else "peer (Postfix / Dovecot)")
        for b, m in zip(bars, meds, strict=False):
            if m:
                ax.annotate(f"{m:,.0f}", (b.get_x() + b.get_width() / 2, m), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(data)))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("messages per second (median, min–max bars)")
    ax.set_title("serpentmail vs Postfix/Dovecot: throughput by scenario")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
