"""``serve`` and ``config check|show``."""

from __future__ import annotations

import asyncio

import click
from rich.table import Table

from ..config import config_to_dict
from ..log import setup_logging
from ..server.run import Server, StartupError, install_event_loop_policy
from .app import State, cli, console, emit_json, fail


def _print_ready(server: Server, embedded: bool) -> None:
    cfg = server.config
    table = Table("service", "listening on", title=f"serpentmail on {cfg.hostname}")
    for kind, ep in server.bound:
        table.add_row(kind, str(ep))
    console.print(table)
    console.print(f"data directory: {cfg.data_dir}")
    domains = server.ctx.accounts.list_domains() if server.ctx else []
    console.print(f"local domains: {', '.join(domains) or '(none)'}")
    cfg_flag = f"-c {cfg.source} " if cfg.source else ""
    example = f"bill@{domains[0]}" if domains else "bill@example.test"
    console.print(f"add a user:  printf 'secret\\n' | serpentmail {cfg_flag}user add {example} --password-stdin")
    if embedded:
        console.print("(embedded default: no config file; use -c CONFIG for real domains)")
    console.print("stop with Ctrl-C or SIGTERM", style="dim")


@cli.command()
@click.option("--json-log", is_flag=True, help="Log one JSON object per line.")
@click.pass_obj
def serve(state: State, json_log: bool) -> int:
    """Run the mail server (MX, submission, POP3 listeners and the queue)."""
    cfg = state.config
    setup_logging("json" if json_log else cfg.log.format, cfg.log.level, cfg.log.file)
    install_event_loop_policy()
    server = Server(cfg)
    try:
        asyncio.run(server.run_until_signal(lambda s: _print_ready(s, cfg.source is None)))
    except StartupError as exc:
        fail(f"cannot start: {exc}")
    return 0


@cli.group("config")
def config_group() -> None:
    """Check or show the configuration."""


@config_group.command("check")
@click.pass_obj
def config_check(state: State) -> None:
    """Validate the config file (errors name the key, file and line)."""
    cfg = state.config
    click.echo(f"{cfg.source or 'embedded default'}: OK")


@config_group.command("show")
@click.pass_obj
def config_show(state: State) -> None:
    """Print the effective configuration (defaults filled in) as JSON."""
    emit_json(config_to_dict(state.config))
