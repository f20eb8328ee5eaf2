"""Logging: one line per event in the Postfix spirit, plain by default, JSON on request.

Callers log with ``log_event(logger, "event", key=value, ...)``; the formatter renders the
fields as ``event key=value ...`` or as one JSON object per line. Peers never see this text.

This module is compiled by mypyc (setup.py). A batching ``StreamHandler`` subclass and a
``LogRecord`` subclass defined here once made the compiled test pass crash (segmentation
faults in the garbage collector and in logging's after-fork hook; reproduced, then reverted):
keep new subclasses of the logging module's classes out of it.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from pathlib import Path
from typing import Any

_FIELDS = "sm_fields"
_SRC_FILE = __file__


def log_event(logger: logging.Logger, event: str, level: int = logging.INFO, /, **fields: Any) -> None:
    if logger.isEnabledFor(level):
        # Logger.log without its findCaller stack walk: the caller it found was always this
        # function (so the record's file and line said nothing), and no formatter prints them.
        logger.handle(logger.makeRecord(logger.name, level, _SRC_FILE, 0, event, (), None, extra={_FIELDS: fields}))


# A value with any of these (or an empty one) is written as a JSON string, so a line splits
# unambiguously into key=value pairs.
_NEEDS_QUOTES = re.compile(r'[ "=\n\r\t]').search


def _fmt_value(value: Any) -> str:
    text = value if type(value) is str else str(value)
    if text == "" or _NEEDS_QUOTES(text):
        return json.dumps(text)
    return text


class PlainFormatter(logging.Formatter):
    """``<local time> <level> <logger>: <event> key=value ...``, one line per event (the
    traceback, if any, follows on the next lines)."""

    def __init__(self) -> None:
        super().__init__()
        # The timestamp has one-second resolution: format it once per second, not per line.
        self._ts_sec = -1
        self._ts_text = ""

    def _timestamp(self, created: float) -> str:
        sec = int(created)
        if sec != self._ts_sec:
            self._ts_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(sec))
            self._ts_sec = sec
        return self._ts_text

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = getattr(record, _FIELDS, {})
        # An event name (log_event's records) needs no %-formatting.
        msg = record.msg if not record.args and type(record.msg) is str else record.getMessage()
        line = f"{self._timestamp(record.created)} {record.levelname.lower()} {record.name}: {msg}"
        if fields:
            line += " " + " ".join([f"{k}={_fmt_value(v)}" for k, v in fields.items()])
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = getattr(record, _FIELDS, {})
        obj: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        obj.update({k: v if isinstance(v, int | float | bool | type(None)) else str(v) for k, v in fields.items()})
        if record.exc_info:
            obj["exception"] = self.formatException(record.exc_info)
        return json.dumps(obj, ensure_ascii=False)


def setup_logging(fmt: str = "plain", level: str = "info", file: Path | None = None) -> None:
    handler: logging.Handler = logging.FileHandler(file) if file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if fmt == "json" else PlainFormatter())
    root = logging.getLogger("serpentmail")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    # Our formatters print none of these; skipping them saves a getpid() and two lookups per
    # log record (one record per message on the hot path).
    logging.logProcesses = False
    logging.logThreads = False
    logging.logMultiprocessing = False
