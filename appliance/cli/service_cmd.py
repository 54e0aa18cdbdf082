"""`appliance install-service` and `appliance uninstall-service`: the systemd service.

Composition root for appliance.ops.install: parses options, detects a GPU, wires the database
migration in, prints every step. Must never hold installer logic itself.
"""

from __future__ import annotations

import os
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Annotated, Literal

import typer

from appliance.cli.app import app, console, fail
from appliance.config import load_settings
from appliance.errors import ApplianceError
from appliance.ops.install import InstallOptions, ServiceInstaller, execute
from appliance.ops.service_files import DEFAULT_PREFIX, ServicePaths, nvidia_device_nodes

DISTRIBUTION = "inference-appliance"

DryRunOption = Annotated[bool, typer.Option("--dry-run", help="Print every step without doing anything.")]
RootOption = Annotated[
    Path,
    typer.Option("--root", help="Install into this folder instead of / (packaging, tests): no user, no systemctl."),
]
PrefixOption = Annotated[
    str, typer.Option("--prefix", help="Where the service's virtual environment lives.")
]


def migrate_database(state_dir: Path, config_file: Path) -> str | None:
    """Bring the service's database to the newest schema (same settings the service reads)."""
    from appliance.store import Database, upgrade

    settings = load_settings(state_dir=state_dir, config=config_file if config_file.is_file() else None)
    database = Database(settings.db_url)
    try:
        return upgrade(database)
    finally:
        database.close()


def package_spec(gpu: bool) -> str:
    """What a new environment installs: this source tree when running from one, else the release."""
    extra = "gpu" if gpu else "cpu"
    source_root = Path(__file__).resolve().parents[2]
    if (source_root / "pyproject.toml").is_file() and (source_root / "systemd").is_dir():
        return f"{source_root}[{extra}]"
    try:
        return f"{DISTRIBUTION}[{extra}]=={metadata.version(DISTRIBUTION)}"
    except metadata.PackageNotFoundError:
        return f"{DISTRIBUTION}[{extra}]"


def gpu_present() -> bool:
    return Path("/proc/driver/nvidia/version").exists() or bool(nvidia_device_nodes())


def _paths(root: Path, prefix: str) -> ServicePaths:
    return ServicePaths(root=root, prefix=PurePosixPath(prefix))


def _require_root(root: Path, dry_run: bool, command: str) -> None:
    if dry_run or root.resolve() != Path("/") or os.geteuid() == 0:
        return
    fail(f"{command} changes the system and needs root; use sudo, --dry-run or --root DIR", code=1)


@app.command("install-service")
def install_service(
    dry_run: DryRunOption = False,
    root: RootOption = Path("/"),
    prefix: PrefixOption = str(DEFAULT_PREFIX),
    venv: Annotated[
        Literal["current", "create"],
        typer.Option("--venv", help="current: run this environment; create: a new one under PREFIX/venv."),
    ] = "current",
    gpu: Annotated[
        Literal["auto", "yes", "no"],
        typer.Option("--gpu", help="Allow the NVIDIA devices (auto: when a GPU is present)."),
    ] = "auto",
    start: Annotated[bool, typer.Option("--start/--no-start", help="Enable and (re)start the service.")] = True,
    allow_network: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-network",
            help="Client network (CIDR) beyond loopback and the private ranges; repeatable.",
        ),
    ] = None,
    python: Annotated[
        Path | None,
        typer.Option("--python", help="Interpreter for --venv create (default: this one); must live outside /home, /root, /tmp."),
    ] = None,
) -> None:
    """Install or upgrade the hardened systemd service (user, dirs, venv, unit, config, migrations)."""
    _require_root(root, dry_run, "install-service")
    use_gpu = gpu == "yes" or (gpu == "auto" and gpu_present())
    try:
        options = InstallOptions(
            paths=_paths(root, prefix),
            venv_mode=venv,
            gpu=use_gpu,
            gpu_nodes=tuple(nvidia_device_nodes()) if use_gpu else (),
            start=start,
            package_spec=package_spec(use_gpu),
            allow_networks=tuple(allow_network or ()),
            **({"python": python} if python is not None else {}),
        )
        installer = ServiceInstaller(options, migrate=migrate_database)
        steps = installer.plan_install()
        console.print(f"{'would install' if dry_run else 'installing'} appliance.service:", highlight=False)
        execute(steps, dry_run=dry_run, echo=lambda line: console.print(line, markup=False, highlight=False, soft_wrap=True))
    except ApplianceError as exc:
        fail(str(exc))
    if not dry_run:
        console.print("done", highlight=False)


@app.command("uninstall-service")
def uninstall_service(
    purge: Annotated[
        bool, typer.Option("--purge", help="Also delete models, database, config, logs and the service user.")
    ] = False,
    dry_run: DryRunOption = False,
    root: RootOption = Path("/"),
    prefix: PrefixOption = str(DEFAULT_PREFIX),
) -> None:
    """Stop and remove the systemd service; models and data stay unless --purge."""
    _require_root(root, dry_run, "uninstall-service")
    try:
        installer = ServiceInstaller(InstallOptions(paths=_paths(root, prefix)))
        steps = installer.plan_uninstall(purge=purge)
        console.print(f"{'would remove' if dry_run else 'removing'} appliance.service:", highlight=False)
        execute(steps, dry_run=dry_run, echo=lambda line: console.print(line, markup=False, highlight=False, soft_wrap=True))
    except ApplianceError as exc:
        fail(str(exc))
    if not dry_run:
        console.print("done", highlight=False)
