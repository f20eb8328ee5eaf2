"""Real POP3 clients from Debian (mpop, fetchmail, getmail6) and the ``serpentmail fetch``
command download mail that arrived over SMTP, byte-identical.

mpop, fetchmail and getmail hand messages to Unix tools, so they turn the wire's CRLF line ends into
LF (their documented behaviour); apart from that the bytes must be exactly what was stored —
in particular every dot-stuffed line must come back unstuffed. ``serpentmail fetch`` keeps
CRLF, so its files must equal the stored files exactly.
"""

from __future__ import annotations

import json
import os
import shutil
import smtplib
import subprocess
import sys
from pathlib import Path

import pytest

from serpentmail.config import Config
from tests.helpers import ServerThread, add_user, maildir_files, make_config, running_server

pytestmark = pytest.mark.e2e

BILL = "bill@winview.test"
BODY = (b"Subject: e2e \xc3\xa9t\xc3\xa9\r\nFrom: alice@elsewhere.test\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        b"first line\r\n.leading dot\r\n..two dots\r\n.\r\n" + b"x" * 900 + b"\r\nlast line\r\n")


def _need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} is not installed (apt-get install {binary}); skipping this real-client test")
    return path


def _setup(tmp_path: Path, host: str) -> Config:
    cfg = make_config(tmp_path / "data", host, listeners=("smtp", "pop3", "pop3s"))
    add_user(cfg, BILL, "bill-pw")
    return cfg


def _send(srv: ServerThread) -> bytes:
    with smtplib.SMTP(*srv.endpoint("smtp"), timeout=10) as c:
        c.ehlo("client.test")
        assert c.sendmail("alice@elsewhere.test", [BILL], BODY) == {}
    stored = maildir_files(srv.cfg, BILL)[0].read_bytes()
    assert stored.endswith(BODY)
    return stored


def _maildir(path: Path) -> Path:
    for sub in ("tmp", "new", "cur"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    return path


def _run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kw)  # type: ignore[call-overload]
    assert r.returncode == 0, f"{cmd[0]} exited {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    return r  # type: ignore[no-any-return]


def _server_messages(cfg: Config) -> int:
    return len(maildir_files(cfg, BILL, "new")) + len(maildir_files(cfg, BILL, "cur"))


def test_mpop_over_stls_keep_then_delete(tmp_path: Path) -> None:
    mpop = _need("mpop")
    cfg = _setup(tmp_path, "127.0.3.21")
    with running_server(cfg) as srv:
        stored = _send(srv)
        host, port = srv.endpoint("pop3")
        base = [mpop, "-C", "/dev/null", f"--host={host}", f"--port={port}", "--tls=on", "--tls-starttls=on",
                "--tls-certcheck=off", "--auth=user", f"--user={BILL}", "--passwordeval=echo bill-pw",
                "--received-header=off", "--only-new=off", f"--uidls-file={tmp_path / 'uidls'}"]
        out1 = _maildir(tmp_path / "got1")
        _run([*base, f"--delivery=maildir,{out1}", "--keep=on"])
        files = list((out1 / "new").iterdir())
        assert len(files) == 1 and files[0].read_bytes() == stored.replace(b"\r\n", b"\n")
        assert _server_messages(cfg) == 1  # kept
        out2 = _maildir(tmp_path / "got2")
        _run([*base, f"--delivery=maildir,{out2}", "--keep=off"])
        files = list((out2 / "new").iterdir())
        assert len(files) == 1 and files[0].read_bytes() == stored.replace(b"\r\n", b"\n")
        assert _server_messages(cfg) == 0  # DELE + QUIT removed it


def test_mpop_over_pop3s(tmp_path: Path) -> None:
    mpop = _need("mpop")
    cfg = _setup(tmp_path, "127.0.3.22")
    with running_server(cfg) as srv:
        stored = _send(srv)
        host, port = srv.endpoint("pop3s")
        out = _maildir(tmp_path / "got")
        _run([mpop, "-C", "/dev/null", f"--host={host}", f"--port={port}", "--tls=on", "--tls-starttls=off",
              "--tls-certcheck=off", "--auth=plain", f"--user={BILL}", "--passwordeval=echo bill-pw",
              "--received-header=off", "--only-new=off", f"--uidls-file={tmp_path / 'uidls'}",
              f"--delivery=maildir,{out}", "--keep=on"])
        files = list((out / "new").iterdir())
        assert len(files) == 1 and files[0].read_bytes() == stored.replace(b"\r\n", b"\n")


