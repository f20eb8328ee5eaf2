"""bench.steps' client: timed one-message sessions that really deliver, and a refusal named."""

from __future__ import annotations

from pathlib import Path

import pytest
from bench.steps import STEPS, sessions

from tests.helpers import add_user, maildir_files, make_config, running_server

HOST = "127.0.6.31"
RCPT = "steps@bench.test"


def test_each_session_is_timed_step_by_step_and_delivered(tmp_path: Path) -> None:
    cfg = make_config(tmp_path / "data", HOST, listeners=("smtp",))
    add_user(cfg, RCPT)
    with running_server(cfg) as srv:
        got = sessions(*srv.endpoint("smtp"), 3, 4096, rcpt=RCPT)
    assert list(got) == list(STEPS)
    assert all(len(v) == 3 and all(t > 0 for t in v) for v in got.values())
    files = maildir_files(cfg, RCPT)
    assert len(files) == 3
    assert all(b"Subject: benchmark\r\n" in f.read_bytes() and f.stat().st_size > 4096 for f in files)


def test_a_refused_step_stops_the_run_with_the_reply(tmp_path: Path) -> None:
    cfg = make_config(tmp_path / "data", HOST, listeners=("smtp",))
    add_user(cfg, RCPT)
    with running_server(cfg) as srv, pytest.raises(RuntimeError, match=r"RCPT: b'550"):
        sessions(*srv.endpoint("smtp"), 1, 100, rcpt="nobody@bench.test")


def test_a_server_that_will_not_start_is_one_line_and_status_1(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import os
    import shutil

    from bench import steps
    from bench.common import Unavailable

    before = os.sched_getaffinity(0)
    if 0 not in before or len(before) < 2:
        pytest.skip("bench.steps needs CPU 0 and another CPU")

    def refuse(self: object) -> None:
        raise Unavailable("no room at the inn")

    removed: list[Path] = []

    def remove_tree(root: Path) -> int:  # (the real one also leaves the bench's clean-up mark)
        removed.append(root)
        shutil.rmtree(root)
        return 0

    monkeypatch.setattr(steps, "ensure_packages", lambda *_: None)
    monkeypatch.setattr(steps.Serpent, "setup", refuse)
    monkeypatch.setattr(steps, "remove_tree", remove_tree)
    assert steps.main(["--pure", "--count", "1"]) == 1
    out = capsys.readouterr().out
    assert "Unavailable: no room at the inn" in out and "Traceback" not in out
    assert removed and not removed[0].exists()  # its data directory is gone
    assert os.sched_getaffinity(0) == before  # the client's CPUs are given back
