"""``serpentmail fetch ADDRESS``: a small POP3 client (stdlib poplib) for a user's mail.

Without ``--out`` it lists the maildrop (From, Subject, size) from ``TOP n 0``, reading no
bodies. With ``--out DIR`` it downloads every message into the Maildir ``DIR`` (written to
``tmp/`` then renamed into ``new/``, the Maildir recipe) byte-for-byte as the server stored
it; ``--delete`` then marks each saved message and QUIT removes them on the server.

The host and port default to the config's ``pop3`` listener (``pop3s`` with ``--tls``).
Certificates are verified except for loopback hosts, where the embedded default serves a
self-signed certificate; ``--cafile`` and ``--no-verify`` override that.
"""

from __future__ import annotations

import ipaddress
import os
import poplib
import socket
import ssl
import sys
import time
from email.header import decode_header, make_header
from email.parser import HeaderParser
from pathlib import Path

import click
from rich.table import Table

from .app import State, cli, console, emit_json, fail

# poplib refuses lines over 2048 octets; RFC 5322 allows 998 and real mail is sloppier.
poplib._MAXLINE = 1 << 20  # type: ignore[attr-defined]
_DEFAULT_PORTS = {"tls": 995, "starttls": 110, "plain": 110}


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _header(raw: object) -> str:
    """A header value as text: RFC 2047 encoded-words decoded, one line."""
    if raw is None:
        return ""
    text = str(raw)
    try:
        text = str(make_header(decode_header(text)))
    except (ValueError, LookupError):
        pass
    return " ".join(text.split())


def _connect(host: str, port: int, mode: str, tls_ctx: ssl.SSLContext, timeout: float) -> poplib.POP3:
    if mode == "tls":
        return poplib.POP3_SSL(host, port, context=tls_ctx, timeout=timeout)
    client = poplib.POP3(host, port, timeout=timeout)
    if mode == "starttls":
        client.stls(context=tls_ctx)
    return client


def _save(out: Path, data: bytes, seq: int) -> Path:
    """Maildir delivery: write in tmp/, fsync, rename into new/."""
    name = f"{int(time.time())}.M{time.time_ns() // 1000 % 1_000_000}P{os.getpid()}Q{seq}.{socket.gethostname()}"
    tmp = out / "tmp" / name
    with open(tmp, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    final = out / "new" / f"{name},S={len(data)}"
    os.rename(tmp, final)
    return final


@cli.command()
@click.argument("address")
@click.option("--host", help="POP3 server (default: the config's pop3/pop3s listener).")
@click.option("--port", type=int, help="Port (default: the listener's, or 110/995).")
@click.option("--tls", "mode", flag_value="tls", help="Implicit TLS (POP3S, RFC 8314).")
@click.option("--starttls", "mode", flag_value="starttls", help="Plain connection upgraded with STLS (default).")
@click.option("--plain", "mode", flag_value="plain", help="No TLS (the server allows this on loopback only).")
@click.option("--password-stdin", is_flag=True, help="Read the password from the first line of stdin.")
@click.option("--delete", is_flag=True, help="Delete each message on the server once saved (needs --out).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Save messages into this Maildir.")
@click.option("--cafile", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="CA bundle to verify the server.")
@click.option("--no-verify", is_flag=True, help="Do not verify the server certificate.")
@click.option("--timeout", type=float, default=60.0, show_default=True, help="Network timeout in seconds.")
@click.option("--json", "as_json", is_flag=True, help="Print the listing or result as JSON.")
@click.pass_obj
def fetch(state: State, address: str, host: str | None, port: int | None, mode: str | None,
          password_stdin: bool, delete: bool, out: Path | None, cafile: Path | None, no_verify: bool,
          timeout: float, as_json: bool) -> None:
    """Download or list ADDRESS's mail over POP3."""
    mode = mode or "starttls"
    if delete and out is None:
        fail("--delete needs --out: messages are only deleted once saved")
    if host is None or port is None:
        cfg = state.config
        eps = cfg.pop3s.listen if mode == "tls" else cfg.pop3.listen
        if eps:
            host = host or {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(eps[0].host, eps[0].host)
            port = port or eps[0].port
    host = host or "127.0.0.1"
    port = port or _DEFAULT_PORTS[mode]
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = click.prompt(f"Password for {address}", hide_input=True)
    tls_ctx = ssl.create_default_context(cafile=str(cafile) if cafile else None)
    if no_verify or (cafile is None and _is_loopback(host)):
        tls_ctx.check_hostname = False
        tls_ctx.verify_mode = ssl.CERT_NONE
    try:
        client = _connect(host, port, mode, tls_ctx, timeout)
    except (OSError, poplib.error_proto) as exc:
        fail(f"cannot connect to {host}:{port} ({mode}): {exc}")
        return
    try:
        client.user(address)
        client.pass_(password)
        if out is None:
            _list(client, as_json)
            client.quit()
            return
        for sub in ("tmp", "new", "cur"):
            (out / sub).mkdir(parents=True, exist_ok=True)
        count, _octets = client.stat()
        saved = 0
        total = 0
        for n in range(1, count + 1):
            _resp, lines, _ = client.retr(n)
            data = b"".join(line + b"\r\n" for line in lines)
            _save(out, data, n)
            saved += 1
            total += len(data)
            if delete:
                client.dele(n)
        client.quit()  # QUIT applies the deletions (RFC 1939 §6)
    except poplib.error_proto as exc:
        fail(f"server said: {exc.args[0].decode('utf-8', 'replace') if exc.args and isinstance(exc.args[0], bytes) else exc}")
        return
    except OSError as exc:
        fail(f"connection to {host}:{port} failed: {exc}")
        return
    finally:
        try:
            client.close()
        except OSError:
            pass
    if as_json:
        emit_json({"saved": saved, "octets": total, "deleted": saved if delete else 0, "out": str(out)})
    else:
        console.print(f"saved {saved} message(s), {total} octets, into {out}" + (" (deleted on the server)" if delete else ""))


def _list(client: poplib.POP3, as_json: bool) -> None:
    _resp, listing, _ = client.list()
    rows = []
    parser = HeaderParser()
    for entry in listing:
        num, size = entry.split()[:2]
        _r, head, _ = client.top(int(num), 0)
        # RFC 6532: header fields may hold raw UTF-8; anything else is shown replaced.
        msg = parser.parsestr(b"\r\n".join(head).decode("utf-8", "replace") + "\r\n")
        rows.append({"n": int(num), "from": _header(msg.get("From")), "subject": _header(msg.get("Subject")),
                     "size": int(size)})
    if as_json:
        emit_json(rows)
        return
    table = Table(title=f"{len(rows)} message(s)")
    table.add_column("#", justify="right")
    table.add_column("From")
    table.add_column("Subject")
    table.add_column("Size", justify="right")
    for r in rows:
        table.add_row(str(r["n"]), str(r["from"]), str(r["subject"]), str(r["size"]))
    console.print(table)

