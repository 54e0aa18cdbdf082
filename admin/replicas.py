"""The Models page's replicas form (Ray mode, docs/SCALE.md): one model's replicas (a fixed
count or autoscaling bounds) and what each replica reserves, as an admin sets them.

The form's values are checked exactly as the TOML file's `[scale.models.NAME]` are
(config.ScaleModelSettings), over the model's current settings: the configuration's, with the
changes an admin saved before (store/scale_models.py). Errors name the form's field. Never
imports Ray: the running application is changed through serving.cluster.ClusterScaler.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import ValidationError

from appliance.config import ScaleModelSettings, Settings
from appliance.errors import InvalidInput

#: The form takes memory in MiB; the settings hold bytes.
MIB = 1 << 20
FIXED, AUTOSCALING = "fixed", "autoscaling"


def current_scale(settings: Settings, name: str, saved: dict[str, dict[str, Any]]) -> ScaleModelSettings:
    """What `name` runs with: the configured settings with the admin's saved changes."""
    configured = settings.scale.model(name)
    try:
        return configured.with_changes(saved.get(name, {}))
    except ValidationError:
        return configured  # a saved change the configuration no longer admits: deploys refuse it by name


def parse_scale_form(form: dict[str, str], current: ScaleModelSettings) -> ScaleModelSettings:
    """The form's replicas and resources over `current`; InvalidInput names the field."""
    mode = form.get("mode", "")
    changes: dict[str, Any]
    if mode == FIXED:
        changes = {"replicas": _number(form, "replicas", int), "min_replicas": None, "max_replicas": None}
    elif mode == AUTOSCALING:
        changes = {
            "min_replicas": _number(form, "min_replicas", int),
            "max_replicas": _number(form, "max_replicas", int),
            "target_ongoing_requests": _number(form, "target_ongoing_requests", float),
        }
    else:
        raise InvalidInput(f"mode: choose {FIXED} or {AUTOSCALING}", field="mode")
    changes["num_cpus"] = _number(form, "num_cpus", float)
    changes["num_gpus"] = _number(form, "num_gpus", float)
    memory_mib = form.get("memory_mib", "").strip()
    changes["memory_bytes"] = round(_number(form, "memory_mib", float) * MIB) if memory_mib else None
    try:
        return current.with_changes(changes)
    except ValidationError as exc:
        first = exc.errors()[0]
        location = ".".join(str(part) for part in first.get("loc", ())) or ("max_replicas" if mode == AUTOSCALING else "replicas")
        field = "memory_mib" if location == "memory_bytes" else location
        raise InvalidInput(f"{field}: {first.get('msg')}", field=field) from None


def _number(form: dict[str, str], field: str, kind: type[int] | type[float]) -> Any:
    text = form.get(field, "").strip()
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value):
        raise InvalidInput(f"{field}: {text!r} is not {'a whole number' if kind is int else 'a number'}", field=field)
    return value
