"""Logging: one line per event in the Postfix spirit, plain by default, JSON on request.

Callers log with ``log_event(logger, "event", key=value, ...)``; the formatter renders the
fields as ``event key=value ...`` or as one JSON object per line. Peers never see this text.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

_FIELDS = "sm_fields"


def log_event(logger: logging.Logger, event: str, level: int = logging.INFO, /, **fields: Any) -> None:
    if logger.isEnabledFor(level):
        logger.log(level, event, extra={_FIELDS: fields})


def _fmt_value(value: Any) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' "=\n\r\t'):
        return json.dumps(text)
    return text


class PlainFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = getattr(record, _FIELDS, {})
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
        parts = [f"{ts} {record.levelname.lower()} {record.name}: {record.getMessage()}"]
        parts.extend(f"{k}={_fmt_value(v)}" for k, v in fields.items())
        line = " ".join(parts)
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
