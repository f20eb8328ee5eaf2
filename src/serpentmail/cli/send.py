"""``send`` and ``sendmail``: the mission's mail client role.

``send`` composes a MIME message with the stdlib ``email`` package and submits it to the
configured submission server with STARTTLS (or implicit TLS) and AUTH, reporting a result per
recipient. ``sendmail`` is the classic ``sendmail -t -i`` entry point for scripts and cron: it
reads a finished message on stdin and submits it the same way.

Passwords come from a prompt, ``--password-stdin`` or ``$SERPENTMAIL_PASSWORD``; they are never
taken from the command line (where ``ps`` would show them).
"""

from __future__ import annotations

import ipaddress
import mimetypes
import os
import smtplib
import socket
import ssl
import sys
from collections.abc import Callable
from dataclasses import dataclass
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import SMTP as SMTP_POLICY
from email.utils import formatdate, getaddresses, make_msgid
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.table import Table

from ..config import Config
from .app import State, cli, console, emit_json, err_console, fail


@dataclass(frozen=True, slots=True)
class SubmitTarget:
    host: str
    port: int
    implicit_tls: bool
    verify: bool


def _default_target(cfg: Config, use_tls: bool) -> tuple[str, int]:
    listener = cfg.submissions if use_tls else cfg.submission
    if not listener.listen:
        fail(f"no {'submissions' if use_tls else 'submission'} listener in the config; give --host and --port")
    ep = listener.listen[0]
    host = ep.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return host, ep.port


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _tls_context(verify: bool, cafile: str | None) -> ssl.SSLContext:
    if not verify:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    return ssl.create_default_context(cafile=cafile)


def _password(password_stdin: bool, user: str) -> str:
    if password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    env = os.environ.get("SERPENTMAIL_PASSWORD")
    if env is not None:
        return env
    return str(click.prompt(f"Password for {user}", hide_input=True, err=True))


def submit(target: SubmitTarget, user: str, password: str, msg: EmailMessage | bytes, sender: str,
           recipients: list[str], *, cafile: str | None = None, timeout: float = 60.0) -> dict[str, tuple[int, str]]:
    """Submit one message; returns {recipient: (code, text)} for every recipient.

    Raises smtplib/ssl/OSError errors for session-level failures (connect, TLS, AUTH).
    """
    ctx = _tls_context(target.verify, cafile)
    smtp: smtplib.SMTP
    if target.implicit_tls:
        smtp = smtplib.SMTP_SSL(target.host, target.port, timeout=timeout, context=ctx)
    else:
        smtp = smtplib.SMTP(target.host, target.port, timeout=timeout)
    with smtp:
        smtp.ehlo(socket.getfqdn() or "localhost")
        if not target.implicit_tls:
            # RFC 3207: upgrade before any credential crosses the wire.
            if not smtp.has_extn("starttls"):
                raise smtplib.SMTPNotSupportedError("server does not offer STARTTLS; refusing to send the password in clear")
            smtp.starttls(context=ctx)
            smtp.ehlo(socket.getfqdn() or "localhost")
        smtp.login(user, password)
        results: dict[str, tuple[int, str]] = {}
        data = msg.as_bytes(policy=SMTP_POLICY) if isinstance(msg, EmailMessage) else msg
        try:
            refused = smtp.sendmail(sender, recipients, data)
        except smtplib.SMTPRecipientsRefused as exc:
            refused = exc.recipients
        except smtplib.SMTPResponseException as exc:
            return {r: (exc.smtp_code, _text(exc.smtp_error)) for r in recipients}
        for r in recipients:
            if r in refused:
                code, reply = refused[r]
                results[r] = (code, _text(reply))
            else:
                results[r] = (250, "accepted")
        return results


def _text(reply: bytes | str) -> str:
    return reply.decode("utf-8", "replace") if isinstance(reply, bytes) else str(reply)


def _report(results: dict[str, tuple[int, str]], as_json: bool) -> int:
    ok = all(200 <= code < 300 for code, _ in results.values())
    if as_json:
        emit_json([{"recipient": r, "code": c, "reply": t, "accepted": 200 <= c < 300} for r, (c, t) in results.items()])
    else:
        table = Table("recipient", "result", "reply", title="submission")
        for r, (code, text) in results.items():
            table.add_row(r, "[green]accepted[/]" if 200 <= code < 300 else "[red]refused[/]", f"{code} {text}")
        console.print(table)
    return 0 if ok else 1


def _target(state: State, host: str | None, port: int | None, tls_mode: str, insecure: bool) -> SubmitTarget:
    implicit = tls_mode == "tls"
    if host is None or port is None:
        dhost, dport = _default_target(state.config, implicit)
        host = host or dhost
        port = port or dport
    verify = not insecure
    cfg = state.config
    if verify and _is_loopback(host) and cfg.tls.cert is None:
        # Our own server on this machine with its self-signed certificate.
        err_console.print("note: loopback server with a self-signed certificate; not verifying it", style="dim")
        verify = False
    return SubmitTarget(host, port, implicit, verify)


def _submit_and_report(target: SubmitTarget, login: str, password: str, msg: EmailMessage | bytes, sender: str,
                       recipients: list[str], cafile: str | None, as_json: bool) -> int:
    try:
        results = submit(target, login, password, msg, sender, recipients, cafile=cafile)
    except (smtplib.SMTPException, OSError) as exc:
        _session_error(exc)
        return 1
    return _report(results, as_json)


def _session_error(exc: Exception) -> None:
    if isinstance(exc, smtplib.SMTPAuthenticationError):
        fail(f"authentication failed: {exc.smtp_code} {_text(exc.smtp_error)}")
    if isinstance(exc, smtplib.SMTPResponseException):
        fail(f"server refused: {exc.smtp_code} {_text(exc.smtp_error)}")
    if isinstance(exc, ssl.SSLError):
        fail(f"TLS failed: {exc.reason or exc}")
    fail(f"cannot submit: {exc}")


