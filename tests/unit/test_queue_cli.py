"""``serpentmail queue``: list/show --json fields, flush/retry requests, delete, bad ids."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from serpentmail.cli import main
from serpentmail.queue.store import QueueStore
from tests.helpers import crash_committer


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


@pytest.mark.parametrize("command", [["queue", "list"], ["domain", "list"], ["user", "list"]])
def test_an_unusable_data_dir_is_one_line_not_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         command: list[str]) -> None:
    (tmp_path / "afile").write_text("not a directory")
    conf = tmp_path / "mail.toml"
    conf.write_text(f'hostname = "mx.test"\ndata_dir = "{tmp_path / "afile" / "data"}"\n')
    assert main(["-c", str(conf), *command]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Error: Not a directory: ") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_delete_waits_for_the_journal_and_refuses_an_item_only_a_replay_can_settle(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """An item accepted less than a second ago is still in the server's delivery journal: a
    delete then a crash would bring it back at the next start. With no server to checkpoint
    it, the delete is refused with what to do."""
    import asyncio

    import serpentmail.cli.queue as queue_cli
    from serpentmail.storage.journal import Journal, replay_all
    from serpentmail.storage.maildir import Committer, SpoolFile

    monkeypatch.setattr(queue_cli, "JOURNAL_WAIT", 0.2)
    conf = _conf(tmp_path)
    data = tmp_path / "data"
    journal = Journal(data / "journal" / "w0.log", data)
    committer = Committer(journal=journal)
    store = QueueStore(data, committer, journal=True)
    sp = SpoolFile(store.spool_tmp)
    sp.write(b"Subject: fresh\r\n\r\nbody\r\n")
    rec = asyncio.run(store.enqueue(sp, "a@b.test", ["x@y.test"]))
    # The server dies before its checkpoint.
    crash_committer(committer)
    capsys.readouterr()

    # Never placed (its files come at a checkpoint): listed and shown from the journal.
    assert main(["-c", conf, "queue", "list", "--json"]) == 0
    assert [item["id"] for item in json.loads(capsys.readouterr().out)] == [rec.id]
    assert main(["-c", conf, "queue", "show", rec.id]) == 0
    assert "Subject: fresh" in capsys.readouterr().out
    assert main(["-c", conf, "queue", "delete", rec.id]) == 1
    assert "start the server" in capsys.readouterr().err
    on_disk = QueueStore(data)  # what the next process sees
    assert not on_disk.exists(rec.id)  # only its journal records: the item was never placed
    replay_all(data)  # what the next start does first
    assert on_disk.exists(rec.id)
    assert on_disk.data_path(rec.id).read_bytes() == b"Subject: fresh\r\n\r\nbody\r\n"
    assert main(["-c", conf, "queue", "delete", rec.id]) == 0
    assert not on_disk.exists(rec.id)
