"""Start, watch and stop a detached sandbox supervisor (used by ``sandbox up|down`` and ``demo``).

State lives in the sandbox directory: ``spec.json`` (what to run), ``state.json`` (what runs:
the supervisor's pid and every endpoint) and ``sandbox.log`` (the instances' logs).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..log import setup_logging
from ..server.run import install_event_loop_policy
from .network import DomainSpec, Sandbox, SandboxError, SandboxSpec


def read_state(root: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((root / "state.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def alive(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)  # a zombie child counts as gone
        if done:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def _spec_to_json(spec: SandboxSpec) -> dict[str, Any]:
    d = asdict(spec)
    for dom in d["domains"]:
        dom["down"] = sorted(dom["down"])
    return d


def write_spec(root: Path, spec: SandboxSpec) -> None:
    _write_json(root / "spec.json", _spec_to_json(spec))


def _spec_from_json(d: dict[str, Any]) -> SandboxSpec:
    domains = [DomainSpec(x["name"], x["mx_count"], dict(x["users"]), set(x["down"])) for x in d["domains"]]
    return SandboxSpec(domains, base=d["base"], privileged=d["privileged"], dns_port=d["dns_port"],
                       retry_schedule=tuple(d["retry_schedule"]))


def supervise(root: Path) -> int:
    spec = _spec_from_json(json.loads((root / "spec.json").read_text()))
    setup_logging("plain", "info", None)
    install_event_loop_policy()

    async def main() -> int:
        box = Sandbox(spec, root)
        try:
            await box.start()
        except (SandboxError, OSError) as exc:
            _write_json(root / "state.json", {"status": "error", "error": str(exc), "pid": os.getpid()})
            return 1
        _write_json(root / "state.json", {"status": "running", "pid": os.getpid(), **box.describe()})
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await box.stop()
        (root / "state.json").unlink(missing_ok=True)
        return 0

    return asyncio.run(main())




def start_detached(root: Path, spec: SandboxSpec, timeout: float = 60.0) -> dict[str, Any]:
    """Start the supervisor in its own session; return its state once every instance is up."""
    state = read_state(root)
    if state and state.get("pid") and alive(int(state["pid"])):
        raise SandboxError(f"a sandbox is already running in {root} (pid {state['pid']}); stop it first")
    root.mkdir(parents=True, exist_ok=True)
    (root / "state.json").unlink(missing_ok=True)
    write_spec(root, spec)
    with open(root / "sandbox.log", "ab") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "serpentmail", "sandbox", "_run", str(root)],
                                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True)
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = read_state(root)
        if state is not None and state.get("status") == "error":
            proc.wait(10)
            raise SandboxError(f"sandbox failed to start: {state.get('error')}")
        if state is not None and state.get("status") == "running":
            return dict(state)
        if proc.poll() is not None:
            raise SandboxError(f"sandbox supervisor exited with status {proc.returncode}; see {root / 'sandbox.log'}")
        time.sleep(0.05)
    proc.terminate()
    raise SandboxError(f"sandbox did not start within {timeout:.0f} s; see {root / 'sandbox.log'}")


def stop_detached(root: Path, timeout: float = 30.0) -> bool:
    """Stop the supervisor (and so every instance); False if none was running."""
    state = read_state(root)
    pid = int(state.get("pid", 0)) if state else 0
    if not pid or not alive(pid):
        (root / "state.json").unlink(missing_ok=True)
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.time() + timeout
    while alive(pid) and time.time() < deadline:
        time.sleep(0.05)
        try:  # reap it if it happens to be our child
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
    if alive(pid):
        os.kill(pid, signal.SIGKILL)
    (root / "state.json").unlink(missing_ok=True)
    return True
