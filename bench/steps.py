"""``python -m bench.steps``: one SMTP session's time, step by step, on serpentmail and Postfix.

A client on plain sockets runs one-message sessions one after the other (connect and
greeting, EHLO, MAIL, RCPT, DATA, the message, QUIT), as scenario 1 does at one session, and
times each step from its command to the reply. Both servers run it twice:

* **free**: every process may run on any CPU, as in scenario 1;
* **CPU 0**: the client and every process and thread of the server are pinned to CPU 0.

Why: at one session the two sides take turns, and on a VM each turn that wakes a process on
an idle CPU pays for that CPU's wake-up. Postfix's other processes (cleanup, qmgr, the
delivery agent) keep the second CPU busy, so the kernel tends to run smtpd on the client's
CPU; serpentmail has nothing else to run, so each reply and each command crosses CPUs. The
"CPU 0" rows show what the steps cost without that crossing. The last column is the
server's CPU time (all its processes) per session.

    python3 -m bench.steps                      # 1,500 sessions per row, 4 KiB
    python3 -m bench.steps --count 500 --size 102400 --pure
    python3 -m bench.steps --pop3               # scenario 3's download against Dovecot instead

With ``--pop3`` the rows are scenario 3's POP3 download (poplib: login, LIST, RETR all, DELE
all, QUIT) of ``--count`` messages of ``--size`` octets, serpentmail against Dovecot, three
downloads per row, free and on CPU 0.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from . import clients
from .common import Unavailable, build_package, descendants, recent_cleanup, remove_tree
from .scenarios import SENDER, _seed
from .servers import PASSWORD, USER, Dovecot, Postfix, Serpent, ensure_packages

REPO = Path(__file__).resolve().parent.parent
STEPS = ("connect", "EHLO", "MAIL", "RCPT", "DATA", "message", "QUIT")
_HEAD = {"connect": "conn", "message": "msg"}  # short column headers


def _reply(sock: socket.socket) -> bytes:
    """Read one whole SMTP reply (RFC 5321 §4.2.1: its last line has a space after the code)."""
    buf = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed after {buf!r}")
        buf += chunk
        if buf.endswith(b"\r\n"):
            last = buf[:-2].rsplit(b"\r\n", 1)[-1]
            if len(last) >= 4 and last[3:4] == b" ":
                return buf


def sessions(host: str, port: int, n: int, size: int, rcpt: str = USER) -> dict[str, list[float]]:
    """``n`` one-message sessions to ``rcpt``; each step's durations in seconds."""
    message = clients.make_message(size, SENDER, rcpt) + b".\r\n"  # its lines never start with a dot
    commands = ((b"EHLO client.test\r\n", "EHLO"), (f"MAIL FROM:<{SENDER}>\r\n".encode(), "MAIL"),
                (f"RCPT TO:<{rcpt}>\r\n".encode(), "RCPT"), (b"DATA\r\n", "DATA"), (message, "message"),
                (b"QUIT\r\n", "QUIT"))
    out: dict[str, list[float]] = {s: [] for s in STEPS}
    for _ in range(n):
        t0 = time.perf_counter()
        with socket.create_connection((host, port)) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _reply(s)
            t1 = time.perf_counter()
            out["connect"].append(t1 - t0)
            for data, step in commands:
                t0 = time.perf_counter()
                s.sendall(data)
                reply = _reply(s)
                out[step].append(time.perf_counter() - t0)
                if reply[:1] not in (b"2", b"3"):
                    raise RuntimeError(f"{step}: {reply!r}")
    return out


