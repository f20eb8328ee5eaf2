"""The click group and helpers shared by every subcommand."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from .. import __version__
from ..accounts.db import AccountDB, AccountError
from ..config import Config, ConfigError, embedded_default, load

# Outside a terminal (pipes, logs, tests) rich would wrap tables at 80 columns.
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


class State:
    def __init__(self, config_path: str | None) -> None:
        self.config_path = config_path
        self._config: Config | None = None

    @property
    def config(self) -> Config:
        if self._config is None:
            self._config = load_config(self.config_path)
        return self._config

    def accounts(self) -> AccountDB:
        cfg = self.config
        db = AccountDB(cfg.db_path)
        for d in cfg.default_domains:
            db.ensure_domain(d)
        return db


def load_config(path: str | None) -> Config:
    """The config from ``-c``, ``$SERPENTMAIL_CONFIG``, or the embedded default."""
    chosen = path or os.environ.get("SERPENTMAIL_CONFIG")
    try:
        if chosen:
            return load(Path(chosen))
        return embedded_default()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc


def fail(message: str, code: int = 1) -> None:
    """Exit with a one-line error."""
    err = click.ClickException(message)
    err.exit_code = code
    raise err


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-c", "--config", "config_path", metavar="CONFIG", envvar="SERPENTMAIL_CONFIG",
              help="TOML config file (also $SERPENTMAIL_CONFIG). Without one: the embedded default "
                   "(data in ./serpentmail-data, domain localhost, 127.0.0.1 high ports).")
@click.version_option(__version__, prog_name="serpentmail")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None) -> None:
    """serpentmail: a complete, self-hostable mail system.

    MX server, submission with AUTH, durable queue with MX delivery, Maildir, POP3.
    """
    ctx.obj = State(config_path)


def account_errors(fn: Any) -> Any:
    """Turn AccountError into a clean CLI error."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except AccountError as exc:
            fail(str(exc))
        return None

    return wrapper
