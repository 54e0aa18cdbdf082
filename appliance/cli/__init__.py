"""The `appliance` command line. Each command group lives in its own module below; importing
them here registers their commands on the shared Typer app."""

from __future__ import annotations

from appliance.offline import enforce_offline

enforce_offline()

from appliance.cli import config_cmd  # noqa: E402,F401  (registers commands)
from appliance.cli import export_cmd  # noqa: E402,F401  (registers commands)
from appliance.cli import models_cmd  # noqa: E402,F401  (registers commands)
from appliance.cli import service_cmd  # noqa: E402,F401  (registers commands)
from appliance.cli import serve_cmd  # noqa: E402,F401  (registers commands)
from appliance.cli import keys_cmd  # noqa: E402,F401  (registers commands)
from appliance.cli import db_cmd  # noqa: E402,F401  (registers commands)
from appliance.cli import doctor_cmd  # noqa: E402,F401  (registers commands)
from appliance.cli import bench_cmd  # noqa: E402,F401  (registers commands)
from appliance.cli import admin_cmd  # noqa: E402,F401  (registers commands)
from appliance.cli import usage_cmd  # noqa: E402,F401  (registers commands)
from appliance.cli import scale_cmd  # noqa: E402,F401  (registers commands)
from appliance.cli.app import app, run_cli  # noqa: E402


def main() -> None:
    run_cli()


__all__ = ["app", "main"]
