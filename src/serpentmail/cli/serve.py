"""``serve`` and ``config check|show``."""

from __future__ import annotations

import asyncio

import click
from rich.table import Table

from ..accounts.db import AccountDB
from ..config import Config, config_to_dict
from ..log import setup_logging
from ..server.run import Server, StartupError, install_event_loop_policy
from ..server.workers import serve_workers
from .app import State, cli, console, emit_json, fail


def _print_ready(cfg: Config, rows: list[tuple[str, str]], domains: list[str], embedded: bool) -> None:
    title = f"serpentmail on {cfg.hostname}" + (f" ({cfg.workers} worker processes)" if cfg.workers > 1 else "")
    table = Table("service", "listening on", title=title)
    for kind, ep in rows:
        table.add_row(kind, ep)
    console.print(table)
    console.print(f"data directory: {cfg.data_dir}")
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
    """Run the mail server (MX, submission, POP3 listeners and the queue).

    With `workers = N` (or "auto") in the config, N processes share the listeners; the
    first also runs the queue scheduler."""
    cfg = state.config
    setup_logging("json" if json_log else cfg.log.format, cfg.log.level, cfg.log.file)
    embedded = cfg.source is None
    try:
        if cfg.workers > 1:
            def ready_rows(rows: list[tuple[str, str]]) -> None:
                accounts = AccountDB(cfg.db_path)
                try:
                    domains = accounts.list_domains()
                finally:
                    accounts.close()
                _print_ready(cfg, rows, domains, embedded)

            serve_workers(cfg, ready_rows)
            return 0
        install_event_loop_policy()
        server = Server(cfg, freeze_gc=True)

        def ready(s: Server) -> None:
            domains = s.ctx.accounts.list_domains() if s.ctx else []
            _print_ready(cfg, [(k, str(e)) for k, e in s.bound], domains, embedded)

        asyncio.run(server.run_until_signal(ready))
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
