"""Ollama's `keep_alive`: how long a model stays loaded after a request, as a client says it.

Seconds as a number, or a duration such as "10m", "1h30m", "45s", "500ms"; 0 unloads the model
once the request is done; any negative value keeps it loaded until it is evicted for room or
undeployed. Errors name the `keep_alive` field. Never imports the engines.
"""

from __future__ import annotations

import math
import re

from appliance.errors import InvalidInput

FIELD = "keep_alive"
#: Longest keep-alive a request may ask for (one year, in seconds).
KEEP_ALIVE_MAX_S = 31_536_000.0
#: Value meaning "never unload for idleness".
KEEP_FOREVER = -1.0
_UNITS_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)(ms|s|m|h|d))+")
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")


def parse_keep_alive(value: float | int | str | None) -> float | None:
    """Seconds (KEEP_FOREVER for any negative value), or None when not given."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise InvalidInput(f"{FIELD}: give seconds or a duration such as '10m', not a boolean", field=FIELD)
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = value.strip().lower()
        seconds = _from_text(text)
    if math.isnan(seconds) or math.isinf(seconds) and seconds > 0:
        raise InvalidInput(f"{FIELD}: must be a finite number of seconds", field=FIELD)
    if seconds < 0:
        return KEEP_FOREVER
    if seconds > KEEP_ALIVE_MAX_S:
        raise InvalidInput(f"{FIELD}: at most {KEEP_ALIVE_MAX_S:g} seconds (one year); use -1 to keep the model loaded", field=FIELD)
    return seconds


def _from_text(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        pass
    negative = text.startswith("-")
    body = text[1:] if negative else text
    if not body or not _DURATION.fullmatch(body):
        raise InvalidInput(f"{FIELD}: {text[:40]!r} is not seconds or a duration such as '10m' or '1h30m'", field=FIELD)
    seconds = sum(float(amount) * _UNITS_S[unit] for amount, unit in _PART.findall(body))
    return -seconds if negative else seconds
