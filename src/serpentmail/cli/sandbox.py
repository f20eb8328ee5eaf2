"""``sandbox up|status|down`` and ``demo``: the internet in a box.

``up`` starts a detached supervisor process (``sandbox _run``) that hosts the sandbox DNS server
and every domain's serpentmail instance, waits until it reports ready (or an error), and prints
the endpoints, users and passwords. ``down`` stops the supervisor, which stops everything it
started. State lives in the sandbox directory: ``spec.json`` (what to run), ``state.json``
(what runs: pid and endpoints) and ``sandbox.log``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from ..accounts.db import AccountDB
from ..queue.store import QueueStore
from ..sandbox.control import (
    alive,
    read_state,
    start_detached,
    stop_detached,
    supervise,
    write_spec,
)
from ..sandbox.network import SandboxError, build_spec
from .app import cli, console, emit_json, fail

DEFAULT_DIR = "serpentmail-sandbox"


@cli.group()
def sandbox() -> None:
    """Run a whole "internet" of mail domains on this machine (DNS + one server per domain)."""


def endpoints_table(desc: dict[str, Any]) -> Table:
    table = Table("domain", "MX", "exchanger", "address", "submission / submissions", "POP3 / POP3S", "users (password)",
                  title=f"sandbox: DNS at {desc['dns']}")
    for d in desc["domains"]:
        users = ", ".join(f"{u} ({p})" for u, p in d["users"].items()) or "-"
        for i, e in enumerate(d["exchangers"]):
            first = i == 0
            table.add_row(
                d["domain"] if first else "",
                str(e["preference"]),
                e["name"],
                e["address"] + ("" if e["up"] else " [red](down)[/]"),
                " / ".join(d["submission"] + d["submissions"]) if first else "",
                " / ".join(d["pop3"] + d["pop3s"]) if first else "",
                users if first else "",
            )
    return table


@sandbox.command("up")
@click.option("--dir", "directory", default=DEFAULT_DIR, show_default=True, type=click.Path(file_okay=False),
              help="Where the sandbox keeps its data, state and log.")
@click.option("--domain", "domains", multiple=True, metavar="NAME[:<n>mx]",
              help="A domain (repeatable); winview.test:2mx gives it two exchangers (preference 10 and 20).")
@click.option("--user", "users", multiple=True, metavar="ADDRESS:PASSWORD", help="A user (repeatable).")
@click.option("--down", "down", multiple=True, metavar="mxK.DOMAIN",
              help="Publish this exchanger in DNS but do not run it (to watch MX fallback).")
@click.option("--config", "spec_file", type=click.Path(exists=True, dir_okay=False),
              help="TOML file with [[domain]] tables: name, mx, users = [\"a@d:pw\"], down = [1].")
@click.option("--base", default="127.10", show_default=True, help="First two octets of the sandbox's 127.x addresses.")
@click.option("--high-ports", is_flag=True, help="Use 2525/2587/... even when run as root.")
@click.option("--foreground", is_flag=True, help="Run in this process until Ctrl-C instead of detaching.")
@click.option("--json", "as_json", is_flag=True, help="Print the endpoints as JSON.")
def sandbox_up(directory: str, domains: tuple[str, ...], users: tuple[str, ...], down: tuple[str, ...],
               spec_file: str | None, base: str, high_ports: bool, foreground: bool, as_json: bool) -> int:
    """Start the sandbox: a DNS server and one serpentmail instance per domain."""
    root = Path(directory).absolute()
    try:
        spec = build_spec(list(domains), list(users), list(down), Path(spec_file) if spec_file else None)
        if not base.startswith("127.") or base.count(".") != 1:
            raise SandboxError("--base must look like 127.N (the sandbox only uses loopback addresses)")
        spec.base = base
        if high_ports:
            spec.privileged = False
        if foreground:
            state = read_state(root)
            if state and state.get("pid") and alive(int(state["pid"])):
                raise SandboxError(f"a sandbox is already running in {root} (pid {state['pid']})")
            root.mkdir(parents=True, exist_ok=True)
            write_spec(root, spec)
            return supervise(root)
        state = start_detached(root, spec)
    except SandboxError as exc:
        fail(str(exc))
        return 1
    if as_json:
        emit_json(state)
    else:
        console.print(endpoints_table(state))
        console.print(f"stop with: serpentmail sandbox down --dir {directory}", style="dim")
    return 0


@sandbox.command("_run", hidden=True)
@click.argument("directory", type=click.Path(file_okay=False, exists=True))
def sandbox_run(directory: str) -> int:
    """(internal) the supervisor process started by 'sandbox up'."""
    return supervise(Path(directory))


def _count(d: Path) -> int:
    try:
        return sum(1 for e in os.scandir(d) if e.is_file())
    except FileNotFoundError:
        return 0


def _queue_size(data_dir: Path) -> int:
    """Items in an instance's outbound queue (its envelopes; no body is read)."""
    return sum(1 for _ in QueueStore(data_dir).ids())


