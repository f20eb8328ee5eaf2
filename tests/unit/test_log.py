"""One line per event: ``<time> <level> <logger>: <event> key=value ...``, values quoted
when they would be ambiguous; JSON on request."""

from __future__ import annotations

import json
import logging
import time

import pytest

from serpentmail.log import JSONFormatter, PlainFormatter, log_event


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