def test_fetchmail_downloads_identical_and_keeps(tmp_path: Path) -> None:
    fetchmail = _need("fetchmail")
    cfg = _setup(tmp_path, "127.0.3.23")
    with running_server(cfg) as srv:
        stored = _send(srv)
        host, port = srv.endpoint("pop3")
        got = tmp_path / "fetched.eml"
        rc = tmp_path / "fetchmailrc"
        rc.write_text(f'poll {host} port {port} protocol pop3 user "{BILL}" password "bill-pw" keep '
                      f'sslproto "" mda "cat > {got}"\n')
        rc.chmod(0o600)
        env = {"HOME": str(tmp_path), "FETCHMAILHOME": str(tmp_path), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        _run([fetchmail, "-f", str(rc), "--nosyslog", "--invisible", "--norewrite", "--all"], env=env)
        assert got.read_bytes() == stored.replace(b"\r\n", b"\n")
        assert _server_messages(cfg) == 1


def test_serpentmail_fetch_command(tmp_path: Path) -> None:
    cfg = _setup(tmp_path, "127.0.3.24")
    with running_server(cfg) as srv:
        stored = _send(srv)
        host, port = srv.endpoint("pop3")
        base = [sys.executable, "-m", "serpentmail", "fetch", BILL, "--host", host, "--port", str(port),
                "--password-stdin"]
        listing = _run([*base, "--json"], input="bill-pw\n")
        rows = json.loads(listing.stdout)
        assert rows == [{"n": 1, "from": "alice@elsewhere.test", "subject": "e2e été", "size": len(stored)}]
        table = _run(base, input="bill-pw\n")
        assert "e2e été" in table.stdout
        out = tmp_path / "fetched"
        _run([*base, "--out", str(out), "--delete"], input="bill-pw\n")
        files = list((out / "new").iterdir())
        assert len(files) == 1 and files[0].read_bytes() == stored  # CRLF kept: exactly the stored file
        assert _server_messages(cfg) == 0
        bad = subprocess.run([*base], input="wrong\n", capture_output=True, text=True, timeout=60)
        assert bad.returncode != 0 and "[AUTH]" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("tls", [False, True])
def test_getmail6_downloads_identical_then_deletes(tmp_path: Path, tls: bool) -> None:
    getmail = _need("getmail")
    cfg = _setup(tmp_path, "127.0.3.25" if tls else "127.0.3.26")
    with running_server(cfg) as srv:
        stored = _send(srv)
        host, port = srv.endpoint("pop3s" if tls else "pop3")
        got = tmp_path / "fetched.eml"
        rc = tmp_path / "getmailrc"
        # getmail refuses to write a Maildir as root; an external MDA may run as root when
        # allowed, and it receives the message as getmail hands it to any delivery.
        rc.write_text(
            "[retriever]\n"
            f"type = {'SimplePOP3SSLRetriever' if tls else 'SimplePOP3Retriever'}\n"
            f"server = {host}\nport = {port}\nusername = {BILL}\npassword = bill-pw\n"
            "[destination]\ntype = MDA_external\npath = /bin/sh\n"
            f'arguments = ("-c", "cat > {got}")\n'
            f"allow_root_commands = {os.geteuid() == 0}\n"
            "[options]\nread_all = true\ndelete = true\nverbose = 0\n"
            "delivered_to = false\nreceived = false\nmessage_log_syslog = false\n")
        gdir = tmp_path / "getmail-state"
        gdir.mkdir()
        _run([getmail, "--getmaildir", str(gdir), "--rcfile", str(rc)],
             env={"HOME": str(tmp_path), "PATH": os.environ.get("PATH", "/usr/bin:/bin")})
        assert got.read_bytes().replace(b"\r\n", b"\n") == stored.replace(b"\r\n", b"\n")
        assert _server_messages(cfg) == 0  # deleted on the server after the download
