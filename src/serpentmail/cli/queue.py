"""``serpentmail queue list|show|flush|delete|retry``: look at and steer the outbound queue.

The commands read the spool files directly (envelopes only; message bodies are never loaded
except the header lines ``show`` prints), so they work with or without a running server.

How ``flush`` and ``retry`` reach a running server: they leave a request file in
``data_dir/queue/control/`` (``flush.ALL``, ``flush.<id>``, ``retry.<id>``); the scheduler
polls that directory every second, consumes the files and tries the items at once (``retry``
also restarts the item's backoff schedule). With no server running, the request waits for the
next start, which tries every pending recipient anyway. ``delete`` removes the envelope (the
commit point) then the data file; a running scheduler that is delivering the item at that
moment notices the data is gone and does not write the envelope back.
"""

from __future__ import annotations

import time
from typing import Any

import click
from rich.table import Table

from ..queue.store import EnvelopeRecord, QueueStore, valid_id
from ..storage.journal import wait_checkpointed
from .app import State, cli, console, emit_json, fail

JOURNAL_WAIT = 3.0  # seconds: a running server checkpoints its journal about every second


def _store(state: State) -> QueueStore:
    # A running server's items of the last second are in its journal only: listed from there.
    return QueueStore(state.config.data_dir, read_journals=True)


def _age(seconds: float) -> str:
    s = int(max(0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600:02d}h"


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _item_json(rec: EnvelopeRecord, now: float) -> dict[str, Any]:
    return {
        "id": rec.id,
        "age": round(now - rec.arrival, 1),
        "arrival": _iso(rec.arrival),
        "size": rec.size,
        "sender": rec.sender,
        "next_attempt": _iso(rec.next_due()),
        "recipients": [
            {
                "address": r.address,
                "state": r.state,
                "attempts": r.attempts,
                "next_attempt": _iso(r.next_attempt) if r.state == "pending" else None,
                "last_attempt": _iso(r.last_attempt),
                "last_reply": r.last_reply,
                "remote_mta": r.remote_mta,
            }
            for r in rec.recipients
        ],
    }


def _load(store: QueueStore, qid: str) -> EnvelopeRecord:
    if not valid_id(qid):
        fail(f"bad queue id {qid!r}")
    rec = store.load(qid)
    if rec is None or not store.exists(qid):
        fail(f"no such queue item: {qid}")
    assert rec is not None
    return rec


@cli.group()
def queue() -> None:
    """Inspect and steer the outbound queue (works with or without a running server)."""


@queue.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def queue_list(state: State, as_json: bool) -> None:
    """List queued messages, oldest first."""
    store = _store(state)
    now = time.time()
    items = sorted(store.scan(), key=lambda r: (r.arrival, r.id))
    if as_json:
        emit_json([_item_json(r, now) for r in items])
        return
    table = Table("id", "age", "size", "sender", "recipients (state, attempts)", "next attempt", "last reply",
                  title=f"queue: {len(items)} message(s)")
    for rec in items:
        rcpts = "\n".join(f"{r.address} ({r.state}, {r.attempts})" for r in rec.recipients)
        replies = "\n".join(r.last_reply or "-" for r in rec.recipients)
        due = rec.next_due()
        nxt = "-" if due is None else ("now" if due <= now else f"in {_age(due - now)}")
        table.add_row(rec.id, _age(now - rec.arrival), str(rec.size), f"<{rec.sender}>", rcpts, nxt, replies)
    console.print(table)


@queue.command("show")
@click.argument("qid", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def queue_show(state: State, qid: str, as_json: bool) -> None:
    """Show one queued message: envelope, per-recipient state and its headers."""
    store = _store(state)
    rec = _load(store, qid)
    now = time.time()
    headers = store.read_headers(qid).decode("utf-8", "replace")
    if as_json:
        obj = _item_json(rec, now)
        obj["headers"] = headers
        emit_json(obj)
        return
    console.print(f"[bold]{rec.id}[/bold]  from <{rec.sender}>  size {rec.size}  age {_age(now - rec.arrival)}")
    table = Table("recipient", "state", "attempts", "next attempt", "remote MTA", "last reply")
    for r in rec.recipients:
        nxt = "-" if r.state != "pending" else ("now" if r.next_attempt <= now else f"in {_age(r.next_attempt - now)}")
        table.add_row(r.address, r.state, str(r.attempts), nxt, r.remote_mta or "-", r.last_reply or "-")
    console.print(table)
    console.print(headers.rstrip(), markup=False, highlight=False)


@queue.command("flush")
@click.argument("qid", metavar="[ID]", required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def queue_flush(state: State, qid: str | None, as_json: bool) -> None:
    """Try every queued message (or one) now."""
    store = _store(state)
    if qid is not None:
        _load(store, qid)
    store.request("flush", qid)
    if as_json:
        emit_json({"requested": "flush", "id": qid})
    else:
        click.echo(f"flush requested for {qid or 'all messages'} (a running server acts within a second)")


@queue.command("retry")
@click.argument("qid", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def queue_retry(state: State, qid: str, as_json: bool) -> None:
    """Try one message now and restart its backoff schedule."""
    store = _store(state)
    _load(store, qid)
    store.request("retry", qid)
    if as_json:
        emit_json({"requested": "retry", "id": qid})
    else:
        click.echo(f"retry requested for {qid} (a running server acts within a second)")


@queue.command("delete")
@click.argument("qid", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def queue_delete(state: State, qid: str, as_json: bool) -> None:
    """Delete a queued message without delivering or bouncing it."""
    store = _store(state)
    if not valid_id(qid):
        fail(f"bad queue id {qid!r}")
    # An item accepted in the last second may still be in the server's delivery journal:
    # deleted now, a crash before the journal's checkpoint would bring it back at the next
    # start. A running server checkpoints within about a second.
    names = {f"queue/data/{qid}", f"queue/env/{qid}.json"}
    if wait_checkpointed(state.config.data_dir, names, None, JOURNAL_WAIT):
        fail(f"queue item {qid} is still in a delivery journal that no running server has checkpointed; "
             "start the server (its start replays the journal), then delete it")
    if not store.remove(qid):
        fail(f"no such queue item: {qid}")
    if as_json:
        emit_json({"deleted": qid})
    else:
        click.echo(f"deleted {qid}")
