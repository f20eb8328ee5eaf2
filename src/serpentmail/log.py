"""Logging: one line per event in the Postfix spirit, plain by default, JSON on request.

Callers log with ``log_event(logger, "event", key=value, ...)``; the formatter renders the
fields as ``event key=value ...`` or as one JSON object per line. Peers never see this text.

The server's handler (:class:`BatchingFileHandler`, :class:`BatchingStreamHandler`) writes
the lines an event loop logs in one step of that loop with one ``write``, at the start of its
next step, instead of one ``write`` per line: in the submission benchmark, four lines per
message written one by one cost about a tenth of the server's CPU (two processes appending
to one file). A line logged at WARNING or above, or outside an event loop's thread (the
committer, a CLI command), is written at once, with any lines waiting before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, TextIO

_FIELDS = "sm_fields"
_SRC_FILE = __file__
_SRC_NAME = os.path.basename(__file__)
# logging's start time, from which a record's relativeCreated counts (as the stock constructor does).
_LOGGING_START: float = getattr(logging, "_startTime", time.time())
_LEVEL_NAMES = {logging.DEBUG: "DEBUG", logging.INFO: "INFO", logging.WARNING: "WARNING",
                logging.ERROR: "ERROR", logging.CRITICAL: "CRITICAL"}


class _EventRecord(logging.LogRecord):
    """A LogRecord made for :func:`log_event` directly: the stock constructor's work on the
    caller's path, the thread and the process (none of which our formatters print; the record
    says this module, as the stock one did) is left out. Every attribute a formatter or a
    handler may read is still set."""

    def __init__(self, name: str, level: int, event: str, fields: dict[str, Any]) -> None:
        ct = time.time()
        self.name = name
        self.msg = event
        self.args = ()
        self.levelname = _LEVEL_NAMES.get(level) or logging.getLevelName(level)
        self.levelno = level
        self.pathname = _SRC_FILE
        self.filename = _SRC_NAME
        self.module = "log"
        self.exc_info = None
        self.exc_text = None
        self.stack_info = None
        self.lineno = 0
        self.funcName = "log_event"
        self.created = ct
        self.msecs = int((ct - int(ct)) * 1000) + 0.0
        self.relativeCreated = (ct - _LOGGING_START) * 1000
        self.thread = None
        self.threadName = None
        self.processName = None
        self.process = None
        setattr(self, _FIELDS, fields)


def log_event(logger: logging.Logger, event: str, level: int = logging.INFO, /, **fields: Any) -> None:
    if logger.isEnabledFor(level):
        # Logger.log without its findCaller stack walk (the caller it found was always this
        # function) and with a record made for the purpose (see _EventRecord).
        logger.handle(_EventRecord(logger.name, level, event, fields))


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


class BatchingStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that writes the lines an event loop logs in one step with one write
    (see the module's docstring). ``emit`` runs under the handler's lock (``Handler.handle``
    takes it), and so does the loop's callback."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._batch_init()

    def _batch_init(self) -> None:
        self._lines: list[str] = []
        self._due: asyncio.AbstractEventLoop | None = None  # the loop that will write them

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._lines.append(self.format(record))
            if record.levelno < logging.WARNING and len(self._lines) < 256:
                try:
                    loop = asyncio.get_running_loop()
                except RuntimeError:
                    loop = None
                if loop is not None:
                    if self._due is loop:
                        return
                    if self._due is None or self._due.is_closed():
                        loop.call_soon(self._write_from_loop, loop)
                        self._due = loop
                        return
            self._write()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def _write(self) -> None:
        if self.stream is None:  # closed: close() wrote what was waiting
            self._lines.clear()
            return
        if self._lines:
            text = "\n".join(self._lines) + "\n"
            self._lines.clear()
            self.stream.write(text)
        self.stream.flush()

    def _write_from_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        self.acquire()
        try:
            if self._due is loop:
                self._due = None
            self._write()
        except Exception:  # the stream failed; as logging.Handler.handleError does, say so
            self._lines.clear()
            with contextlib.suppress(Exception):
                sys.stderr.write("serpentmail: writing the log failed\n")
        finally:
            self.release()

    def flush(self) -> None:
        self.acquire()
        try:
            self._write()
        finally:
            self.release()


class BatchingFileHandler(BatchingStreamHandler, logging.FileHandler):
    """A log file written as :class:`BatchingStreamHandler` writes (FileHandler's close
    calls flush, which writes the lines still waiting)."""

    def __init__(self, filename: Path) -> None:
        logging.FileHandler.__init__(self, filename)
        self._batch_init()


def setup_logging(fmt: str = "plain", level: str = "info", file: Path | None = None) -> None:
    handler: logging.Handler = BatchingFileHandler(file) if file else BatchingStreamHandler(sys.stderr)
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
