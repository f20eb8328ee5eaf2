"""``serpentmail mx DOMAIN [--json]``: the mission's ``nslookup`` step.

Looks the domain up through the configured resolver (``[dns] nameservers`` or the system's)
exactly as the remote courier does, and shows each exchanger (preference, name, addresses)
and what serpentmail would do with mail for the domain: deliver (to the best exchanger
first), deliver to the implicit MX, bounce (null MX, no such domain), retry later (temporary
DNS failure), or bounce because the best MX is this server itself (a loop). With a smart host
configured, the lookup is still shown, with a note that every message goes to the relay.

Exit status: 0 when mail to the domain would be attempted, 1 for a permanent verdict
(the message would bounce), 2 for a temporary one.
"""

from __future__ import annotations

from typing import Any

import click
from rich.table import Table

from ..delivery.dns import MXResult
from ..delivery.remote import RemoteCourier
from .app import State, cli, console, emit_json


def _verdict(courier: RemoteCourier, res: MXResult) -> tuple[str, str]:
    """(short action, sentence) for the table and the JSON."""
    match res.kind:
        case "nxdomain":
            return "does not exist", f"bounce at once: Couldn't find host named {res.domain}"
        case "nodata":
            return "does not exist", f"bounce at once: {res.reason}"
        case "null":
            return "null MX", "bounce at once: the domain accepts no mail (RFC 7505, 556 5.1.10)"
        case "tempfail":
            return "temporary failure", f"retry later: {res.reason}"
    exchangers = list(res.exchangers)
    mine = courier.own_rank(exchangers)
    if mine is not None and mine <= exchangers[0].preference:
        return "loop", f"bounce: mail for {res.domain} loops back to myself"
    usable = [e for e in exchangers if e.addresses and (mine is None or e.preference < mine)]
    first = usable[0].name if usable else "?"
    if res.kind == "implicit":
        return "implicit MX", f"deliver to {first} (no MX records: its own address, RFC 5321 §5.1)"
    return "deliver", f"deliver to {first} first, then the others in order of preference"


@cli.command("mx")
@click.argument("domain")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def mx_command(state: State, domain: str, as_json: bool) -> int:
    """Look up where mail for DOMAIN goes, as the queue would."""
    import asyncio

    cfg = state.config
    courier = RemoteCourier(cfg)
    res = asyncio.run(courier.resolver.resolve_mx(domain))
    action, sentence = _verdict(courier, res)
    relay = str(cfg.delivery.relay) if cfg.delivery.relay is not None else None
    if relay:
        sentence += f" (but a relay is configured: every message goes to {relay})"
    code = 1 if res.permanent or action == "loop" else 2 if res.temporary else 0
    if as_json:
        out: dict[str, Any] = {
            "domain": res.domain,
            "kind": res.kind,
            "action": action,
            "detail": sentence,
            "relay": relay,
            "exchangers": [
                {"preference": e.preference, "exchanger": e.name, "addresses": list(e.addresses),
                 "error": e.error or None}
                for e in res.exchangers
            ],
        }
        emit_json(out)
        return code
    table = Table(title=f"MX for {res.domain}")
    table.add_column("Preference", justify="right")
    table.add_column("Exchanger")
    table.add_column("Addresses")
    for e in res.exchangers:
        addrs = ", ".join(e.addresses) if e.addresses else f"[red]{e.error or 'no address'}[/red]"
        table.add_row(str(e.preference), e.name, addrs)
    if res.exchangers:
        console.print(table)
    colour = {0: "green", 1: "red", 2: "yellow"}[code]
    console.print(f"[{colour}]{action}[/{colour}]: {sentence}")
    return code
