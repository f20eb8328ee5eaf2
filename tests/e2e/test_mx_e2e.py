"""The MX server end to end: the real ``serpentmail`` command as a subprocess on 127.0.6.x,
account management through the CLI, swaks as the client, SIGTERM and SIGKILL.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import free_port, spool_files

pytestmark = pytest.mark.e2e

SM = [sys.executable, "-m", "serpentmail"]
HOST = "127.0.6.10"


class Served:
    """A config file plus the ``serpentmail`` command run against it."""

    def __init__(self, root: Path, host: str = HOST, extra: str = "") -> None:
        self.root = root
        self.host = host
        self.port = free_port(host)
        self.data = root / "data"
        self.config = root / "mail.toml"
        self.config.write_text(
            f'hostname = "mx1.winview.test"\ndata_dir = "{self.data}"\n{extra}'
            f'[smtp]\nlisten = ["{host}:{self.port}"]\n'
            + "".join(f"[{k}]\nlisten = []\n" for k in ("submission", "submissions", "pop3", "pop3s"))
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.output = b""

    def cli(self, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[str]:
        return subprocess.run([*SM, "-c", str(self.config), *args], input=stdin.decode(), capture_output=True,
                              text=True, timeout=60)

    def start(self) -> None:
        self.proc = subprocess.Popen([*SM, "-c", str(self.config), "serve"], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stdout.read() if self.proc.stdout else b''!r}")
            try:
                socket.create_connection((self.host, self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("server did not start")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        rc = self.proc.wait(60)
        if self.proc.stdout is not None:
            self.output = self.proc.stdout.read()
        self.proc = None
        return rc

    def kill_if_running(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def mailbox(self, address: str, sub: str = "new") -> list[Path]:
        users = json.loads(self.cli("user", "list", "--json").stdout)
        uid = next(u["id"] for u in users if u["address"] == address)
        d = self.data / "mail" / str(uid) / sub
        return sorted(d.iterdir()) if d.exists() else []


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    s = Served(tmp_path)
    yield s
    s.kill_if_running()


def setup_accounts(s: Served) -> None:
    assert s.cli("domain", "add", "winview.test").returncode == 0
    r = s.cli("user", "add", "bill@winview.test", "--password-stdin", stdin=b"secret\n")
    assert r.returncode == 0, r.stderr
    assert s.cli("alias", "add", "postmaster@winview.test", "bill@winview.test").returncode == 0


# --- the CLI --------------------------------------------------------------------------------------


def test_cli_accounts_and_errors(served: Served) -> None:
    setup_accounts(served)
    assert served.cli("domain", "add", "Other.Test").stdout.strip() == "domain other.test added"
    assert json.loads(served.cli("domain", "list", "--json").stdout) == ["other.test", "winview.test"]
    users = json.loads(served.cli("user", "list", "--json").stdout)
    assert [u["address"] for u in users] == ["bill@winview.test"]
    assert json.loads(served.cli("alias", "list", "--json").stdout) == [
        {"alias": "postmaster@winview.test", "targets": ["bill@winview.test"]}]
    failures = [
        (("domain", "add", "winview.test"), "already exists"),
        (("domain", "add", "bad domain!"), "invalid domain"),
        (("domain", "del", "nowhere.test"), "no such domain"),
        (("domain", "del", "winview.test"), "still has 1 user"),
        (("user", "add", "BILL@winview.test", "--password-stdin"), "already exists"),
        (("user", "add", "x@nowhere.test", "--password-stdin"), "unknown domain"),
        (("user", "add", "not-an-address", "--password-stdin"), "invalid address"),
        (("user", "add", "a b@winview.test", "--password-stdin"), "invalid address"),
        (("user", "del", "nobody@winview.test"), "no such user"),
        (("user", "passwd", "nobody@winview.test", "--password-stdin"), "no such user"),
        (("alias", "add", "x@nowhere.test", "bill@winview.test"), "unknown domain"),
        (("alias", "add", "x@winview.test", "not an address"), "invalid address"),
        (("alias", "add", "postmaster@winview.test", "bill@winview.test"), "already exists"),
        (("alias", "del", "nope@winview.test"), "no such alias"),
    ]
    # two through the real command, the rest through main(argv) in-process (same code path,
    # without paying the interpreter start-up for each)
    for args, words in failures[:2]:
        r = served.cli(*args, stdin=b"pw\n")
        assert r.returncode != 0, args
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0], (args, r.stderr)
        assert "Traceback" not in r.stderr + r.stdout
    for args, words in failures[2:]:
        code, _out, err = run_main(served, *args, stdin="pw\n")
        assert code != 0, args
        lines = err.strip().splitlines()
        assert len(lines) == 1 and words in lines[0], (args, err)
    code, _out, err = run_main(served, "user", "add", "ann@winview.test", "--password-stdin", stdin="\n")
    assert code != 0 and "empty password" in err


def run_main(s: Served, *args: str, stdin: str = "") -> tuple[int, str, str]:
    """``serpentmail -c CONFIG ARGS`` in-process: (exit code, stdout, stderr)."""
    import contextlib
    import io

    from serpentmail.cli import main

    out, err = io.StringIO(), io.StringIO()
    old_stdin = sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["-c", str(s.config), *args])
    finally:
        sys.stdin = old_stdin
    return code, out.getvalue(), err.getvalue()


def test_config_check(tmp_path: Path) -> None:
    good = Served(tmp_path)
    r = good.cli("config", "check")
    assert r.returncode == 0 and "OK" in r.stdout
    bad = tmp_path / "bad.toml"
    for text, words in [('bogus = 1\n', "bad.toml:1: key 'bogus': unknown key"),
                        ('[limits]\nidle_timeout = "soon"\n', "bad.toml:2: key 'limits.idle_timeout'"),
                        ('[limits\n', "invalid TOML"),
                        ('[smtp]\nlisten = ["nowhere"]\n', "bad.toml:2: key 'smtp.listen'")]:
        bad.write_text(text)
        r = subprocess.run([*SM, "-c", str(bad), "config", "check"], capture_output=True, text=True, timeout=60)
        assert r.returncode != 0
        assert len(r.stderr.strip().splitlines()) == 1 and words in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    r = subprocess.run([*SM, "-c", str(tmp_path / "missing.toml"), "config", "check"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "missing.toml" in r.stderr and "Traceback" not in r.stderr


# --- serve with swaks -------------------------------------------------------------------------

needs_swaks = pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed (apt-get install swaks)")

MESSAGE = (b"From: Alice <alice@sender.test>\r\nTo: Bill <bill@winview.test>\r\nSubject: e2e\r\n"
           b"Message-ID: <e2e-1@sender.test>\r\n\r\nHello Bill,\r\n.a line with a leading dot\r\n\r\nbye\r\n")


def _swaks(s: Served, *args: str, data: bytes = MESSAGE) -> subprocess.CompletedProcess[bytes]:
    # swaks sends the data, then CRLF "." CRLF: give it the message without its last CRLF
    assert data.endswith(b"\r\n")
    return subprocess.run(["swaks", "--server", s.host, "--port", str(s.port), "--from", "alice@sender.test",
                           "--helo", "client.test", "--data", "-", *args], input=data[:-2], capture_output=True, timeout=60)


@needs_swaks
@pytest.mark.parametrize("tls", [False, True], ids=["plain", "starttls"])
def test_swaks_delivery_byte_for_byte(served: Served, tls: bool) -> None:
    setup_accounts(served)
    served.start()
    r = _swaks(served, "--to", "bill@winview.test", *(["--tls"] if tls else []))
    assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()
    r = _swaks(served, "--to", "postmaster@winview.test", *(["--tls"] if tls else []))
    assert r.returncode == 0
    r = _swaks(served, "--to", "nobody@winview.test")
    assert r.returncode != 0 and b"550 5.1.1" in r.stdout
    r = _swaks(served, "--to", "victim@elsewhere.test")
    assert r.returncode != 0 and b"554 5.7.1" in r.stdout
    assert served.stop() == 0
    files = served.mailbox("bill@winview.test")
    assert len(files) == 2
    for f in files:
        data = f.read_bytes()
        head, sep, rest = data.partition(b"From: Alice")
        assert sep and sep + rest == MESSAGE
        assert head.startswith(b"Return-Path: <alice@sender.test>\r\nReceived: from client.test ([127.")
        assert (b"with ESMTPS id" if tls else b"with ESMTP id") in head
        assert b"by mx1.winview.test (serpentmail)" in head
    assert b"message" in served.output and b"status=delivered" in served.output


def test_sigterm_exits_zero_and_logs(served: Served) -> None:
    setup_accounts(served)
    served.start()
    with smtplib.SMTP(served.host, served.port, timeout=20) as c:
        c.sendmail("a@b.test", ["bill@winview.test"], b"Subject: x\r\n\r\ny\r\n")
    assert served.stop() == 0
    out = served.output.decode()
    assert "Traceback" not in out
    assert re.search(r"message id=\S+ from=<a@b.test> to=<bill@winview.test> size=\d+ status=delivered client=127\.", out), out


def test_sigterm_as_soon_as_the_port_accepts(served: Served) -> None:
    # the listener is up before start-up has finished; SIGTERM then is still a clean stop
    for _ in range(3):
        served.start()
        assert served.stop() == 0, served.output.decode()


def test_sigkill_under_load_loses_nothing_acknowledged(served: Served) -> None:
    setup_accounts(served)
    served.start()
    acked: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def body(mid: str) -> bytes:
        return (f"Subject: {mid}\r\nMessage-ID: <{mid}@load.test>\r\n\r\n".encode()
                + (f"{mid} payload line\r\n".encode() * 200))

    def sender(n: int) -> None:
        i = 0
        try:
            with smtplib.SMTP(served.host, served.port, timeout=20) as c:
                while not stop.is_set():
                    mid = f"m{n}-{i}"
                    c.sendmail("load@sender.test", ["bill@winview.test"], body(mid))
                    with lock:  # only messages that got their 250
                        acked.append(mid)
                    i += 1
        except (OSError, smtplib.SMTPException):
            pass  # the server was killed

    threads = [threading.Thread(target=sender, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(acked) < 150 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert served.stop(signal.SIGKILL) == -signal.SIGKILL
    stop.set()
    for t in threads:
        t.join(30)
    assert len(acked) >= 150

    def check_mailbox() -> dict[str, int]:
        seen: dict[str, int] = {}
        for f in served.mailbox("bill@winview.test"):
            data = f.read_bytes()
            m = re.search(rb"Subject: (m\d+-\d+)\r\n", data)
            assert m, f"unrecognised file in new/: {f.name}"
            mid = m.group(1).decode()
            # nothing partial: the whole message, and the size in the name is the real size
            assert data.endswith(body(mid)), f.name
            assert f.name.endswith(f",S={len(data)}")
            seen[mid] = seen.get(mid, 0) + 1
        for mid in acked:
            assert seen.get(mid) == 1, mid
        assert all(n == 1 for n in seen.values())
        assert served.mailbox("bill@winview.test", "tmp") == []
        return seen

    before = check_mailbox()
    # restart: temp leftovers are cleaned, the journal's records that the kill left unplaced
    # (durable, perhaps not yet answered) are placed, and the server works again
    leftover = served.data / "tmp" / "leftover.from.crash"
    leftover.write_bytes(b"half a message")
    served.start()
    assert not leftover.exists()
    assert spool_files(served.data) == []
    after = check_mailbox()
    assert set(before) <= set(after)
    with smtplib.SMTP(served.host, served.port, timeout=20) as c:
        c.sendmail("a@b.test", ["bill@winview.test"], b"Subject: after restart\r\n\r\nok\r\n")
    assert served.stop() == 0
    assert len(served.mailbox("bill@winview.test")) == len(after) + 1


# --- the README command and privileges ----------------------------------------------------------


def _port_free(port: int) -> bool:
    try:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False


def test_embedded_default_serve(tmp_path: Path) -> None:
    ports = (2525, 2587, 2465, 2110, 2995)
    if not all(_port_free(p) for p in ports):
        pytest.skip("an embedded-default port on 127.0.0.1 is taken by another process")
    env = {k: v for k, v in os.environ.items() if k != "SERPENTMAIL_CONFIG"}
    env["COLUMNS"] = "200"
    proc = subprocess.Popen([*SM, "serve"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else b""
            try:
                socket.create_connection(("127.0.0.1", 2525), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        with smtplib.SMTP("127.0.0.1", 2525, timeout=20) as c:
            code, _ = c.ehlo("client.test")
            assert code == 250
            assert c.has_extn("starttls")  # a self-signed certificate was made
            c.mail("a@b.test")
            assert c.rcpt("postmaster@localhost")[0] == 250
            assert c.rcpt("nobody@localhost")[0] == 550
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
    out = proc.stdout.read().decode() if proc.stdout else ""
    assert rc == 0, out
    for p in ports:
        assert f"127.0.0.1:{p}" in out, out
    assert str(tmp_path / "serpentmail-data") in out
    assert "user add" in out
    assert (tmp_path / "serpentmail-data" / "tls" / "cert.pem").exists()


@pytest.fixture
def world_readable_dir() -> Iterator[Path]:
    """A directory ``nobody`` can reach (pytest's own tmp tree is root-only, mode 0700)."""
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="serpentmail-e2e-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
@pytest.mark.parametrize("workers", [1, 2])
def test_root_drops_privileges_after_binding(world_readable_dir: Path, workers: int) -> None:
    import pwd

    nobody = pwd.getpwnam("nobody")
    s = Served(world_readable_dir, extra=f'user = "nobody"\nworkers = {workers}\n')
    setup_accounts(s)
    s.start()
    try:
        assert s.proc is not None
        # the port accepts as soon as it is bound; privileges drop right after, before serving
        for _ in range(6):  # several connections: with workers, more than one process serves
            with smtplib.SMTP(s.host, s.port, timeout=20) as c:
                assert c.sendmail("a@b.test", ["bill@winview.test"], b"Subject: as nobody\r\n\r\nok\r\n") == {}
        pids = [s.proc.pid]
        for task in Path(f"/proc/{s.proc.pid}/task").iterdir():
            pids += [int(c) for c in (task / "children").read_text().split()]
        assert len(pids) == (1 if workers == 1 else 1 + workers)
        for pid in pids:
            status = Path(f"/proc/{pid}/status").read_text()
            uids = re.search(r"^Uid:\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", status, re.M)
            assert uids and {int(u) for u in uids.groups()} == {nobody.pw_uid}, status
    finally:
        rc = s.stop()
    out = s.output.decode()
    assert rc == 0, out
    assert "Traceback" not in out and "failed" not in out, out
    files = s.mailbox("bill@winview.test")
    assert len(files) == 6 and all(f.stat().st_uid == nobody.pw_uid for f in files)


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
def test_unreachable_data_dir_after_dropping_privileges_is_one_clear_line(tmp_path: Path) -> None:
    # tmp_path sits below pytest's root-only (0700) directory: nobody cannot reach data_dir
    s = Served(tmp_path, extra='user = "nobody"\n')
    setup_accounts(s)
    r = subprocess.run([*SM, "-c", str(s.config), "serve"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and "nobody" in errors[0] and str(s.data) in errors[0], r.stderr
