"""The live privacy policy: request logging mode, text retention, allowed client networks, and
the cost model the dashboard uses.

One instance per server, shared by the API layer (which applies the logging mode to every
request and checks client networks) and the admin UI (which changes it). Values start from
the configuration and are overridden by what an admin saved in the database. The network
lists are mutated in place, so every holder of a reference sees a change at once. Never
imports the runtime or the APIs.
"""

from __future__ import annotations

import ipaddress
import threading
from typing import Any, get_args

from appliance.config import CostSettings, LoggingMode, Settings
from appliance.errors import InvalidInput
from appliance.store.app_settings import AppSettingsStore
from appliance.store.db import Database

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
LOGGING_MODES: tuple[str, ...] = get_args(LoggingMode)
RETENTION_DAYS_MAX = 3650
#: Most networks one list may hold (each is checked per request).
NETWORKS_MAX = 64


def parse_networks(values: list[str], field: str) -> list[Network]:
    if not values:
        raise InvalidInput(f"{field}: at least one network is needed", field=field)
    if len(values) > NETWORKS_MAX:
        raise InvalidInput(f"{field}: at most {NETWORKS_MAX} networks", field=field)
    parsed: list[Network] = []
    for value in values:
        try:
            parsed.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise InvalidInput(f"{field}: {value!r} is not a network (e.g. 192.168.1.0/24)", field=field) from None
    return parsed


def address_in(address: str | None, networks: list[Network]) -> bool:
    if not address:
        return False
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(parsed in network for network in networks)


class PrivacyPolicy:
    """What is logged and kept, and who may connect. Thread-safe reads of plain attributes."""

    def __init__(self, settings: Settings, database: Database) -> None:
        self._store = AppSettingsStore(database)
        self._lock = threading.Lock()
        saved = self._store.all()
        self.mode: LoggingMode = saved.get("logging_mode", settings.logging_mode)
        if self.mode not in LOGGING_MODES:
            self.mode = settings.logging_mode
        self.retention_days: int = int(saved.get("log_retention_days", settings.log_retention_days))
        self.api_networks: list[Network] = parse_networks(saved.get("api_networks", settings.api_networks), "api_networks")
        self.admin_networks: list[Network] = parse_networks(
            saved.get("admin_networks", settings.admin_networks), "admin_networks"
        )
        cost_values = settings.cost.model_dump()
        cost_values.update(saved.get("cost", {}))
        self.cost = CostSettings(**cost_values)

    # -- changes made from the UI ---------------------------------------------------------
    def set_logging(self, mode: str, retention_days: int, *, actor: str, address: str) -> None:
        if mode not in LOGGING_MODES:
            raise InvalidInput(f"mode: must be one of {', '.join(LOGGING_MODES)}", field="mode")
        if not 1 <= retention_days <= RETENTION_DAYS_MAX:
            raise InvalidInput(f"retention_days: must be between 1 and {RETENTION_DAYS_MAX}", field="retention_days")
        with self._lock:
            detail = f"logging mode {self.mode} -> {mode}, retention {self.retention_days} -> {retention_days} days"
            self._store.set_many(
                {"logging_mode": mode, "log_retention_days": retention_days},
                actor=actor, address=address, action="privacy.logging", detail=detail,
            )
            self.mode = mode  # type: ignore[assignment]
            self.retention_days = retention_days

    def set_networks(self, api: list[str], admin: list[str], *, actor: str, address: str) -> None:
        """Replace both lists; refuses an admin list that would lock out the admin making it."""
        api_parsed = parse_networks(api, "api_networks")
        admin_parsed = parse_networks(admin, "admin_networks")
        if not address_in(address, admin_parsed):
            raise InvalidInput(
                f"admin_networks: your own address {address} would be locked out; include it", field="admin_networks"
            )
        with self._lock:
            self._store.set_many(
                {"api_networks": [str(n) for n in api_parsed], "admin_networks": [str(n) for n in admin_parsed]},
                actor=actor, address=address, action="privacy.networks",
                detail=f"api: {', '.join(map(str, api_parsed))}; admin: {', '.join(map(str, admin_parsed))}",
            )
            self.api_networks[:] = api_parsed
            self.admin_networks[:] = admin_parsed

    def set_cost(self, values: dict[str, Any], *, actor: str, address: str) -> None:
        merged = self.cost.model_dump()
        merged.update(values)
        try:
            cost = CostSettings(**merged)
        except ValueError as exc:
            field = "cost"
            errors = getattr(exc, "errors", None)
            if callable(errors):
                first = errors()[0]
                field = ".".join(str(part) for part in first.get("loc", ())) or field
                raise InvalidInput(f"{field}: {first.get('msg')}", field=field) from None
            raise InvalidInput(f"cost: {exc}", field=field) from None
        with self._lock:
            self._store.set_many(
                {"cost": cost.model_dump()}, actor=actor, address=address, action="settings.cost",
                detail=f"hardware {cost.hardware_price} {cost.currency}, {cost.power_watts} W",
            )
            self.cost = cost