@sandbox.command("status")
@click.option("--dir", "directory", default=DEFAULT_DIR, show_default=True, type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def sandbox_status(directory: str, as_json: bool) -> int:
    """Show each instance's endpoints, queue and mailboxes."""
    root = Path(directory).absolute()
    state = read_state(root)
    if state is None or state.get("status") != "running" or not alive(int(state.get("pid", 0))):
        fail(f"no sandbox running in {root}")
        return 1
    rows = []
    for d in state["domains"]:
        data_dir = Path(d["data_dir"])
        db = AccountDB(data_dir / "accounts.sqlite3")
        boxes = {u.address: (_count(data_dir / "mail" / str(u.id) / "new"), _count(data_dir / "mail" / str(u.id) / "cur"))
                 for u in db.list_users()}
        db.close()
        rows.append({"domain": d["domain"], "queue": _queue_size(data_dir), "mailboxes": boxes})
    if as_json:
        emit_json({"pid": state["pid"], "dns": state["dns"], "domains": rows})
        return 0
    console.print(endpoints_table(state))
    table = Table("domain", "queued", "mailbox", "new", "read", title="queues and mailboxes")
    for r in rows:
        first = True
        for addr, (new, cur) in r["mailboxes"].items() or {"-": (0, 0)}.items():
            table.add_row(r["domain"] if first else "", str(r["queue"]) if first else "", addr, str(new), str(cur))
            first = False
    console.print(table)
    return 0


@sandbox.command("down")
@click.option("--dir", "directory", default=DEFAULT_DIR, show_default=True, type=click.Path(file_okay=False))
def sandbox_down(directory: str) -> int:
    """Stop the sandbox and everything it started."""
    root = Path(directory).absolute()
    if not stop_detached(root):
        fail(f"no sandbox running in {root}")
    click.echo(f"sandbox in {root} stopped")
    return 0


@cli.command()
@click.option("--step", "last_step", type=click.IntRange(1, 8), default=8, show_default=True,
              help="Stop after this step.")
@click.option("--keep", is_flag=True, help="Leave the sandbox running afterwards (its directory is printed).")
@click.option("--base", default="127.11", show_default=True, help="First two octets of the demo's 127.x addresses.")
def demo(last_step: int, keep: bool, base: str) -> int:
    """Run the mission's story (two providers, DNS, MX fallback, POP3, bounces) and narrate it."""
    from ..sandbox.demo import Demo

    show = Demo(console, base=base)
    console.rule("serpentmail demo: how email works, for real, on this machine")
    try:
        with console.status("starting the sandbox: DNS, yahoo.test, winview.test (mx1 down, mx2 up)"):
            show.start()
    except SandboxError as exc:
        stop_detached(show.root)
        fail(f"cannot start the demo sandbox: {exc}")
    console.print(endpoints_table(show.state))
    try:
        ok = show.run(last_step)
    finally:
        if not keep:
            stop_detached(show.root)
            shutil.rmtree(show.root, ignore_errors=True)
    console.print(show.summary_table())
    if keep:
        console.print(f"sandbox left running in {show.root}; stop it with: serpentmail sandbox down --dir {show.root}")
    return 0 if ok else 1
