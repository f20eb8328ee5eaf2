"""The local courier: queued messages for our own domains go straight into Maildirs.

Each recipient is resolved through the accounts database at delivery time (users, aliases,
catch-all ``@domain`` aliases), so an alias changed while a message waits is honoured. The
message is written ONCE, with ``Return-Path: <sender>`` prepended (RFC 5321 §4.4: the final
delivery MTA records the reverse-path), and hard-linked into each user's ``new/`` with the
durable recipe of ``storage/maildir.py`` (temp file, fsync, link, fsync directories).

Results: delivered when the link is durable; ``550 5.1.1 user does not exist`` (permanent,
bounced) for a local address that no longer resolves; any file-system error is temporary
(``451 4.3.0``), never permanent. Alias targets in other domains are not this courier's job:
the scheduler expands them before routing (see ``queue/service.py``); if one still reaches
here it is deferred, not dropped.

All file and database work runs in a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

from ..accounts.db import AccountDB
from ..config import Config
from ..log import log_event
from ..proto.address import AddressError, parse_mailbox
from ..storage.fsutil import fsync_dir
from ..storage.maildir import SpoolFile, ensure_maildir, final_name, maildir_for
from .base import Envelope, RecipientResult

log = logging.getLogger("serpentmail.delivery.local")

UNKNOWN_USER = "550 5.1.1 user does not exist"
LOCAL_TEMP_ERROR = "451 4.3.0 local delivery failed, will retry"
_COPY_CHUNK = 1024 * 1024


class LocalCourier:
    """Courier for recipients in local domains. See the module docstring."""

    def __init__(self, config: Config, accounts: AccountDB | None = None, *,
                 on_delivery: Callable[[list[Path]], None] | None = None) -> None:
        self.config = config
        # AccountDB keeps one sqlite connection per thread, so one instance serves the pool.
        self.accounts = accounts or AccountDB(config.db_path)
        self.on_delivery = on_delivery

    async def deliver(self, envelope: Envelope, recipients: list[str]) -> list[RecipientResult]:
        loop = asyncio.get_running_loop()
        results, links = await loop.run_in_executor(None, self._deliver_sync, envelope, recipients)
        if links and self.on_delivery is not None:
            self.on_delivery(links)
        return results

    # --- worker thread -------------------------------------------------------------------

    def _maildirs_for(self, recipient: str) -> list[Path] | None:
        """The Maildirs ``recipient`` delivers to; None when it does not exist here."""
        try:
            addr = parse_mailbox(recipient)
        except AddressError:
            return None
        res = self.accounts.resolve(addr)
        dirs = [maildir_for(self.config.data_dir, u.id) for u in res.users]
        if dirs:
            return dirs
        if addr.local.lower() == "postmaster":
            # RFC 5321 §4.5.1: postmaster always works; unclaimed, it lands in a fallback box.
            return [self.config.data_dir / "mail" / "postmaster"]
        if res.remote:
            return []  # only remote alias targets: not ours (see module docstring)
        return None

    def _deliver_sync(self, envelope: Envelope, recipients: list[str]) -> tuple[list[RecipientResult], list[Path]]:
        targets: dict[str, list[Path]] = {}
        results: dict[str, RecipientResult] = {}
        for rcpt in recipients:
            try:
                dirs = self._maildirs_for(rcpt)
            except Exception as exc:  # database trouble is temporary
                log_event(log, "lookup failed", logging.ERROR, id=envelope.queue_id, to=f"<{rcpt}>", error=repr(exc))
                results[rcpt] = RecipientResult(rcpt, "deferred", LOCAL_TEMP_ERROR, None, "smtp")
                continue
            if dirs is None:
                results[rcpt] = RecipientResult(rcpt, "failed", UNKNOWN_USER, None, "smtp")
            elif not dirs:
                results[rcpt] = RecipientResult(rcpt, "deferred", "451 4.3.0 alias points elsewhere", None, "smtp")
            else:
                targets[rcpt] = dirs
        links: list[Path] = []
        if targets:
            unique_dirs = list(dict.fromkeys(d for dirs in targets.values() for d in dirs))
            try:
                by_dir = self._write_once(envelope, unique_dirs)
            except OSError as exc:
                log_event(log, "maildir write failed", logging.ERROR, id=envelope.queue_id, error=repr(exc))
                for rcpt in targets:
                    results[rcpt] = RecipientResult(rcpt, "deferred", LOCAL_TEMP_ERROR, None, "smtp")
            else:
                links = list(by_dir.values())
                for rcpt in targets:
                    results[rcpt] = RecipientResult(rcpt, "delivered", "250 2.0.0 delivered to mailbox",
                                                    self.config.hostname, "smtp")
        return [results[r] for r in recipients], links

    def _write_once(self, envelope: Envelope, maildirs: list[Path]) -> dict[Path, Path]:
        """One file with Return-Path on top, fsync'd, hard-linked into each ``new/``, each
        directory fsync'd (the durable recipe). Returns {maildir: final path}."""
        tmp = self.config.data_dir / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        spool = SpoolFile(tmp)
        done: dict[Path, Path] = {}
        try:
            # RFC 5321 §4.4: Return-Path records the reverse-path; "<>" for the null sender.
            spool.write(f"Return-Path: <{envelope.sender}>\r\n".encode())
            with open(envelope.data_path, "rb") as src:
                while chunk := src.read(_COPY_CHUNK):
                    spool.write(chunk)
            os.fsync(spool.fd)
            os.close(spool.fd)
            spool.closed = True
            name = final_name(spool.name, spool.size)
            for md in maildirs:
                ensure_maildir(md)
                target = md / "new" / name
                os.link(spool.path, target)
                done[md] = target
            for md in maildirs:
                fsync_dir(md / "new")
            return done
        except BaseException:
            for target in done.values():
                with contextlib.suppress(OSError):
                    os.unlink(target)
            raise
        finally:
            spool.discard()
