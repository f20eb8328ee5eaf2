"""Helpers shared by the benchmark servers and scenarios: processes, CPU time, memory, ports.

Benchmarks are measurements, not tests: nothing here asserts a time. Absolute figures are
noisy on a shared machine, which is why scenarios alternate serpentmail and the peer and
compute the ratio within each repetition.
"""

from __future__ import annotations

import os
import resource
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")

# When a bench run last deleted its data, and how many files: creating files on this disk
# costs more for minutes after a mass deletion (bench/README.md), so the next run says so.
CLEANUP_MARK = Path("/var/tmp/serpentmail-bench-cleanup")
SETTLE_SECONDS = 600.0


def remove_tree(root: Path) -> int:
    """Delete a run's data directory and leave :data:`CLEANUP_MARK`; returns the files deleted."""
    files = sum(len(names) for _dir, _dirs, names in os.walk(root))
    shutil.rmtree(root, ignore_errors=True)
    try:
        CLEANUP_MARK.write_text(f"{time.time():.0f} {files}\n")
    except OSError:
        pass
    return files


def _last_cleanup() -> tuple[float, int] | None:
    """(seconds since, files deleted) of the last bench clean-up, None if unknown."""
    try:
        when, files = CLEANUP_MARK.read_text().split()
        return time.time() - float(when), int(files)
    except (OSError, ValueError):
        return None


def settle_remaining() -> float:
    """Seconds until :data:`SETTLE_SECONDS` have passed since the last large clean-up (0: none)."""
    last = _last_cleanup()
    if last is None or last[1] < 1000:
        return 0.0
    return max(0.0, SETTLE_SECONDS - last[0])


def recent_cleanup() -> str | None:
    """A warning when a bench run deleted many files less than :data:`SETTLE_SECONDS` ago."""
    last = _last_cleanup()
    if last is None or settle_remaining() <= 0:
        return None
    age, files = last
    return (f"started {age:.0f} s after a bench run deleted {files:,} files: for up to "
            f"{SETTLE_SECONDS / 60:.0f} minutes after that, creating a file on this disk costs more "
            "(ext4 without a journal scans recently freed inodes; bench/README.md)")


PAGE = os.sysconf("SC_PAGE_SIZE")

# Loopback addresses of the benchmark (distinct from the tests' 127.0.0.x).
SERPENT_IP = "127.0.7.1"
POSTFIX_IP = "127.0.7.2"
DOVECOT_IP = "127.0.7.3"
SINK_IP = "127.0.7.9"
DNS_IP = "127.0.7.53"

MAIL_UID = 65534  # nobody: owner of the peers' mailboxes (Postfix/Dovecot refuse root)
MAIL_GID = 65534


class Unavailable(Exception):
    """A scenario (or one side of it) cannot run on this tree or machine; the report says why."""


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_port(host: str, port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise Unavailable(f"nothing listening on {host}:{port} after {timeout:.0f}s") from None
            time.sleep(0.05)


def raise_nofile(want: int = 65536) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = max(soft, min(want, hard if hard != resource.RLIM_INFINITY else want))
    if os.geteuid() == 0 and hard != resource.RLIM_INFINITY and hard < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return want
        except (ValueError, OSError):
            pass
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm may contain spaces: split after the closing parenthesis.
    return text[text.rindex(")") + 2 :].split()


def proc_cpu(pid: int, *, children: bool = True) -> float:
    """CPU seconds (user+system, all threads) of ``pid``; with ``children``, plus reaped children."""
    f = _stat_fields(pid)
    if f is None:
        return 0.0
    # fields after comm: state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14)
    ticks = int(f[11]) + int(f[12])
    if children:
        ticks += int(f[13]) + int(f[14])
    return ticks / CLK_TCK


def descendants(root: int) -> list[int]:
    """Live descendants of ``root`` (from /proc, one scan)."""
    parent: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            f = _stat_fields(int(name))
            if f is not None:
                parent[int(name)] = int(f[1])
    out: list[int] = []
    frontier = [root]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out.extend(kids)
        frontier.extend(kids)
    return out


def tree_cpu(root: int) -> float:
    """CPU seconds of a process tree: the root with its reaped children, plus live descendants.

    Taking the difference of two readings counts every process that ran in between once (a
    child reaped in between moves from the live sum into the root's cutime with its total).
    """
    return proc_cpu(root) + sum(proc_cpu(p) for p in descendants(root))


def pss_kib(pid: int) -> int:
    """Proportional set size (KiB): shared pages split between the processes sharing them."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return rss_kib(pid)


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_pss_kib(root: int) -> int:
    return pss_kib(root) + sum(pss_kib(p) for p in descendants(root))


def count_files(directory: Path) -> int:
    try:
        return sum(1 for _ in os.scandir(directory))
    except FileNotFoundError:
        return 0


def wait_count(dirs: Iterable[Path], expected: int, *, settle: float = 3.0, timeout: float = 120.0) -> tuple[int, float]:
    """Poll until ``expected`` files are in ``dirs`` (or no progress for ``settle`` s).

    Returns (count, time.monotonic() when the last file was first seen)."""
    dirs = list(dirs)
    deadline = time.monotonic() + timeout
    last = -1
    last_change = time.monotonic()
    while True:
        n = sum(count_files(d) for d in dirs)
        now = time.monotonic()
        if n != last:
            last, last_change = n, now
        if n >= expected or now - last_change > settle or now > deadline:
            return n, last_change
        time.sleep(0.01)


def which(name: str, extra: Iterable[str] = ("/usr/sbin", "/usr/lib/postfix/sbin")) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for d in extra:
        p = Path(d) / name
        if p.exists():
            return str(p)
    return None


def run(cmd: list[str], *, check: bool = True, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=check, text=True, capture_output=True, **kw)  # type: ignore[call-overload, no-any-return]


@dataclass
class Sample:
    """One measurement of one side in one repetition."""

    value: float  # the headline figure (msg/s, KiB per connection, ms ...)
    extra: dict[str, float] = field(default_factory=dict)


def build_package(checkout: Path, dest: Path) -> bool:
    """``pip install --no-deps --target dest checkout``: the package as a user's ``pip install .``
    builds it (setup.py compiles its hot-path modules with mypyc where it can). True when
    compiled modules came out; the servers then run it with ``PYTHONPATH=dest``."""
    if dest.exists():
        shutil.rmtree(dest)
    res = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                          "--target", str(dest), str(checkout)], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise Unavailable(f"building {checkout} failed: {res.stderr.strip()[-400:]}")
    return any(dest.glob("*__mypyc*.so"))


_DNS_SERVER = """
import asyncio, json, sys
from serpentmail.sandbox.dns import DNSServer
host, zones, ttl = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
async def main():
    server = DNSServer(host, 0, zones, ttl=ttl, negative_ttl=ttl)
    await server.start()
    print(server.port, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
asyncio.run(main())
"""


class DnsProcess:
    """The sandbox DNS server (serpentmail.sandbox.dns) in a process of its own on ``host``,
    so that its CPU is nobody's under test: answers carry ``ttl`` (negative ones too, with a
    SOA). Stops when :meth:`stop` closes its stdin."""

    def __init__(self, zones: dict[str, dict[str, list[str]]], host: str = DNS_IP, ttl: int = 300) -> None:
        import json

        self.host = host
        self.proc = subprocess.Popen([sys.executable, "-c", _DNS_SERVER, host, json.dumps(zones), str(ttl)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.strip().isdigit():
            self.stop()
            raise Unavailable("the sandbox DNS server did not start")
        self.port = int(line)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
