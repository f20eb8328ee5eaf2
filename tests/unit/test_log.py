"""One line per event: ``<time> <level> <logger>: <event> key=value ...``, values quoted
when they would be ambiguous; JSON on request."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import serpentmail.log
from serpentmail.log import JSONFormatter, PlainFormatter, log_event, setup_logging


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


@pytest.fixture
def restore_serpentmail_logger() -> Iterator[logging.Logger]:
    """setup_logging changes the "serpentmail" logger (and log's direct writer): put both back."""
    root = logging.getLogger("serpentmail")
    saved = (root.handlers[:], root.level, root.propagate, serpentmail.log._direct)
    yield root
    for h in root.handlers:
        if h not in saved[0]:
            h.close()
    root.handlers[:], root.level, root.propagate, serpentmail.log._direct = saved


@pytest.mark.parametrize("fmt", ["plain", "json"])
def test_direct_lines_are_the_formatters_lines(tmp_path: Path, fmt: str, restore_serpentmail_logger: logging.Logger) -> None:
    """Written straight to the configured file (no LogRecord), an event's line is the one the
    formatter makes of the record the usual path would make."""
    log_file = tmp_path / "mail.log"
    setup_logging(fmt, "info", log_file)
    lg = logging.getLogger("serpentmail.test-direct")
    direct = serpentmail.log._direct
    assert direct is not None and direct.takes(lg, logging.INFO)
    fields = {"id": "Q1", "from": "<a@b.test>", "size": 12, "spaced": "a b", "none": None}
    log_event(lg, "message", **fields)
    log_event(lg, "hidden", logging.DEBUG, x=1)
    log_event(lg, "careful", logging.WARNING)
    lines = log_file.read_text().splitlines()
    assert len(lines) == 2
    handler = restore_serpentmail_logger.handlers[0]
    assert handler.formatter is not None
    for line, (event, level, extra) in zip(lines, [("message", logging.INFO, fields), ("careful", logging.WARNING, {})], strict=True):
        record = lg.makeRecord(lg.name, level, __file__, 0, event, (), None, extra={"sm_fields": extra})
        if fmt == "plain":  # the timestamps may differ by a second: compare what follows
            assert line.split(" ", 1)[1] == handler.formatter.format(record).split(" ", 1)[1]
        else:
            got, want = json.loads(line), json.loads(handler.formatter.format(record))
            assert abs(got.pop("ts") - want.pop("ts")) < 5 and got == want


def test_an_added_handler_sees_every_event(tmp_path: Path, restore_serpentmail_logger: logging.Logger) -> None:
    """The direct path stands aside once the event would go anywhere else too."""
    log_file = tmp_path / "mail.log"
    setup_logging("plain", "info", log_file)
    lg = logging.getLogger("serpentmail.test-direct")
    for where in (lg, restore_serpentmail_logger):
        cap = _Capture(PlainFormatter())
        where.addHandler(cap)
        try:
            log_event(lg, "seen", n=1)
        finally:
            where.removeHandler(cap)
        assert len(cap.lines) == 1 and cap.lines[0].endswith("info serpentmail.test-direct: seen n=1")
    lg.disabled = True  # as logging.config does to the loggers it was not told about (isEnabledFor says no)
    try:
        log_event(lg, "disabled")
    finally:
        lg.disabled = False
    log_event(lg, "filtered")
    restore_serpentmail_logger.handlers[0].addFilter(lambda record: record.getMessage() != "dropped")
    log_event(lg, "dropped")
    # The file got the event each time too (through the handler, as usual), but not the one
    # its new filter drops.
    assert [line.split(" ", 1)[1] for line in log_file.read_text().splitlines()] == [
        "info serpentmail.test-direct: seen n=1", "info serpentmail.test-direct: seen n=1",
        "info serpentmail.test-direct: filtered"]
