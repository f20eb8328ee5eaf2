# ruff: noqa: RUF001  (typographic signs in the report text are intended)
"""The benchmark scenarios. Each runs serpentmail and its peer alternately (A B A B ...).

Every scenario yields :class:`Row` values: one per configuration (size, sessions...), holding
each side's per-repetition samples. The ratio serpentmail/peer is computed within each
repetition, so the machine's background load (other engineers' tests) mostly cancels out.
A scenario that cannot run on this tree (a component not merged yet) yields a Row with a
``status`` saying why instead of raising.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from . import clients
from .common import (
    SINK_IP,
    DnsProcess,
    Sample,
    Unavailable,
    count_files,
    free_port,
    wait_count,
    wait_port,
    which,
)
from .servers import DOMAIN, PASSWORD, USER, Dovecot, Postfix, Serpent

SENDER = "sender@client.test"


@dataclass
class Row:
    scenario: str  # "1 inbound", ...
    label: str  # "4 KiB, 10 sessions"
    unit: str
    higher_is_better: bool
    peer: str
    serpent: list[Sample] = field(default_factory=list)
    other: list[Sample] = field(default_factory=list)
    status: str = ""  # non-empty: not available / partial, with the reason
    goal: str = ""
    chart: bool = False  # throughput rows go on the chart

    def ratios(self) -> list[float]:
        return [a.value / b.value for a, b in zip(self.serpent, self.other, strict=False) if b.value]


def summary(values: list[float]) -> tuple[float, float, float] | None:
    if not values:
        return None
    return statistics.median(values), min(values), max(values)


@dataclass
class Env:
    """What a scenario gets: the temp root, the servers, repetitions, quick mode, progress."""

    root: Path
    serpent: Serpent
    postfix: Postfix | None
    dovecot: Dovecot | None
    reps: int
    quick: bool
    progress: Callable[[str], None]
    peer_errors: dict[str, str] = field(default_factory=dict)


# --- (1) inbound MX -> Maildir, and (6) CPU per message ---------------------------------------


def _smtp_source(host: str, port: int, sessions: int, count: int, size: int) -> None:
    tool = which("smtp-source")
    if tool is None:
        raise Unavailable("smtp-source (postfix) is not installed")
    res = subprocess.run([tool, "-s", str(sessions), "-m", str(count), "-l", str(size), "-f", SENDER,
                          "-t", USER, f"{host}:{port}"], capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        raise RuntimeError(f"smtp-source failed: {res.stderr.strip()[-300:]}")


def _inbound_once(server: Serpent | Postfix, sessions: int, count: int, size: int) -> Sample:
    server.clear_mailbox()
    cpu0 = server.cpu()
    t0 = time.monotonic()
    _smtp_source(server.ip, server.smtp_port, sessions, count, size)
    t_sent = time.monotonic()
    got, t_last = wait_count([server.new_dir], count, settle=5.0)
    t_end = max(t_last, t0 + 1e-6)
    if isinstance(server, Postfix):
        # Its delivery agents are still finishing bookkeeping: let them, so their CPU counts.
        deadline = time.monotonic() + 10
        while not server.queue_empty() and time.monotonic() < deadline:
            time.sleep(0.02)
    cpu1 = server.cpu()
    return Sample(got / (t_end - t0), {
        "stored": got, "sent": count, "cpu_ms_per_msg": (cpu1 - cpu0) * 1000 / max(got, 1),
        "client_seconds": t_sent - t0,
    })


def inbound(env: Env) -> Iterator[Row]:
    if env.quick:
        configs = [(4096, 1, 300), (4096, 10, 800), (4096, 50, 1000), (102400, 10, 300)]
    else:
        configs = [(4096, 1, 1000), (4096, 10, 3000), (4096, 50, 4000),
                   (102400, 1, 500), (102400, 10, 1000), (102400, 50, 1500)]
    for size, sessions, count in configs:
        kib = size // 1024
        goal = ("≥ 2.0×" if sessions >= 10 else "≥ 1.5×") if size <= 4096 else "≥ 1.5×"
        row = Row("1 inbound MX → Maildir", f"{kib} KiB, {sessions} session{'s' if sessions > 1 else ''}, {count} msgs",
                  "msg/s", True, "postfix", goal=goal, chart=True)
        cpu_row = Row("6 server CPU per message", f"{kib} KiB, {sessions} session{'s' if sessions > 1 else ''}",
                      "ms/msg", False, "postfix", goal="≤ 0.8 ms (4 KiB)" if size <= 4096 else "")
        for rep in range(env.reps):
            env.progress(f"inbound {kib} KiB × {sessions} sessions, rep {rep + 1}/{env.reps}")
            s = _inbound_once(env.serpent, sessions, count, size)
            row.serpent.append(s)
            cpu_row.serpent.append(Sample(s.extra["cpu_ms_per_msg"]))
            if env.postfix is not None:
                p = _inbound_once(env.postfix, sessions, count, size)
                row.other.append(p)
                cpu_row.other.append(Sample(p.extra["cpu_ms_per_msg"]))
        lost = [int(s.extra["sent"] - s.extra["stored"]) for s in row.serpent + row.other if s.extra["stored"] < s.extra["sent"]]
        if lost:
            row.status = f"some runs stored fewer messages than sent (missing: {lost})"
        if env.postfix is None:
            row.status = cpu_row.status = f"peer not available: {env.peer_errors.get('postfix', '?')}"
        env.serpent.clear_mailbox()
        if env.postfix is not None:
            env.postfix.clear_mailbox()
        yield row
        yield cpu_row


# --- (5) latency ----------------------------------------------------------------------------


def latency(env: Env) -> Iterator[Row]:
    total = 600 if env.quick else 3000
    p50 = Row("5 latency at 50 sessions", f"p50, 4 KiB, {total} transactions", "ms", False, "postfix")
    p99 = Row("5 latency at 50 sessions", f"p99, 4 KiB, {total} transactions", "ms", False, "postfix")
    for rep in range(env.reps):
        env.progress(f"latency, rep {rep + 1}/{env.reps}")
        servers: list[Serpent | Postfix] = [env.serpent] + ([env.postfix] if env.postfix else [])
        for srv in servers:
            srv.clear_mailbox()
            lat = sorted(clients.smtp_latency(srv.ip, srv.smtp_port, sessions=50, total=total, size=4096,
                                              sender=SENDER, rcpt=USER))
            a = Sample(lat[len(lat) // 2] * 1000)
            b = Sample(lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000)
            if srv is env.serpent:
                p50.serpent.append(a)
                p99.serpent.append(b)
            else:
                p50.other.append(a)
                p99.other.append(b)
    if env.postfix is not None:
        wait_count([env.postfix.new_dir], total * env.reps, settle=3.0, timeout=30)
        env.postfix.clear_mailbox()
    env.serpent.clear_mailbox()
    note = "the peer's 250 comes when its queue file is fsync'd; Maildir delivery follows later"
    p50.status = p99.status = note if env.postfix else f"peer not available: {env.peer_errors.get('postfix', '?')}"
    yield p50
    yield p99


# --- (4) memory per idle connection ----------------------------------------------------------


def memory(env: Env) -> Iterator[Row]:
    counts = [1000] if env.quick else [1000, 10000]
    reps = 1 if env.quick else min(env.reps, 2)
    for n in counts:
        row = Row("4 memory per idle connection", f"{n:,} idle SMTP connections", "KiB/conn", False, "postfix",
                  goal="≤ 20 KiB; 10,000 held")
        held: list[str] = []
        for rep in range(reps):
            env.progress(f"memory, {n} idle connections, rep {rep + 1}/{reps}")
            sides: list[Serpent | Postfix] = [env.serpent]
            if env.postfix is not None and n <= env.postfix.smtpd_limit:
                sides.append(env.postfix)
            for srv in sides:
                # Fresh processes: earlier runs leave free heap (serpentmail) or idle smtpd
                # processes (Postfix) that the new connections would reuse.
                srv.stop()
                srv.start()
                base = srv.memory_kib()
                alive, after = clients.hold_idle(srv.ip, srv.smtp_port, n, srv.memory_kib)
                sample = Sample((after - base) / max(alive, 1), {"held": alive, "total_kib": after})
                (row.serpent if srv is env.serpent else row.other).append(sample)
                held.append(f"{srv.name} held {alive:,}")
                time.sleep(1.0)
        notes = ["PSS summed over the server's processes", "; ".join(sorted(set(held)))]
        if env.postfix is None:
            notes.append(f"peer not available: {env.peer_errors.get('postfix', '?')}")
        elif n > env.postfix.smtpd_limit:
            notes.append(f"peer not run at {n:,}: Postfix needs one smtpd process per connection "
                         f"(process limit here {env.postfix.smtpd_limit:,})")
        row.status = "; ".join(notes)
        yield row


# --- (3) POP3 download ----------------------------------------------------------------------


def serpent_pop3_available() -> str | None:
    if importlib.util.find_spec("serpentmail.server.pop3") is None:
        return "POP3 server not merged yet (serpentmail.server.pop3 missing)"
    return None


def _seed(maildir: Path, n: int, size: int, *, crlf: bool, uid: int | None = None) -> int:
    for sub in ("new", "cur", "tmp"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
        for entry in os.scandir(maildir / sub):
            os.unlink(entry.path)
    body = clients.make_message(size, SENDER, USER, crlf=crlf)
    now = int(time.time())
    for i in range(n):
        name = f"{now}.M{i}P{os.getpid()}Q{i}.bench,S={len(body)}"
        with open(maildir / "new" / name, "wb") as f:
            f.write(body)
    if uid is not None:
        for p in [maildir, *maildir.rglob("*")]:
            os.chown(p, uid, uid)
    # Dovecot keeps index files next to the Maildir: drop them so each repetition starts cold.
    for extra in maildir.glob("dovecot*"):
        if extra.is_file():
            extra.unlink()
    return len(body)


def pop3(env: Env) -> Iterator[Row]:
    configs = [(4096, 500 if env.quick else 5000), (102400, 100 if env.quick else 1000)]
    missing = serpent_pop3_available()
    for size, n in configs:
        kib = size // 1024
        rows = (Row("3 POP3 download", f"{n:,} × {kib} KiB (msgs/s)", "msg/s", True, "dovecot", goal="≥ 1.0×", chart=True),
                Row("3 POP3 download", f"{n:,} × {kib} KiB (MB/s)", "MB/s", True, "dovecot", goal="≥ 1.0×"))
        if missing:
            for r in rows:
                r.status = f"not available: {missing}"
        else:
            for rep in range(env.reps):
                env.progress(f"pop3 {n} × {kib} KiB, rep {rep + 1}/{env.reps}")
                _seed(env.serpent.maildir, n, size, crlf=True)
                try:
                    got, nbytes, secs = clients.pop3_download(env.serpent.ip, env.serpent.pop3_port, USER, PASSWORD)
                except Exception as exc:  # a POP3 server in progress: report, do not crash
                    for r in rows:
                        r.status = f"serpentmail POP3 failed: {exc!r}"[:200]
                    break
                rows[0].serpent.append(Sample(got / secs, {"messages": got}))
                rows[1].serpent.append(Sample(nbytes / secs / 1e6))
                if env.dovecot is not None:
                    _seed(env.dovecot.maildir, n, size, crlf=False, uid=65534)
                    got, nbytes, secs = clients.pop3_download(env.dovecot.ip, env.dovecot.pop3_port, USER, PASSWORD)
                    rows[0].other.append(Sample(got / secs, {"messages": got}))
                    rows[1].other.append(Sample(nbytes / secs / 1e6))
        if env.dovecot is None:
            for r in rows:
                r.status = (r.status + "; " if r.status else "") + f"peer: {env.peer_errors.get('dovecot', '?')}"
        elif env.dovecot is not None and not rows[0].other and not missing:
            pass
        yield from rows


# --- (2) submission with AUTH -> queue -> remote smtp-sink --------------------------------------


def serpent_queue_available() -> str | None:
    if importlib.util.find_spec("serpentmail.queue.service") is None:
        return "queue / remote delivery not merged yet (serpentmail.queue.service missing)"
    return None


_sink_graves = itertools.count()


def _tmpfs() -> Path | None:
    """/dev/shm when it is a tmpfs mount (where the sink keeps its files), else None."""
    try:
        with open("/proc/mounts", encoding="ascii", errors="replace") as f:
            mounts = {fields[1]: fields[2] for fields in (line.split() for line in f) if len(fields) > 2}
    except OSError:
        return None
    return Path("/dev/shm") if mounts.get("/dev/shm") == "tmpfs" else None


class Sink:
    """Postfix's smtp-sink on loopback, dumping each message to a file so they can be counted.

    The sink stands for another organisation's server, so its files are kept off the disk the
    servers under test write to: in a tmpfs (/dev/shm) when there is one. On that disk (ext4
    without a journal) each file the sink created scanned the inodes freed in the last minutes
    (``recently_deleted``), the last run's sink files and the peer's queue files alike: perf
    put smtp-sink at 12-18% of the machine's CPU, about 1 ms per message, in both sides' runs.
    """

    def __init__(self, root: Path) -> None:
        shm = _tmpfs()
        self._own: Path | None = Path(tempfile.mkdtemp(prefix="serpent-bench-sink-", dir=shm)) if shm else None
        self.dir = (self._own if self._own is not None else root) / "sink"
        self.ip = SINK_IP
        self.port = free_port(self.ip)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        tool = which("smtp-sink")
        if tool is None:
            raise Unavailable("smtp-sink (postfix) is not installed")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([tool, "-u", "root", "-d", str(self.dir / "%H%M%S."), f"{self.ip}:{self.port}", "256"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.ip, self.port)

    def clear(self) -> None:
        """Start the next run in an empty directory. On a disk the old one is moved aside, not
        deleted, for the reason given in ``servers.retire``; in a tmpfs it is deleted."""
        if self._own is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
        elif self.dir.exists():
            grave = self.dir.parent / "grave"
            grave.mkdir(exist_ok=True)
            self.dir.rename(grave / f"sink-{next(_sink_graves)}")
        self.dir.mkdir(parents=True, exist_ok=True)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None
        if self._own is not None:
            shutil.rmtree(self._own, ignore_errors=True)


def _submit_load(host: str, port: int, n: int, sessions: int, *, auth: bool) -> None:
    """``n`` messages over ``sessions`` threads with smtplib (STARTTLS + AUTH when ``auth``)."""
    import smtplib
    import ssl
    from concurrent.futures import ThreadPoolExecutor

    body = clients.make_message(4096, USER, "rcpt@remote.test")
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    per = [n // sessions + (1 if i < n % sessions else 0) for i in range(sessions)]

    def worker(k: int) -> None:
        with smtplib.SMTP(host, port, timeout=60) as s:
            if auth:
                s.starttls(context=ctx)
                s.login(USER, PASSWORD)
            for _ in range(k):
                s.sendmail(USER, ["rcpt@remote.test"], body)

    with ThreadPoolExecutor(sessions) as pool:
        list(pool.map(worker, per))


def submission(env: Env) -> Iterator[Row]:
    n = 150 if env.quick else 1000
    row = Row("2 submission → queue → remote", f"4 KiB, 10 sessions, {n} msgs, end to end", "msg/s", True,
              "postfix", goal="≥ 1.5×", chart=True)
    missing = serpent_queue_available()
    if missing:
        row.status = f"not available: {missing}"
        yield row
        return
    sink = Sink(env.root)
    serpent = Serpent(env.root / "e2e", submission=True, sink=(sink.ip, sink.port))
    pf = Postfix(env.root / "e2e", relay=(sink.ip, sink.port), submission=True) if env.postfix is not None else None
    try:
        sink.start()
        serpent.setup()
        serpent.start()
        if pf is not None:
            pf.setup()
            pf.start()
        for rep in range(env.reps):
            env.progress(f"submission → remote, rep {rep + 1}/{env.reps}")
            # Both sides: the same smtplib client, STARTTLS + AUTH PLAIN on the submission port.
            sides: list[tuple[str, int, list[Sample]]] = [(serpent.ip, serpent.submission_port, row.serpent)]
            if pf is not None:
                sides.append((pf.ip, pf.submission_port, row.other))
            for host, port, out in sides:
                sink.clear()
                t0 = time.monotonic()
                _submit_load(host, port, n, 10, auth=True)
                got, t_last = wait_count([sink.dir], n, settle=10.0, timeout=300)
                out.append(Sample(got / (t_last - t0), {"delivered": got}))
        row.status = ("both sides: STARTTLS + AUTH PLAIN on a submission port, relay to the same smtp-sink; "
                      "Postfix's submission smtpd requires TLS, authenticates through a private Dovecot auth "
                      "socket and relays only for authenticated clients")
    except Exception as exc:  # a component in progress: report it, do not crash the run
        row.status = f"failed: {exc!r}"[:300]
    finally:
        serpent.stop()
        if pf is not None:
            pf.stop()
        sink.stop()
    yield row
    yield from _submission_by_mx(env, n)


def _submission_by_mx(env: Env, n: int) -> Iterator[Row]:
    """Scenario 2 the way the mission sends mail: no smart host, the recipient domain's MX
    looked up for every message (the sandbox DNS in a process of its own, TTL 300 s), then
    the same smtp-sink. serpentmail against itself with its DNS cache off: Postfix reads its
    nameservers from /etc/resolv.conf (port 53 only), which the benchmark must not touch."""
    row = Row("2 submission → MX lookup → remote", f"4 KiB, 10 sessions, {n} msgs, end to end", "msg/s", True,
              "serpentmail, [dns] cache_max_ttl = 0")
    if env.quick:  # two more servers to start: --quick keeps to its two minutes without them
        row.status = "not run with --quick"
        yield row
        return
    sink = Sink(env.root / "mx")
    try:
        dns = DnsProcess({"remote.test": {"MX": ["10 mx.remote.test"]}, "mx.remote.test": {"A": [sink.ip]}})
    except (Unavailable, OSError) as exc:
        row.status = f"not available: {exc}"
        yield row
        return
    cached = Serpent(env.root / "mx" / "cache", submission=True, sink=(sink.ip, sink.port), dns=(dns.host, dns.port))
    uncached = Serpent(env.root / "mx" / "nocache", submission=True, sink=(sink.ip, sink.port),
                       dns=(dns.host, dns.port), dns_cache=False)
    try:
        sink.start()
        for server in (cached, uncached):
            server.setup()
            server.start()
        for rep in range(env.reps):
            env.progress(f"submission → MX lookup → remote, rep {rep + 1}/{env.reps}")
            for server, out in ((cached, row.serpent), (uncached, row.other)):
                sink.clear()
                t0 = time.monotonic()
                _submit_load(server.ip, server.submission_port, n, 10, auth=True)
                got, t_last = wait_count([sink.dir], n, settle=10.0, timeout=300)
                out.append(Sample(got / (t_last - t0), {"delivered": got}))
        row.status = ("the same build both sides; the peer column is serpentmail with its DNS answer cache off, so "
                      "each message asks MX, A and AAAA (Postfix cannot be pointed at the sandbox DNS)")
    except Exception as exc:  # report it, do not crash the run
        row.status = f"failed: {exc!r}"[:300]
    finally:
        for server in (cached, uncached):
            server.stop()
        sink.stop()
        dns.stop()
    yield row


ALL: dict[str, Callable[[Env], Iterator[Row]]] = {
    "inbound": inbound,
    "latency": latency,
    "memory": memory,
    "pop3": pop3,
    "submission": submission,
}


def count_new(path: Path) -> int:
    return count_files(path)


__all__ = ["ALL", "DOMAIN", "Env", "Row", "summary"]
