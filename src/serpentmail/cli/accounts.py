"""``domain``, ``user`` and ``alias`` commands: the administrator's account management."""

from __future__ import annotations

import sys

import click
from rich.table import Table

from .app import State, account_errors, cli, console, emit_json, fail


@cli.group()
def domain() -> None:
    """Manage the domains this server receives mail for."""


@domain.command("add")
@click.argument("name")
@click.pass_obj
@account_errors
def domain_add(state: State, name: str) -> None:
    """Add a local domain."""
    added = state.accounts().add_domain(name)
    click.echo(f"domain {added} added")


@domain.command("del")
@click.argument("name")
@click.option("--force", is_flag=True, help="Delete even if the domain still has users.")
@click.pass_obj
@account_errors
def domain_del(state: State, name: str, force: bool) -> None:
    """Delete a local domain (its users and aliases too, with --force)."""
    state.accounts().del_domain(name, force=force)
    click.echo(f"domain {name.lower()} deleted")


@domain.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def domain_list(state: State, as_json: bool) -> None:
    """List local domains."""
    domains = state.accounts().list_domains()
    if as_json:
        emit_json(domains)
        return
    table = Table("domain", title="domains")
    for d in domains:
        table.add_row(d)
    console.print(table)


def _read_password(password_stdin: bool, prompt: str = "Password") -> str:
    if password_stdin:
        pw = sys.stdin.readline().rstrip("\r\n")
    else:
        pw = click.prompt(prompt, hide_input=True, confirmation_prompt=True)
    if not pw:
        fail("empty password")
    return pw


@cli.group()
def user() -> None:
    """Manage mailbox users (login name = full address)."""


@user.command("add")
@click.argument("address")
@click.option("--password-stdin", is_flag=True, help="Read the password from the first line of stdin.")
@click.pass_obj
@account_errors
def user_add(state: State, address: str, password_stdin: bool) -> None:
    """Add a user; the password is prompted for, or read with --password-stdin."""
    db = state.accounts()
    pw = _read_password(password_stdin)
    u = db.add_user(address, pw)
    click.echo(f"user {u.address} added")


@user.command("del")
@click.argument("address")
@click.pass_obj
@account_errors
def user_del(state: State, address: str) -> None:
    """Delete a user (the mailbox directory is kept on disk)."""
    u = state.accounts().del_user(address)
    click.echo(f"user {u.address} deleted (mailbox kept in {state.config.data_dir / 'mail' / str(u.id)})")


@user.command("passwd")
@click.argument("address")
@click.option("--password-stdin", is_flag=True, help="Read the password from the first line of stdin.")
@click.pass_obj
@account_errors
def user_passwd(state: State, address: str, password_stdin: bool) -> None:
    """Change a user's password."""
    db = state.accounts()
    if db.get_user(address.strip().lower()) is None:
        fail(f"no such user: {address}")
    db.set_password(address, _read_password(password_stdin, "New password"))
    click.echo(f"password of {address.lower()} changed")


@user.command("list")
@click.option("--domain", "domain_name", help="Only users of this domain.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def user_list(state: State, domain_name: str | None, as_json: bool) -> None:
    """List users."""
    users = state.accounts().list_users(domain_name)
    if as_json:
        emit_json([{"address": u.address, "id": u.id} for u in users])
        return
    table = Table("address", "mailbox", title="users")
    for u in users:
        table.add_row(u.address, f"mail/{u.id}")
    console.print(table)


@cli.group()
def alias() -> None:
    """Manage aliases (one address to one or more targets; '@domain' is a catch-all)."""


@alias.command("add")
@click.argument("alias_address", metavar="ALIAS")
@click.argument("target")
@click.pass_obj
@account_errors
def alias_add(state: State, alias_address: str, target: str) -> None:
    """Add ALIAS -> TARGET (run again to add more targets)."""
    state.accounts().add_alias(alias_address, target)
    click.echo(f"alias {alias_address.lower()} -> {target.lower()} added")


@alias.command("del")
@click.argument("alias_address", metavar="ALIAS")
@click.argument("target", required=False)
@click.pass_obj
@account_errors
def alias_del(state: State, alias_address: str, target: str | None) -> None:
    """Delete an alias (all its targets, or only TARGET)."""
    state.accounts().del_alias(alias_address, target)
    click.echo(f"alias {alias_address.lower()} deleted")


@alias.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def alias_list(state: State, as_json: bool) -> None:
    """List aliases."""
    aliases = state.accounts().list_aliases()
    if as_json:
        emit_json([{"alias": a.address, "targets": list(a.targets)} for a in aliases])
        return
    table = Table("alias", "targets", title="aliases")
    for a in aliases:
        table.add_row(a.address, ", ".join(a.targets))
    console.print(table)
