"""The local courier: one write hard-linked into each mailbox, Return-Path on top, aliases and
catch-alls resolved at delivery time, unknown users failed with 5.1.1."""

from __future__ import annotations

import asyncio
from pathlib import Path

from serpentmail.accounts.db import AccountDB
from serpentmail.config import embedded_default
from serpentmail.delivery.base import Envelope
from serpentmail.delivery.local import UNKNOWN_USER, LocalCourier
from serpentmail.storage.maildir import maildir_for


def test_local_delivery(tmp_path: Path) -> None:
    cfg = embedded_default(tmp_path)
    db = AccountDB(cfg.db_path)
    db.add_domain("home.test")
    bob = db.add_user("bob@home.test", "pw")
    ann = db.add_user("ann@home.test", "pw")
    db.add_alias("team@home.test", "bob@home.test")
    db.add_alias("team@home.test", "ann@home.test")
    data = tmp_path / "msg"
    data.write_bytes(b"Received: by x\r\n\r\nbody\r\n")
    env = Envelope("0123456789ABCDEF01", "a@b.test", data, data.stat().st_size)
    courier = LocalCourier(cfg, db)
    results = asyncio.run(courier.deliver(env, ["bob@home.test", "team@home.test", "nobody@home.test"]))
    assert [(r.recipient, r.status) for r in results] == [
        ("bob@home.test", "delivered"), ("team@home.test", "delivered"), ("nobody@home.test", "failed")]
    assert results[2].reply == UNKNOWN_USER
    bob_files = list((maildir_for(cfg.data_dir, bob.id) / "new").iterdir())
    ann_files = list((maildir_for(cfg.data_dir, ann.id) / "new").iterdir())
    assert len(bob_files) == 1 and len(ann_files) == 1  # bob once, though named twice
    assert bob_files[0].read_bytes() == b"Return-Path: <a@b.test>\r\nReceived: by x\r\n\r\nbody\r\n"
    assert bob_files[0].stat().st_ino == ann_files[0].stat().st_ino  # written once, linked
    assert bob_files[0].name.endswith(f",S={bob_files[0].stat().st_size}")
    assert list((tmp_path / "tmp").iterdir()) == []
    # a catch-all added later is honoured at delivery time
    db.add_alias("@home.test", "ann@home.test")
    (res,) = asyncio.run(courier.deliver(env, ["nobody@home.test"]))
    assert res.status == "delivered"
    assert len(list((maildir_for(cfg.data_dir, ann.id) / "new").iterdir())) == 2


def test_null_sender_and_postmaster_fallback(tmp_path: Path) -> None:
    cfg = embedded_default(tmp_path)
    db = AccountDB(cfg.db_path)
    data = tmp_path / "msg"
    data.write_bytes(b"\r\nbounce\r\n")
    env = Envelope("0123456789ABCDEF02", "", data, 10)
    (res,) = asyncio.run(LocalCourier(cfg, db).deliver(env, [f"postmaster@{cfg.hostname}"]))
    assert res.status == "delivered"
    (f,) = list((cfg.data_dir / "mail" / "postmaster" / "new").iterdir())
    assert f.read_bytes().startswith(b"Return-Path: <>\r\n")
