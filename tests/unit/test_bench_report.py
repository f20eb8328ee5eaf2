"""The benchmark report's note on where the machine's CPU time went (bench/report.py)."""

from __future__ import annotations

from bench.report import cpu_times, load_note


def test_busy_idle_and_stolen_shares_of_the_run() -> None:
    # user nice system idle iowait irq softirq steal (jiffies), before and after
    before = [100, 0, 50, 1000, 10, 0, 5, 20]
    after = [400, 0, 250, 1400, 50, 0, 55, 120]
    # deltas: user 300, system 200, idle 400, iowait 40, softirq 50, steal 100 (total 1090)
    assert load_note(before, after) == "CPU time during the run: 50% busy, 40% idle, 9.2% stolen by the hypervisor"


def test_no_counters_no_note() -> None:
    assert load_note(None, [1] * 8) == ""
    assert load_note([1] * 8, [1] * 8) == ""  # no time passed


def test_counters_are_read_on_linux() -> None:
    times = cpu_times()
    assert times is None or (len(times) == 8 and all(t >= 0 for t in times))
