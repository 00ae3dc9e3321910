"""Logging configuration for the daemon, re-runnable on SIGHUP.

One handler is installed on the root logger so that asyncio's and
websockets' warnings share relayd's format. The requested level applies to
the ``relayd`` hierarchy; other libraries stay at WARNING or above, because
at DEBUG websockets logs every frame and would drown relayd's own output.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Mapping
from typing import TextIO

__all__ = ["JournalFormatter", "JsonFormatter", "TextFormatter", "configure_logging", "parse_level", "set_level"]

LOGGER_NAME = "relayd"
FORMATS = ("text", "json")

_SYSLOG_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}
_LEVEL_ALIASES = {"warn": "WARNING", "fatal": "CRITICAL"}

_handler: logging.Handler | None = None


def parse_level(level: str | int) -> int:
    """Accept ``"debug"``/``"INFO"``/``"warn"``/… or a numeric level."""
    if isinstance(level, int):
        return level
    name = level.strip()
    if name.isdigit():
        return int(name)
    name = _LEVEL_ALIASES.get(name.lower(), name.upper())
    value = logging.getLevelName(name)
    if not isinstance(value, int):
        raise ValueError(f"unknown log level {level!r}")
    return value


def _priority(levelno: int) -> int:
    for threshold, prio in _SYSLOG_PRIORITY.items():
        if levelno >= threshold:
            return prio
    return 7


def _timestamp(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


def _fields(record: logging.LogRecord) -> Mapping[str, object]:
    fields = getattr(record, "fields", None)
    return fields if isinstance(fields, Mapping) else {}


def _kv(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if text and not any(c.isspace() or c in '"=' for c in text):
        return text
    return json.dumps(text)


class TextFormatter(logging.Formatter):
    """``2026-11-25T21:03:52.123Z INFO relayd.server: message key=value``."""

    def _body(self, record: logging.LogRecord) -> str:
        line = f"{record.levelname} {record.name}: {record.getMessage()}"
        fields = _fields(record)
        if fields:
            line += " " + " ".join(f"{k}={_kv(v)}" for k, v in fields.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line

    def format(self, record: logging.LogRecord) -> str:
        return f"{_timestamp(record)} {self._body(record)}"


class JournalFormatter(TextFormatter):
    """Text for journald: it stamps time itself, and reads ``<N>`` as the priority.

    Every line is prefixed, since journald splits a traceback into one entry
    per line and an unprefixed line would be filed at the default priority.
    """

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in self._body(record).split("\n"))


class JsonFormatter(logging.Formatter):
    """One JSON object per line; ``extra={"fields": {...}}`` adds keys but cannot override core ones."""

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, object] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in _fields(record).items():
            obj.setdefault(str(key), value)
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            obj["stack"] = self.formatStack(record.stack_info)
        return json.dumps(obj, default=str, ensure_ascii=False)


def _under_journald(stream: TextIO, environ: Mapping[str, str]) -> bool:
    """JOURNAL_STREAM is inherited by children, so check it still names our stream."""
    value = environ.get("JOURNAL_STREAM")
    if not value:
        return False
    try:
        dev, ino = (int(x) for x in value.split(":"))
    except ValueError:
        return False
    try:
        st = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return True
    return (st.st_dev, st.st_ino) == (dev, ino)


def configure_logging(
    level: str | int = "info",
    fmt: str = "text",
    stream: TextIO | None = None,
    environ: Mapping[str, str] | None = None,
) -> None:
    """Install (or replace) relayd's log handler; safe to call again on reload.

    ``stream`` defaults to the current ``sys.stderr``; a stream without a
    file descriptor is trusted to be journald when JOURNAL_STREAM is set.
    """
    global _handler
    levelno = parse_level(level)
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r}; expected one of {FORMATS}")
    stream = sys.stderr if stream is None else stream
    environ = os.environ if environ is None else environ

    formatter: logging.Formatter
    if fmt == "json":
        formatter = JsonFormatter()
    elif _under_journald(stream, environ):
        formatter = JournalFormatter()
    else:
        formatter = TextFormatter()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)

    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
        _handler.close()
    root.addHandler(handler)
    _handler = handler
    set_level(levelno)


def set_level(level: str | int) -> None:
    """Change verbosity at run time without touching the handler."""
    levelno = parse_level(level)
    logging.getLogger(LOGGER_NAME).setLevel(levelno)
    logging.getLogger().setLevel(max(levelno, logging.WARNING))
