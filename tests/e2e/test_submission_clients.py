"""Submission end to end: the real ``serpentmail serve`` with real clients from Debian.

swaks (``--auth``, ``--tls``, ``--tlsc``) and msmtp are each accepted with the right password
and refused with a wrong one; a spoofed sender is refused; ``serpentmail send`` and
``serpentmail sendmail -t`` submit as a user would.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import free_ports

HOST = "127.0.8.9"
SM = [sys.executable, "-m", "serpentmail"]


class Served:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.ports = dict(zip(("smtp", "submission", "submissions"), free_ports(HOST, 3), strict=True))
        self.config = root / "mail.toml"
        self.config.write_text(
            f'hostname = "mx.yahoo.test"\ndata_dir = "{root / "data"}"\n'
            + "".join(f'[{k}]\nlisten = ["{HOST}:{p}"]\n' for k, p in self.ports.items())
            + '[pop3]\nlisten = []\n[pop3s]\nlisten = []\n[limits]\nauth_failure_delay = "0.1s"\n'
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def cli(self, *args: str, stdin: bytes = b"", env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([*SM, "-c", str(self.config), *args], input=stdin, capture_output=True, timeout=60,
                              env={**os.environ, **(env or {})})

    def start(self) -> None:
        self.proc = subprocess.Popen([*SM, "-c", str(self.config), "serve"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                socket.create_connection((HOST, self.ports["submission"]), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("server did not start")

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)

    def mailbox(self, user_id: int) -> list[Path]:
        d = self.root / "data" / "mail" / str(user_id) / "new"
        return sorted(d.iterdir()) if d.exists() else []


@pytest.fixture()
def served(tmp_path: Path) -> Iterator[Served]:
    s = Served(tmp_path)
    assert s.cli("domain", "add", "yahoo.test").returncode == 0
    assert s.cli("user", "add", "bill@yahoo.test", "--password-stdin", stdin=b"billpw\n").returncode == 0  # id 1
    assert s.cli("user", "add", "ann@yahoo.test", "--password-stdin", stdin=b"annpw\n").returncode == 0  # id 2
    s.start()
    yield s
    assert s.stop() == 0


def _swaks(served: Served, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["swaks", "--server", HOST, "--from", "bill@yahoo.test", "--to", "ann@yahoo.test",
                           "--helo", "client.test", *args], capture_output=True, text=True, timeout=60)


needs_swaks = pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks not installed (apt-get install swaks)")
needs_msmtp = pytest.mark.skipif(shutil.which("msmtp") is None, reason="msmtp not installed (apt-get install msmtp)")


@needs_swaks
def test_swaks_starttls_auth_accepted_and_wrong_password_refused(served: Served) -> None:
    port = str(served.ports["submission"])
    ok = _swaks(served, "--port", port, "--tls", "--auth", "PLAIN", "--auth-user", "bill@yahoo.test",
                "--auth-password", "billpw", "--header", "Subject: via swaks")
    assert ok.returncode == 0, ok.stdout
    assert "235 2.7.0" in ok.stdout and "250 2.0.0 OK: queued as" in ok.stdout
    bad = _swaks(served, "--port", port, "--tls", "--auth", "LOGIN", "--auth-user", "bill@yahoo.test",
                 "--auth-password", "nope")
    assert bad.returncode != 0
    assert "535 5.7.8" in bad.stdout
    files = served.mailbox(2)
    assert len(files) == 1 and b"Subject: via swaks" in files[0].read_bytes()


@needs_swaks
def test_swaks_implicit_tls_and_spoofed_sender(served: Served) -> None:
    port = str(served.ports["submissions"])
    ok = _swaks(served, "--port", port, "--tlsc", "--auth", "PLAIN", "--auth-user", "bill@yahoo.test",
                "--auth-password", "billpw")
    assert ok.returncode == 0, ok.stdout
    spoof = subprocess.run(["swaks", "--server", HOST, "--port", port, "--tlsc", "--from", "ann@yahoo.test",
                            "--to", "ann@yahoo.test", "--auth", "PLAIN", "--auth-user", "bill@yahoo.test",
                            "--auth-password", "billpw"], capture_output=True, text=True, timeout=60)
    assert spoof.returncode != 0
    assert "553 5.7.1 Sender address rejected" in spoof.stdout
    assert len(served.mailbox(2)) == 1


@needs_swaks
def test_swaks_unauthenticated_relay_refused_on_25_and_587(served: Served) -> None:
    r25 = subprocess.run(["swaks", "--server", HOST, "--port", str(served.ports["smtp"]), "--from", "bill@yahoo.test",
                          "--to", "someone@elsewhere.test"], capture_output=True, text=True, timeout=60)
    assert "554 5.7.1 <someone@elsewhere.test>: Relay access denied" in r25.stdout
    r587 = subprocess.run(["swaks", "--server", HOST, "--port", str(served.ports["submission"]), "--tls",
                           "--from", "bill@yahoo.test", "--to", "someone@elsewhere.test"],
                          capture_output=True, text=True, timeout=60)
    assert "530 5.7.0 Authentication required" in r587.stdout
    assert r25.returncode != 0 and r587.returncode != 0


@needs_msmtp
def test_msmtp_accepted_and_refused(served: Served) -> None:
    def run(password: str) -> subprocess.CompletedProcess[str]:
        rc = served.root / f"msmtprc-{password}"
        rc.write_text(
            f"account default\nhost {HOST}\nport {served.ports['submission']}\nfrom bill@yahoo.test\n"
            "auth plain\nuser bill@yahoo.test\n"
            f"password {password}\ntls on\ntls_starttls on\ntls_certcheck off\n"
        )
        rc.chmod(0o600)
        return subprocess.run(["msmtp", "-C", str(rc), "ann@yahoo.test"], input="Subject: msmtp\n\nhello from msmtp\n",
                              capture_output=True, text=True, timeout=60)

    ok = run("billpw")
    assert ok.returncode == 0, ok.stderr
    bad = run("wrong")
    assert bad.returncode != 0 and "535" in bad.stderr
    files = served.mailbox(2)
    assert len(files) == 1
    assert files[0].read_bytes().endswith(b"Subject: msmtp\r\n\r\nhello from msmtp\r\n")


def test_serpentmail_send_and_sendmail(served: Served, tmp_path: Path) -> None:
    attachment = tmp_path / "notes.txt"
    attachment.write_text("attached text\n")
    sent = served.cli("send", "--from", "bill@yahoo.test", "--to", "ann@yahoo.test", "--subject", "hello",
                      "--attach", str(attachment), "--password-stdin", "--json", stdin=b"billpw\nBody line\n")
    assert sent.returncode == 0, sent.stderr
    assert b'"accepted": true' in sent.stdout
    wrong = served.cli("send", "--from", "bill@yahoo.test", "--to", "ann@yahoo.test", "--password-stdin",
                       stdin=b"nope\nx\n")
    assert wrong.returncode == 1
    assert b"authentication failed: 535" in wrong.stderr and b"Traceback" not in wrong.stderr
    sm = served.cli("sendmail", "-t", "-i", stdin=b"From: bill@yahoo.test\nTo: ann@yahoo.test\nBcc: bill@yahoo.test\n"
                    b"Subject: cron\n\nnightly report\n",
                    env={"SERPENTMAIL_PASSWORD": "billpw"})
    assert sm.returncode == 0, sm.stderr
    ann = served.mailbox(2)
    assert len(ann) == 2
    first = ann[0].read_bytes()
    assert b"Subject: hello" in first and b'filename="notes.txt"' in first and b"Body line" in first
    second = ann[1].read_bytes()
    assert b"Subject: cron" in second and b"Bcc:" not in second
    assert len(served.mailbox(1)) == 1  # the Bcc copy to bill
