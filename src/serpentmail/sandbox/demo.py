"""``serpentmail demo``: the mission's story, run for real in a temporary sandbox and narrated.

Two providers, yahoo.test (Bill) and winview.test (support, with two exchangers: preference 10
is down, preference 20 is up), and a DNS server between them. Each step shows the real protocol
lines (a panel per step) and checks the outcome against what the mission says should happen; a
step that does not behave is shown in red with what was expected and what happened. The exit
status is 0 only when every step passed.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import smtplib
import socket
import ssl
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from ..accounts.db import AccountDB
from ..config import Endpoint
from .control import start_detached, stop_detached
from .network import DomainSpec, SandboxSpec
from .transcript import TracingPOP3, TracingSMTP, Transcript

BILL, BILL_PW = "bill@yahoo.test", "bill-secret"
SUPPORT, SUPPORT_PW = "support@winview.test", "support-secret"
STEPS = 8


class StepFailed(Exception):
    def __init__(self, expected: str, happened: str) -> None:
        super().__init__(f"expected {expected}; got {happened}")
        self.expected = expected
        self.happened = happened


@dataclass
class StepResult:
    number: int
    title: str
    ok: bool
    summary: str
    transcript: Transcript = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _check(cond: bool, expected: str, happened: str) -> None:
    if not cond:
        raise StepFailed(expected, happened)


def _unverified() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the sandbox's self-signed certificates
    return ctx


def _ep(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


class Demo:
    def __init__(self, console: Console, base: str = "127.11", timeout: float = 20.0) -> None:
        self.console = console
        self.base = base
        self.timeout = timeout
        self.root = Path(tempfile.mkdtemp(prefix="serpentmail-demo-"))
        self.state: dict[str, Any] = {}
        self.results: list[StepResult] = []
        self._log_offset = 0

    # --- the sandbox -----------------------------------------------------------------------

    def spec(self) -> SandboxSpec:
        return SandboxSpec(
            [DomainSpec("yahoo.test", 1, {BILL: BILL_PW}),
             DomainSpec("winview.test", 2, {SUPPORT: SUPPORT_PW}, down={1})],
            base=self.base, privileged=False, retry_schedule=(2.0, 5.0, 10.0),
        )

    def start(self) -> None:
        self.state = start_detached(self.root, self.spec())

    def stop(self) -> None:
        stop_detached(self.root)

    def domain(self, name: str) -> dict[str, Any]:
        return next(d for d in self.state["domains"] if d["domain"] == name)

    def mailbox(self, address: str) -> list[Path]:
        d = self.domain(address.rpartition("@")[2])
        data_dir = Path(d["data_dir"])
        db = AccountDB(data_dir / "accounts.sqlite3")
        user = db.get_user(address)
        db.close()
        assert user is not None
        box = data_dir / "mail" / str(user.id)
        return sorted([*(box / "new").glob("*"), *(box / "cur").glob("*")]) if box.exists() else []

    def wait_for(self, what: Callable[[], bool], timeout: float | None = None) -> bool:
        deadline = time.monotonic() + (timeout or self.timeout)
        while time.monotonic() < deadline:
            if what():
                return True
            time.sleep(0.1)
        return what()

    def new_log_lines(self, *needles: str) -> list[str]:
        """Lines the instances logged since the last call (only those naming a needle)."""
        path = self.root / "sandbox.log"
        try:
            with open(path, "rb") as f:
                f.seek(self._log_offset)
                data = f.read()
                self._log_offset = f.tell()
        except OSError:
            return []
        lines = data.decode("utf-8", "replace").splitlines()
        out = []
        for line in lines:
            if not needles or any(n in line for n in needles):
                # drop the timestamp: "2026-...T.. level logger: event k=v"
                out.append(line.split(" ", 1)[1] if line[:4].isdigit() else line)
        return out

    # --- clients ---------------------------------------------------------------------------

    def submit(self, to: str, subject: str, body: str, transcript: Transcript) -> tuple[int, str]:
        d = self.domain("yahoo.test")
        host, port = _ep(d["submission"][0])
        msg = (f"From: Bill <{BILL}>\r\nTo: <{to}>\r\nSubject: {subject}\r\n"
               f"Message-ID: <{time.time_ns()}@yahoo.test>\r\n\r\n{body}\r\n").encode()
        with TracingSMTP(host, port, timeout=15, transcript=transcript, local_hostname="outlook.bill.test") as c:
            c.ehlo()
            c.starttls(context=_unverified())
            c.ehlo()
            c.login(BILL, BILL_PW)
            try:
                c.sendmail(BILL, [to], msg)
            except (smtplib.SMTPRecipientsRefused, smtplib.SMTPSenderRefused, smtplib.SMTPDataError) as exc:
                code = getattr(exc, "smtp_code", 0) or next(iter(getattr(exc, "recipients", {}).values()), (0, b""))[0]
                return int(code), str(exc)
            return 250, "accepted"

    def pop3(self, address: str, password: str, transcript: Transcript, delete: bool = False) -> list[bytes]:
        d = self.domain(address.rpartition("@")[2])
        host, port = _ep(d["pop3"][0])
        c = TracingPOP3(host, port, timeout=15, transcript=transcript)
        try:
            c.stls(context=_unverified())
            c.user(address)
            c.pass_(password)
            count, _ = c.stat()
            c.list()
            out = []
            for i in range(1, count + 1):
                _, lines, _ = c.retr(i)
                out.append(b"\r\n".join(lines) + b"\r\n")
                if delete:
                    c.dele(i)
            c.quit()
            return out
        finally:
            try:
                c.close()
            except OSError:
                pass

    # --- the story -------------------------------------------------------------------------

    def step1(self, r: StepResult) -> None:
        code, text = self.submit(SUPPORT, "Hello from Bill", "Hi Winview support, does my mail reach you?", r.transcript)
        _check(code == 250, "the submission server to accept Bill's authenticated message (250)", f"{code} {text}")
        r.summary = "submitted over STARTTLS with AUTH; yahoo.test queued it"

    def step2(self, r: StepResult) -> None:
        from ..delivery.dns import DNSResolver

        host, port = _ep(self.state["dns"])
        resolver = DNSResolver([Endpoint(host, port)], timeout=3)
        result = asyncio.run(resolver.resolve_mx("winview.test"))
        r.transcript.append(("C", "> set query=mx"))
        r.transcript.append(("C", "> winview.test"))
        r.transcript.append(("S", f"Server:  sandbox DNS {self.state['dns']}"))
        for ex in result.exchangers:
            r.transcript.append(("S", f"winview.test  MX preference = {ex.preference}, mail exchanger = {ex.name}"))
        for ex in result.exchangers:
            for a in ex.addresses:
                r.transcript.append(("S", f"{ex.name}  internet address = {a}"))
        prefs = [ex.preference for ex in result.exchangers]
        _check(result.ok and prefs == [10, 20], "two exchangers, preference 10 and 20", f"{result.kind} {prefs}")
        r.summary = "MX preference 10 and 20, as the mission's nslookup shows"

    def step3(self, r: StepResult) -> None:
        delivered = self.wait_for(lambda: len(self.mailbox(SUPPORT)) >= 1)
        for line in self.new_log_lines("delivery", "remote", "queue", "deferred", "delivered"):
            r.notes.append(line)
        mx1 = self.domain("winview.test")["exchangers"][0]
        refused = False
        try:
            socket.create_connection((mx1["address"], int(self.domain("winview.test")["smtp"][0].rpartition(":")[2])), timeout=2).close()
        except OSError:
            refused = True
        _check(refused, f"{mx1['name']} ({mx1['address']}) to be down", "it answered")
        _check(delivered, "the message to reach winview.test through the second exchanger", "no delivery yet")
        data = self.mailbox(SUPPORT)[0].read_bytes()
        _check(b"by mx2.winview.test" in data, "a Received: header added by mx2.winview.test", data[:300].decode(errors="replace"))
        r.summary = f"{mx1['name']} did not answer; yahoo.test fell back to mx2.winview.test, which accepted"

    def step4(self, r: StepResult) -> None:
        files = self.mailbox(SUPPORT)
        _check(len(files) == 1, "exactly one file in support's Maildir", f"{len(files)} files")
        head = files[0].read_bytes().split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")
        r.transcript.append(("S", f"stored: {files[0].relative_to(self.root)}"))
        for line in head.split("\r\n")[:8]:
            r.transcript.append(("S", line))
        _check(head.startswith("Return-Path: <bill@yahoo.test>"), "a Return-Path: <bill@yahoo.test> on top", head[:80])
        r.summary = "winview.test knew the user, stored the message in support's Maildir new/"

    def step5(self, r: StepResult) -> None:
        stored = self.mailbox(SUPPORT)[0].read_bytes()
        msgs = self.pop3(SUPPORT, SUPPORT_PW, r.transcript)
        _check(len(msgs) == 1, "one message over POP3", f"{len(msgs)}")
        _check(msgs[0] == stored, "the downloaded message to be byte-identical to the stored one", "they differ")
        r.summary = "support logged in over POP3 (STLS) and downloaded the message, byte for byte"

    def step6(self, r: StepResult) -> None:
        host, port = _ep(self.domain("winview.test")["smtp"][0])
        with socket.create_connection((host, port), timeout=10) as s:
            f = s.makefile("rb")

            def reply() -> str:
                line = f.readline()
                text = line.decode("utf-8", "replace").rstrip("\r\n")
                r.transcript.append(("S", text))
                while text[3:4] == "-":
                    text = f.readline().decode("utf-8", "replace").rstrip("\r\n")
                    r.transcript.append(("S", text))
                return text

            reply()
            last = ""
            for cmd in ("HELO spammer.test", "MAIL FROM:<bill@yahoo.test>", "RCPT TO:<bush@whitehouse.test>", "QUIT"):
                r.transcript.append(("C", cmd))
                s.sendall(cmd.encode() + b"\r\n")
                text = reply()
                if cmd.startswith("RCPT"):
                    last = text
        _check(last.startswith("554 5.7.1") and "Relay access denied" in last, "554 5.7.1 Relay access denied", last)
        r.summary = "winview.test refused to relay: 554 5.7.1 Relay access denied"

    def _bounce_for(self, needle: str, r: StepResult) -> str:
        def found() -> bool:
            return any(needle.encode() in p.read_bytes() for p in self.mailbox(BILL))

        arrived = self.wait_for(found)
        for line in self.new_log_lines("delivery", "remote", "queue", "bounce", "failed"):
            r.notes.append(line)
        _check(arrived, f"a delivery failure notice in Bill's mailbox mentioning {needle}", "none arrived")
        msgs = self.pop3(BILL, BILL_PW, r.transcript, delete=True)
        bounce = next((m for m in msgs if needle.encode() in m), b"")
        _check(bool(bounce), "Bill to download the failure notice over POP3", "not in the POP3 listing")
        parsed = email.message_from_bytes(bounce, policy=email.policy.default)
        _check(parsed.get_content_type() == "multipart/report", "an RFC 3464 multipart/report", parsed.get_content_type())
        human = ""
        for part in parsed.walk():
            if part.get_content_type() == "text/plain":
                human = str(part.get_content())
                break
        return human

    def step7(self, r: StepResult) -> None:
        code, text = self.submit("nobody@winview.test", "Anyone there?", "Is this address real?", r.transcript)
        _check(code == 250, "yahoo.test to accept the message (it cannot know winview's users)", f"{code} {text}")
        human = self._bounce_for("nobody@winview.test", r)
        _check("5.1.1" in human or "does not exist" in human or "unknown" in human.lower(),
               "the notice to say the user does not exist", human[:200])
        r.notes.append("notice: " + " ".join(human.split())[:300])
        r.summary = "winview.test refused the unknown user at RCPT (550 5.1.1); Bill got a failure notice"

    def step8(self, r: StepResult) -> None:
        code, text = self.submit("someone@nowhere.test", "Hello?", "Does this domain exist?", r.transcript)
        _check(code == 250, "yahoo.test to accept the message", f"{code} {text}")
        human = self._bounce_for("nowhere.test", r)
        _check("Couldn't find host named nowhere.test" in " ".join(human.split()) or "not found" in human.lower(),
               "the notice to say \"Couldn't find host named nowhere.test\"", human[:200])
        r.notes.append("notice: " + " ".join(human.split())[:300])
        r.summary = "no MX for nowhere.test (NXDOMAIN): Bill got \"Couldn't find host named nowhere.test\""

    TITLES = {
        1: "Bill submits a message to his own provider (STARTTLS + AUTH)",
        2: "yahoo.test looks up the MX records of winview.test",
        3: "The preferred exchanger is down; yahoo.test falls back to the second",
        4: "winview.test checks the user exists and stores the message in the Maildir",
        5: "The Winview user downloads the message over POP3",
        6: "Someone tries to use winview.test as an open relay",
        7: "Bill writes to a user that does not exist at winview.test",
        8: "Bill writes to a domain that does not exist",
    }

    def run(self, last_step: int = STEPS) -> bool:
        for n in range(1, last_step + 1):
            r = StepResult(n, self.TITLES[n], False, "")
            started = time.monotonic()
            try:
                getattr(self, f"step{n}")(r)
                r.ok = True
            except StepFailed as exc:
                r.summary = f"expected {exc.expected}\nhappened: {exc.happened}"
            except Exception as exc:  # a client-side error is a failed step, shown, not a traceback
                r.summary = f"error: {type(exc).__name__}: {exc}"
            self.results.append(r)
            self.show(r, time.monotonic() - started)
        return all(r.ok for r in self.results)

    def show(self, r: StepResult, seconds: float) -> None:
        body: list[Any] = []
        for who, line in r.transcript[-40:]:
            style = "cyan" if who == "C" else "green"
            body.append(Text(f"{who}: {line}", style=style))
        for note in r.notes[-8:]:
            body.append(Text(f"log: {note}", style="dim"))
        body.append(Text(r.summary, style="bold green" if r.ok else "bold red"))
        self.console.print(Panel(Group(*body), title=f"step {r.number}: {r.title}",
                                 subtitle=f"{'passed' if r.ok else 'FAILED'} in {seconds:.1f}s",
                                 border_style="green" if r.ok else "red"))

    def summary_table(self) -> Table:
        table = Table("step", "what happened", "result", title="serpentmail demo")
        for r in self.results:
            table.add_row(str(r.number), r.title if r.ok else r.summary, "[green]passed[/]" if r.ok else "[red]FAILED[/]")
        return table

