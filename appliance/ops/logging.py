"""Process-wide logging: one line per event on stderr, as text for people or JSON for machines.

Under systemd, journald stores what the service writes, so the appliance never manages log
files. Text lines carry a syslog priority prefix (`<3>`) when stderr is the journal, so
`journalctl -p warning` works. Every event stays one line: multi-line messages and tracebacks
are escaped, never split. Request logs use the same handlers; what they contain is decided by
the privacy mode where they are written, never here. Must never import the runtime or the APIs.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from typing import IO, Literal

LogFormat = Literal["text", "json"]
LogLevel = Literal["debug", "info", "warning", "error"]

#: Attributes every LogRecord has; anything else was passed with `extra=` and is a field.
_STANDARD_RECORD_KEYS = frozenset(
    logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None).__dict__
) | {"message", "asctime", "taskName", "color_message"}  # uvicorn's ANSI copy of the message

#: Loggers of libraries the server embeds: routed through our handler, never their own.
LIBRARY_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "fastapi", "alembic", "sqlalchemy")

#: syslog priorities (sd-daemon(3)): journald reads `<N>` at the start of a line.
_SYSLOG_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

_HANDLER_NAME = "appliance"


def _extra_fields(record: logging.LogRecord) -> dict[str, object]:
    """The record's `extra=` fields. Underscored names are left out: libraries stamp their own
    private attributes on every record (Ray's record factory adds `_ray_timestamp_ns` once it
    is imported), and they are not ours to print."""
    return {
        key: value for key, value in record.__dict__.items() if key not in _STANDARD_RECORD_KEYS and not key.startswith("_")
    }


def _one_line(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\r", "\\r").replace("\n", "\\n")


class TextFormatter(logging.Formatter):
    """`LEVEL logger: message key=value ...`, one line; optional syslog priority prefix."""

    def __init__(self, *, syslog_prefix: bool = False, timestamps: bool = True) -> None:
        super().__init__()
        self.syslog_prefix = syslog_prefix
        self.timestamps = timestamps

    def format(self, record: logging.LogRecord) -> str:
        parts = []
        if self.timestamps:
            parts.append(datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"))
        parts.append(f"{record.levelname} {record.name}: {record.getMessage()}")
        parts.extend(f"{key}={value}" for key, value in _extra_fields(record).items())
        if record.exc_info:
            parts.append(f"exc={self.formatException(record.exc_info)}")
        line = _one_line(" ".join(parts))
        if self.syslog_prefix:
            line = f"<{_SYSLOG_PRIORITY.get(record.levelno, 6)}>{line}"
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, then every `extra=` field."""

    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in _extra_fields(record).items():
            event.setdefault(key, value)
        if record.exc_info:
            event["exc"] = self.formatException(record.exc_info)
        return json.dumps(event, default=str, ensure_ascii=False)


def stderr_is_journal(stream: IO[str]) -> bool:
    """True when `stream` is the journald stream systemd connected (JOURNAL_STREAM=dev:inode)."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    if not expected:
        return False
    try:
        stat = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return expected == f"{stat.st_dev}:{stat.st_ino}"


def configure_logging(
    log_format: LogFormat = "text", log_level: LogLevel = "info", stream: IO[str] | None = None
) -> logging.Handler:
    """Install the one handler on the root logger; idempotent (a second call replaces it).

    Library loggers (uvicorn, alembic, ...) lose their own handlers and propagate to ours, so
    their lines have the same shape; pass `log_config=None` to uvicorn so it keeps them.
    Under journald, text lines drop the timestamp (the journal adds one) and gain a priority.
    """
    target = stream if stream is not None else sys.stderr
    handler = logging.StreamHandler(target)
    handler.set_name(_HANDLER_NAME)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        journal = stderr_is_journal(target)
        handler.setFormatter(TextFormatter(syslog_prefix=journal, timestamps=not journal))
    root = logging.getLogger()
    # Ours from an earlier call, and the plain stderr handler a library's logging.basicConfig()
    # may have installed (the export stage's libraries do, before `up` starts serving): both
    # would print every line a second time in another shape.
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME or type(h) is logging.StreamHandler]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(log_level.upper())
    for name in LIBRARY_LOGGERS:
        library_logger = logging.getLogger(name)
        library_logger.handlers.clear()
        library_logger.propagate = True
        library_logger.setLevel(logging.NOTSET)
    # SQLAlchemy echoes every statement at INFO; keep it to warnings unless debugging.
    if log_level != "debug":
        logging.getLogger("sqlalchemy").setLevel(logging.WARNING)
    return handler
