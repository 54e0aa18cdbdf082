"""One log line per event, as text or JSON, for the server commands. Never logs secrets.

A thin adapter: the one implementation is appliance.ops.logging (also journald priorities,
uvicorn routed through the same handler, tracebacks kept on one line).
"""

from __future__ import annotations

import logging

from appliance.ops.logging import configure_logging as _configure_process_logging


def configure_logging(level: str, fmt: str) -> None:
    _configure_process_logging("json" if fmt == "json" else "text", level.lower())  # type: ignore[arg-type]
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
