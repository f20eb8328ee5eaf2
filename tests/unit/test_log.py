"""One line per event: ``<time> <level> <logger>: <event> key=value ...``, values quoted
when they would be ambiguous; JSON on request."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from pathlib import Path

import pytest

from serpentmail.log import (
    BatchingFileHandler,
    BatchingStreamHandler,
    JSONFormatter,
    PlainFormatter,
    log_event,
)


class _Capture(logging.Handler):
    def __init__(self, formatter: logging.Formatter) -> None:
        super().__init__()
        self.setFormatter(formatter)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def logger() -> logging.Logger:
    lg = logging.getLogger("serpentmail.test-log")
    lg.setLevel(logging.INFO)
    lg.propagate = False
    lg.handlers[:] = []
    return lg


def test_plain_line(logger: logging.Logger) -> None:
    cap = _Capture(PlainFormatter())
    logger.addHandler(cap)
    before = int(time.time())
    log_event(logger, "message", id="ABC", **{"from": "<a@b.test>"}, size=12, empty="", spaced="a b",
              quoted='x"y', eq="k=v", nl="l\nm", none=None)
    log_event(logger, "bare", logging.WARNING)
    log_event(logger, "hidden", logging.DEBUG, x=1)
    after = int(time.time())
    assert len(cap.lines) == 2
    ts, rest = cap.lines[0].split(" ", 1)
    stamps = {time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t)) for t in range(before, after + 1)}
    assert ts in stamps
    assert rest == ('info serpentmail.test-log: message id=ABC from=<a@b.test> size=12 empty="" spaced="a b" '
                    'quoted="x\\"y" eq="k=v" nl="l\\nm" none=None')
    assert cap.lines[1].split(" ", 1)[1] == "warning serpentmail.test-log: bare"


def test_timestamp_follows_the_clock() -> None:
    fmt = PlainFormatter()
    rec = logging.LogRecord("serpentmail.x", logging.INFO, __file__, 1, "e", (), None)
    for t in (1_000_000_000.2, 1_000_000_000.9, 1_000_000_001.0, 999_999_999.5):
        rec.created = t
        assert fmt.format(rec).startswith(time.strftime("%Y-%m-%dT%H:%M:%S ", time.localtime(t)))


def test_exception_follows_the_line(logger: logging.Logger) -> None:
    cap = _Capture(PlainFormatter())
    logger.addHandler(cap)
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("failed")
    assert cap.lines[0].split("\n")[0].endswith("error serpentmail.test-log: failed")
    assert "ValueError: boom" in cap.lines[0]


def test_json_line(logger: logging.Logger) -> None:
    cap = _Capture(JSONFormatter())
    logger.addHandler(cap)
    log_event(logger, "message", id="ABC", size=12, who=object.__name__)
    obj = json.loads(cap.lines[0])
    assert obj["event"] == "message" and obj["level"] == "info" and obj["logger"] == "serpentmail.test-log"
    assert (obj["id"], obj["size"], obj["who"]) == ("ABC", 12, "object")


class _Writes(io.StringIO):
    """A stream that remembers each write."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, s: str) -> int:
        self.writes.append(s)
        return super().write(s)


_Batching = tuple[logging.Logger, _Writes, BatchingStreamHandler]


@pytest.fixture
def batching(logger: logging.Logger) -> _Batching:
    stream = _Writes()
    handler = BatchingStreamHandler(stream)
    handler.setFormatter(PlainFormatter())
    logger.addHandler(handler)
    return logger, stream, handler


def _events(text: str) -> list[str]:
    return [line.split(": ", 1)[1] for line in text.splitlines()]


def test_lines_of_one_loop_step_are_written_together_at_the_next(batching: _Batching) -> None:
    logger, stream, _ = batching

    async def main() -> None:
        for i in range(3):
            log_event(logger, "e", n=i)
        assert stream.writes == []  # nothing yet: the step is not over
        await asyncio.sleep(0)
        assert _events("".join(stream.writes)) == ["e n=0", "e n=1", "e n=2"]
        assert len(stream.writes) == 1  # one write for the three lines
        log_event(logger, "f")
        await asyncio.sleep(0)
        assert _events("".join(stream.writes))[-1] == "f"

    asyncio.run(main())


def test_a_warning_is_written_at_once_after_the_lines_before_it(batching: _Batching) -> None:
    logger, stream, _ = batching

    async def main() -> None:
        log_event(logger, "first")
        log_event(logger, "trouble", logging.WARNING, x=1)
        assert _events(stream.getvalue()) == ["first", "trouble x=1"]

    asyncio.run(main())


def test_outside_an_event_loop_a_line_is_written_at_once(batching: _Batching) -> None:
    logger, stream, _ = batching
    log_event(logger, "plain")
    assert _events(stream.getvalue()) == ["plain"]
    seen: list[str] = []

    async def main() -> None:
        log_event(logger, "loop")
        # Another thread (the committer) logs meanwhile: its line and the waiting one go now,
        # in the order they were logged.
        await asyncio.to_thread(log_event, logger, "thread")
        seen.extend(_events(stream.getvalue()))

    asyncio.run(main())
    assert seen == ["plain", "loop", "thread"]


def test_lines_waiting_when_the_loop_ends_are_written_by_close_and_later_loops(batching: _Batching) -> None:
    logger, stream, handler = batching

    async def last_words() -> None:
        log_event(logger, "one")  # the loop closes before its next step

    asyncio.run(last_words())
    asyncio.run(last_words())  # the first loop is closed: this one takes the lines over
    handler.close()
    assert _events(stream.getvalue()) == ["one", "one"]


def test_file_handler_writes_waiting_lines_on_close(tmp_path: Path) -> None:
    lg = logging.getLogger("serpentmail.test-log-file")
    lg.setLevel(logging.INFO)
    lg.propagate = False
    handler = BatchingFileHandler(tmp_path / "mail.log")
    handler.setFormatter(PlainFormatter())
    lg.handlers[:] = [handler]

    async def main() -> None:
        log_event(lg, "queued", id="A")

    try:
        asyncio.run(main())
    finally:
        handler.close()
        lg.handlers[:] = []
    assert _events((tmp_path / "mail.log").read_text()) == ["queued id=A"]
