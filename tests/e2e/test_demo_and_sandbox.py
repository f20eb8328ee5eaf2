"""The internet in a box: ``serpentmail demo`` runs the mission's story end to end, and
``sandbox up|status|down`` start and stop a multi-domain network leaving nothing behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

SM = [sys.executable, "-m", "serpentmail"]


def test_demo_runs_every_step_of_the_mission() -> None:
    proc = subprocess.run([*SM, "demo", "--base", "127.12"], capture_output=True, text=True, timeout=170)
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:] + proc.stderr[-2000:]
    for step in range(1, 9):
        assert f"step {step}:" in out
    assert "FAILED" not in out
    assert "Relay access denied" in out
    assert "Couldn't find host named nowhere.test" in out
    assert "Traceback" not in out + proc.stderr


def test_demo_step_option_stops_early() -> None:
    proc = subprocess.run([*SM, "demo", "--base", "127.13", "--step", "2"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "step 2:" in proc.stdout and "step 3:" not in proc.stdout


def _pids_of(root: Path) -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"sandbox _run {root}"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def test_sandbox_up_status_down(tmp_path: Path) -> None:
    root = tmp_path / "box"
    up = subprocess.run([*SM, "sandbox", "up", "--dir", str(root), "--base", "127.14", "--high-ports", "--json",
                         "--domain", "yahoo.test", "--domain", "winview.test:2mx",
                         "--user", "bill@yahoo.test:pw1", "--user", "support@winview.test:pw2"],
                        capture_output=True, text=True, timeout=90)
    assert up.returncode == 0, up.stderr
    state = json.loads(up.stdout)
    win = next(d for d in state["domains"] if d["domain"] == "winview.test")
    assert [e["preference"] for e in win["exchangers"]] == [10, 20]
    assert win["users"] == {"support@winview.test": "pw2"}
    try:
        again = subprocess.run([*SM, "sandbox", "up", "--dir", str(root), "--base", "127.14", "--high-ports",
                                "--domain", "a.test"], capture_output=True, text=True, timeout=60)
        assert again.returncode == 1 and "already running" in again.stderr and "Traceback" not in again.stderr
        # another sandbox on the same addresses: a clear error, not a traceback
        clash = subprocess.run([*SM, "sandbox", "up", "--dir", str(tmp_path / "other"), "--base", "127.14",
                                "--high-ports", "--domain", "a.test"], capture_output=True, text=True, timeout=60)
        assert clash.returncode == 1 and "Traceback" not in clash.stderr
        assert "cannot" in clash.stderr
        status = subprocess.run([*SM, "sandbox", "status", "--dir", str(root), "--json"], capture_output=True,
                                text=True, timeout=60)
        assert status.returncode == 0, status.stderr
        rows = {r["domain"]: r for r in json.loads(status.stdout)["domains"]}
        assert rows["yahoo.test"]["mailboxes"] == {"bill@yahoo.test": [0, 0]}
        assert rows["yahoo.test"]["queue"] == rows["winview.test"]["queue"] == 0
        assert _pids_of(root)
    finally:
        down = subprocess.run([*SM, "sandbox", "down", "--dir", str(root)], capture_output=True, text=True, timeout=60)
    assert down.returncode == 0, down.stderr
    deadline = time.time() + 10
    while _pids_of(root) and time.time() < deadline:
        time.sleep(0.1)
    assert _pids_of(root) == []
    assert not (root / "state.json").exists()
    assert not os.path.exists(root / "state.tmp")