_common = [
    click.option("--host", help="Submission server (default: from the config)."),
    click.option("--port", type=int, help="Submission port (default: from the config)."),
    click.option("--tls", "tls_mode", type=click.Choice(["starttls", "tls"]), default="starttls", show_default=True,
                 help="STARTTLS on the submission port, or implicit TLS (submissions, RFC 8314)."),
    click.option("--user", help="Login name (default: the sender address)."),
    click.option("--password-stdin", is_flag=True, help="Read the password from the first line of stdin."),
    click.option("--insecure", is_flag=True, help="Do not verify the server certificate."),
    click.option("--cafile", type=click.Path(exists=True, dir_okay=False), help="CA bundle to verify the server."),
    click.option("--json", "as_json", is_flag=True, help="Machine-readable per-recipient results."),
]


F = TypeVar("F", bound=Callable[..., Any])


def _with_common(fn: F) -> F:
    for opt in reversed(_common):
        fn = opt(fn)
    return fn


@cli.command()
@click.option("--from", "sender", required=True, help="Your address (must be one of your own).")
@click.option("--to", "to", multiple=True, required=True, help="Recipient (repeatable).")
@click.option("--cc", multiple=True, help="Copy recipient (repeatable).")
@click.option("--bcc", multiple=True, help="Blind copy recipient (repeatable; not shown in headers).")
@click.option("--subject", default="", help="Subject line.")
@click.option("--attach", multiple=True, type=click.Path(exists=True, dir_okay=False), help="File to attach (repeatable).")
@click.option("--body-file", type=click.Path(exists=True, dir_okay=False), help="Body from this file instead of stdin.")
@_with_common
@click.pass_obj
def send(state: State, sender: str, to: tuple[str, ...], cc: tuple[str, ...], bcc: tuple[str, ...], subject: str,
         attach: tuple[str, ...], body_file: str | None, host: str | None, port: int | None, tls_mode: str,
         user: str | None, password_stdin: bool, insecure: bool, cafile: str | None, as_json: bool) -> int:
    """Compose a message (body on stdin) and submit it with STARTTLS and AUTH."""
    target = _target(state, host, port, tls_mode, insecure)
    login = user or sender
    password = _password(password_stdin, login)
    if body_file:
        body = Path(body_file).read_text(encoding="utf-8")
    elif password_stdin:
        body = sys.stdin.read()
    else:
        body = "" if sys.stdin.isatty() else sys.stdin.read()
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = ", ".join(to)
    if cc:
        msg["Cc"] = ", ".join(cc)
    msg["Subject"] = subject
    msg["Date"] = formatdate(localtime=True)
    msg["Message-ID"] = make_msgid(domain=sender.rpartition("@")[2] or None)
    msg.set_content(body)
    for path in attach:
        ctype, _ = mimetypes.guess_type(path)
        maintype, subtype = (ctype or "application/octet-stream").split("/", 1)
        msg.add_attachment(Path(path).read_bytes(), maintype=maintype, subtype=subtype, filename=Path(path).name)
    return _submit_and_report(target, login, password, msg, sender, [*to, *cc, *bcc], cafile, as_json)


@cli.command()
@click.option("-t", "from_headers", is_flag=True, help="Take recipients from To/Cc/Bcc (Bcc is removed).")
@click.option("-i", "ignore_dots", is_flag=True, help="Accepted for compatibility (a lone '.' does not end input).")
@click.option("-f", "sender", help="Envelope sender (default: the From header, or --user).")
@click.option("-oi", "ignore_dots2", is_flag=True, hidden=True)
@click.argument("recipients", nargs=-1)
@_with_common
@click.pass_obj
def sendmail(state: State, from_headers: bool, ignore_dots: bool, sender: str | None, ignore_dots2: bool,
             recipients: tuple[str, ...], host: str | None, port: int | None, tls_mode: str, user: str | None,
             password_stdin: bool, insecure: bool, cafile: str | None, as_json: bool) -> int:
    """sendmail-compatible: submit the message on stdin (use -t for header recipients).

    Credentials: --user (or $SERPENTMAIL_USER) and $SERPENTMAIL_PASSWORD, since stdin carries
    the message.
    """
    if password_stdin:
        fail("sendmail reads the message on stdin; give the password in $SERPENTMAIL_PASSWORD")
    raw = sys.stdin.buffer.read()
    msg = BytesParser(policy=SMTP_POLICY).parsebytes(raw)
    rcpts = list(recipients)
    if from_headers:
        fields = [str(v) for h in ("To", "Cc", "Bcc") for v in msg.get_all(h, [])]
        rcpts += [addr for _, addr in getaddresses(fields) if addr]
        del msg["Bcc"]
    if not rcpts:
        fail("no recipients (give them as arguments or use -t)")
    from_header = str(msg.get("From", ""))
    header_sender = next((a for _, a in getaddresses([from_header]) if a), "") if from_header else ""
    login = user or os.environ.get("SERPENTMAIL_USER") or sender or header_sender
    if not login:
        fail("no login: give --user or set $SERPENTMAIL_USER")
    env_sender = sender or header_sender or login
    password = os.environ.get("SERPENTMAIL_PASSWORD")
    if password is None:
        fail("set $SERPENTMAIL_PASSWORD (stdin carries the message)")
        return 1
    target = _target(state, host, port, tls_mode, insecure)
    data = msg.as_bytes(policy=SMTP_POLICY) if from_headers else raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return _submit_and_report(target, login, password, data, env_sender, rcpts, cafile, as_json)
