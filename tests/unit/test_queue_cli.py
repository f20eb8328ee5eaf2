"""``serpentmail queue``: list/show --json fields, flush/retry requests, delete, bad ids."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from serpentmail.cli import main
from serpentmail.queue.store import QueueStore


def _conf(tmp_path: Path) -> str:
    conf = tmp_path / "mail.toml"
    conf.write_text(f'hostname = "mx.test"\ndata_dir = "{tmp_path / "data"}"\n')
    return str(conf)


def test_queue_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conf = _conf(tmp_path)
    store = QueueStore(tmp_path / "data")
    rec = store.enqueue_bytes(b"Subject: hi\r\n\r\nbody\r\n", "a@b.test", ["x@y.test", "z@w.test"])
    assert rec is not None
    rec.recipients[0].state = "delivered"
    rec.recipients[1].attempts = 2
    rec.recipients[1].last_reply = "451 4.4.1 later"
    store.save(rec)
    capsys.readouterr()

    assert main(["-c", conf, "queue", "list", "--json"]) == 0
    (item,) = json.loads(capsys.readouterr().out)
    assert item["id"] == rec.id and item["sender"] == "a@b.test" and item["size"] == rec.size
    assert item["age"] >= 0 and item["next_attempt"]
    assert [(r["address"], r["state"], r["attempts"], r["last_reply"]) for r in item["recipients"]] == [
        ("x@y.test", "delivered", 0, ""), ("z@w.test", "pending", 2, "451 4.4.1 later")]

    assert main(["-c", conf, "queue", "show", rec.id, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["headers"].startswith("Subject: hi")

    assert main(["-c", conf, "queue", "list"]) == 0
    assert rec.id in capsys.readouterr().out

    assert main(["-c", conf, "queue", "flush"]) == 0
    assert main(["-c", conf, "queue", "retry", rec.id]) == 0
    assert sorted(store.take_requests(), key=str) == sorted([("flush", None), ("retry", rec.id)], key=str)

    assert main(["-c", conf, "queue", "show", "NOSUCHID0000"]) == 1
    assert main(["-c", conf, "queue", "delete", "../../etc"]) == 1
    assert main(["-c", conf, "queue", "delete", rec.id]) == 0
    assert list(store.ids()) == [] and not store.data_path(rec.id).exists()
    assert main(["-c", conf, "queue", "delete", rec.id]) == 1