def _pin_tree(root_pid: int, cpus: set[int]) -> None:
    """Every thread of ``root_pid`` and of its descendants on ``cpus`` (children forked later
    inherit it from their parent)."""
    for pid in [root_pid, *descendants(root_pid)]:
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            continue
        for tid in tids:
            try:
                os.sched_setaffinity(tid, cpus)
            except OSError:
                pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.steps", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=1500, help="sessions per row")
    ap.add_argument("--size", type=int, default=4096, help="message size in octets")
    ap.add_argument("--pure", action="store_true", help="run serpentmail's sources instead of `pip install .`'s build")
    ap.add_argument("--pop3", action="store_true", help="POP3 downloads against Dovecot instead of SMTP sessions")
    args = ap.parse_args(argv)
    console = Console(width=max(Console().width, 110))
    allowed = os.sched_getaffinity(0)
    if 0 not in allowed or len(allowed) < 2:
        console.print("[red]needs CPU 0 and at least one other CPU[/]")
        return 1
    ensure_packages(console.print)
    settling = recent_cleanup()  # files deleted minutes ago make file creation slower for a while
    if settling:
        console.print(f"[yellow]{settling}[/]")
    root = Path(tempfile.mkdtemp(prefix="serpentmail-steps-", dir="/var/tmp"))
    os.chmod(root, 0o755)
    if args.pop3:
        table = Table(title=f"POP3 download of {args.count:,} messages of {args.size:,} octets (median of 3)")
        for col in ("server", "CPUs", "msg/s", "server CPU µs/msg", "client CPU µs/msg"):
            table.add_column(col, justify="left" if col in ("server", "CPUs") else "right", no_wrap=True)
    else:
        table = Table(title=f"p50 of each step, µs ({args.count:,} one-message sessions of {args.size:,} octets)")
        for col in ("server", "CPUs", *(_HEAD.get(s, s) for s in STEPS), "msg/s", "CPU ms/msg"):
            table.add_column(col, justify="left" if col in ("server", "CPUs") else "right", no_wrap=True)
    try:
        code = None
        if not args.pure:
            with console.status("building serpentmail as `pip install .` does (a minute or two)"):
                build_package(REPO, root / "build")
            code = root / "build"
        if args.pop3:
            _pop3_rows(console, table, root, code, args.count, args.size, allowed)
        for make in (() if args.pop3 else (lambda: Serpent(root), lambda: Postfix(root))):
            srv = make()
            try:
                srv.setup()
                srv.start(code) if isinstance(srv, Serpent) else srv.start()
                for mode, cpus in (("free", allowed), ("CPU 0", {0})):
                    os.sched_setaffinity(0, cpus)
                    _pin_tree(srv.pid, cpus)
                    sessions(srv.ip, srv.smtp_port, max(50, args.count // 10), args.size)  # warm up
                    cpu0, t0 = srv.cpu(), time.perf_counter()
                    with console.status(f"{srv.name}, {mode}: {args.count:,} sessions"):
                        got = sessions(srv.ip, srv.smtp_port, args.count, args.size)
                    took, cpu = time.perf_counter() - t0, srv.cpu() - cpu0
                    table.add_row(srv.name, mode, *(f"{statistics.median(got[s]) * 1e6:,.0f}" for s in STEPS),
                                  f"{args.count / took:,.0f}", f"{cpu * 1000 / args.count:.2f}")
            finally:
                os.sched_setaffinity(0, allowed)
                srv.stop()
    except (Unavailable, RuntimeError, OSError) as exc:  # a server that would not start or answer
        console.print(f"[red]{type(exc).__name__}: {exc}[/]")
        return 1
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        return 130
    finally:
        os.sched_setaffinity(0, allowed)
        remove_tree(root)
    console.print(table)
    return 0


def _pop3_rows(console: Console, table: Table, root: Path, code: Path | None, count: int, size: int,
               allowed: set[int]) -> None:
    serpent, dovecot = Serpent(root, pop3=True), Dovecot(root)
    try:
        for srv in (serpent, dovecot):
            srv.setup()
        serpent.start(code)
        dovecot.start()
        for mode, cpus in (("free", allowed), ("CPU 0", {0})):
            for srv, crlf, uid in ((serpent, True, None), (dovecot, False, 65534)):
                os.sched_setaffinity(0, cpus)
                _pin_tree(srv.pid, cpus)
                runs = []
                for rep in range(3):
                    _seed(srv.maildir, count, size, crlf=crlf, uid=uid)
                    cpu0, mine0 = srv.cpu(), os.times()
                    with console.status(f"{srv.name}, {mode}: download {rep + 1}/3"):
                        got, _octets, secs = clients.pop3_download(srv.ip, srv.pop3_port, USER, PASSWORD)
                    mine1 = os.times()
                    client = mine1.user + mine1.system - mine0.user - mine0.system
                    runs.append((got / secs, (srv.cpu() - cpu0) * 1e6 / got, client * 1e6 / got))
                table.add_row(srv.name, mode, *(f"{statistics.median(r[i] for r in runs):,.0f}" for i in range(3)))
    finally:
        os.sched_setaffinity(0, allowed)
        serpent.stop()
        dovecot.stop()


if __name__ == "__main__":
    raise SystemExit(main())
