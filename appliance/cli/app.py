"""The Typer application object and the options every command shares.

Composition root: commands parse options into Settings and wire the layers together; no
business logic lives here. Each command group is its own module in this package.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console

from appliance.config import Settings, load_settings
from appliance.errors import ApplianceError

app = typer.Typer(
    name="appliance",
    help="On-prem inference appliance: export models to quantised ONNX and serve them on the LAN.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

#: Where progress and tables go; errors go to stderr as one line.
console = Console(stderr=False, emoji=False)
err_console = Console(stderr=True, emoji=False)

StateDirOption = Annotated[
    Path | None,
    typer.Option("--state-dir", help="State directory (models, database, caches). Env: APPLIANCE_STATE_DIR."),
]
ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", help="TOML configuration file. Env: APPLIANCE_CONFIG."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
#: Who the audit log names for changes made from the command line.
CLI_ACTOR = "cli"
CLI_ADDRESS = "local"


def settings_from(**overrides: Any) -> Settings:
    """Settings from CLI overrides (None = not given) > env > TOML; exits 2 on a bad value."""
    try:
        return load_settings(**overrides)
    except ApplianceError as exc:
        fail(str(exc), code=2)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print one readable line to stderr and exit non-zero."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def run_cli() -> None:
    """Entry point: map typed errors to one line and an exit code, never a traceback."""
    try:
        app()
    except ApplianceError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err_console.print("interrupted", highlight=False)
        sys.exit(130)


def _print_version(value: bool) -> None:
    if value:
        from appliance import __version__

        console.print(f"appliance {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """On-prem inference appliance: export models to quantised ONNX and serve them on the LAN."""
