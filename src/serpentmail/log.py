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
    if not logger.isEnabledFor(level):
        return
    direct = _direct
    if direct is not None and direct.takes(logger, level):
        direct.write(logger, level, event, fields)
        return
    # Logger.log without its findCaller stack walk: the caller it found was always this
    # function (so the record's file and line said nothing), and no formatter prints them.
    logger.handle(_record(logger, level, event, fields))


def _record(logger: logging.Logger, level: int, event: str, fields: dict[str, Any]) -> logging.LogRecord:
    return logger.makeRecord(logger.name, level, _SRC_FILE, 0, event, (), None, extra={_FIELDS: fields})


class _Direct:
    """The line of an event written straight to the stream of the handler
    :func:`setup_logging` installed, without a ``LogRecord``: making one and passing it down
    the logging module's filters and handlers is Python code (the logging module is not
    compiled), about 4% of the CPU of an inbound message at one session. Used only while that
    handler is the only place the event would go (:meth:`takes`): when anything else was
    added (a handler, a filter, as a test's log capture does), events take the usual path."""

    def __init__(self, root: logging.Logger, handler: logging.StreamHandler[Any], fmt: PlainFormatter | JSONFormatter) -> None:
        self.root = root
        self.handler = handler
        self.fmt = fmt

    def takes(self, logger: logging.Logger, level: int) -> bool:
        root, handler = self.root, self.handler
        if logger is not root and (logger.parent is not root or logger.handlers or logger.filters or not logger.propagate):
            return False
        return (len(root.handlers) == 1 and root.handlers[0] is handler and not root.filters and not handler.filters
                and handler.formatter is self.fmt and level >= handler.level and handler.stream is not None)

    def write(self, logger: logging.Logger, level: int, event: str, fields: dict[str, Any]) -> None:
        # As Handler.handle and StreamHandler.emit do: under the handler's lock (the plain
        # formatter's one-per-second timestamp cache is not thread-safe without it), the line
        # and the terminator, then a flush. The lock and the stream are used directly, not
        # through Handler.acquire and StreamHandler.flush: those are Python code, run per event.
        handler = self.handler
        created = time.time()
        lock = handler.lock
        assert lock is not None  # made by Handler.__init__
        with lock:
            try:
                stream = handler.stream
                stream.write(self.fmt.render(created, _level_name(level), logger.name, event, fields) + handler.terminator)
                stream.flush()
            except Exception:
                handler.handleError(_record(logger, level, event, fields))


_direct: _Direct | None = None
_LEVEL_NAMES: dict[int, str] = {}


def _level_name(level: int) -> str:
    name = _LEVEL_NAMES.get(level)
    if name is None:
        name = _LEVEL_NAMES[level] = logging.getLevelName(level).lower()
    return name


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
        line = self.render(record.created, record.levelname.lower(), record.name, msg, fields)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line

    def render(self, created: float, level: str, name: str, msg: str, fields: dict[str, Any]) -> str:
        line = f"{self._timestamp(created)} {level} {name}: {msg}"
        if fields:
            line += " " + " ".join([f"{k}={_fmt_value(v)}" for k, v in fields.items()])
        return line


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = getattr(record, _FIELDS, {})
        obj = self._object(record.created, record.levelname.lower(), record.name, record.getMessage(), fields)
        if record.exc_info:
            obj["exception"] = self.formatException(record.exc_info)
        return json.dumps(obj, ensure_ascii=False)

    def render(self, created: float, level: str, name: str, msg: str, fields: dict[str, Any]) -> str:
        return json.dumps(self._object(created, level, name, msg, fields), ensure_ascii=False)

    @staticmethod
    def _object(created: float, level: str, name: str, msg: str, fields: dict[str, Any]) -> dict[str, Any]:
        obj: dict[str, Any] = {"ts": round(created, 3), "level": level, "logger": name, "event": msg}
        obj.update({k: v if isinstance(v, _PLAIN_JSON) else str(v) for k, v in fields.items()})
        return obj


_PLAIN_JSON = (int, float, bool, type(None))


def setup_logging(fmt: str = "plain", level: str = "info", file: Path | None = None) -> None:
    global _direct
    handler: logging.StreamHandler[Any] = logging.FileHandler(file) if file else logging.StreamHandler(sys.stderr)
    formatter = JSONFormatter() if fmt == "json" else PlainFormatter()
    handler.setFormatter(formatter)
    root = logging.getLogger("serpentmail")
    root.handlers[:] = [handler]
    _direct = _Direct(root, handler, formatter)
    root.setLevel(level.upper())
    root.propagate = False
    # Our formatters print none of these; skipping them saves a getpid() and two lookups per
    # log record (one record per message on the hot path).
    logging.logProcesses = False
    logging.logThreads = False
    logging.logMultiprocessing = False
