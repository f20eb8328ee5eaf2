"""The ``serpentmail`` command: ``main(argv) -> int``.

Subcommands live in sibling modules, each attaching itself to :data:`app.cli`. Errors a person
can fix (bad config, unknown domain, port taken) are printed as one clear line with a non-zero
exit code, never as a traceback.
"""

from __future__ import annotations

import sqlite3
import sys

from . import accounts as _accounts  # noqa: F401  (registers commands)
from . import serve as _serve  # noqa: F401
from .app import cli

for _optional in ("queue", "send", "sandbox", "fetch", "mx"):
    try:
        __import__(f"{__name__}.{_optional}")
    except ModuleNotFoundError as _exc:  # a command module not written yet
        if _exc.name != f"{__name__}.{_optional}":
            raise


def main(argv: list[str] | None = None) -> int:
    try:
        result = cli.main(args=argv, prog_name="serpentmail", standalone_mode=False)
    except SystemExit as exc:  # click exits for --help and usage errors
        return int(exc.code or 0) if isinstance(exc.code, int | None) else 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        import click

        if isinstance(exc, click.exceptions.Abort):
            print("Aborted.", file=sys.stderr)
            return 1
        if isinstance(exc, click.ClickException):
            exc.show()
            return exc.exit_code
        if isinstance(exc, OSError):  # the data directory unusable, a file unreadable, ...
            where = f": {exc.filename}" if exc.filename else ""
            print(f"Error: {exc.strerror or exc}{where}", file=sys.stderr)
            return 1
        if isinstance(exc, sqlite3.Error):
            print(f"Error: accounts database: {exc}", file=sys.stderr)
            return 1
        raise
    return int(result or 0) if isinstance(result, int) else 0


def run() -> None:
    sys.exit(main())
