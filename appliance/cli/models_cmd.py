"""`appliance models`: list, show, delete, set-default, deploy and undeploy model versions; pin,
unpin and set the keep-alive of a model.

Composition root for the model repository on the command line: parses `NAME[/VERSION]`,
calls appliance.repository (and the database for pin and keep-alive, which a running server
reads at its next repository poll), prints a table (or JSON for scripts). Never imports the
export stage, onnxruntime or torch; every refusal is one line and a non-zero exit.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.table import Table

from appliance.cli.app import (
    CLI_ACTOR,
    CLI_ADDRESS,
    ConfigOption,
    JsonOption,
    StateDirOption,
    console,
    err_console,
    fail,
    settings_from,
)
from appliance.cli.app import app as root_app
from appliance.errors import ApplianceError
from appliance.repository import ModelRepository, ModelVersion, parse_version
from appliance.serving.keep_alive import parse_keep_alive
from appliance.store.db import Database
from appliance.store.deployments import DeploymentStore
from appliance.store.migrate import upgrade

models_app = typer.Typer(
    name="models",
    help="The model repository: list, show, delete, set-default, deploy, undeploy; pin, unpin, keep-alive.",
    no_args_is_help=True,
)
root_app.add_typer(models_app, name="models")

RefArgument = Annotated[str, typer.Argument(help="NAME/VERSION, e.g. all-minilm-l6-v2/1.")]
BYTES_PER_MB = 1_000_000


def parse_ref(ref: str, *, version_required: bool) -> tuple[str, int | None]:
    """Split NAME[/VERSION]; one readable error for anything else."""
    name, _, version_text = ref.partition("/")
    if not name:
        fail(f"model: {ref!r} names no model; use NAME or NAME/VERSION", code=2)
    if not version_text:
        if version_required:
            fail(f"model: {ref!r} needs a version, as NAME/VERSION (see appliance models list)", code=2)
        return name, None
    version = parse_version(version_text)
    if version is None or version < 1:
        fail(f"model: version {version_text!r} in {ref!r} is not a positive number", code=2)
    return name, version


def repository_from(state_dir: Any, config: Any) -> ModelRepository:
    settings = settings_from(state_dir=state_dir, config=config)
    return ModelRepository(settings.models_dir)


def version_summary(version: ModelVersion, serving: ModelVersion | None) -> dict[str, Any]:
    """One row of `models list --json` (stable keys for scripts)."""
    report = version.report
    return {
        "name": version.name,
        "version": version.version,
        "task": version.manifest.task,
        "quantization": version.manifest.quantization,
        "variant": version.variant,
        "verdict": report.verdict if report else None,
        "deployable": version.manifest.deployable,
        "default": version.manifest.default,
        "serving": serving is not None and serving.path == version.path,
        "size_bytes": version.size_bytes,
        "created_at": version.manifest.created_at,
        "source": version.manifest.source.uri,
        "path": str(version.path),
    }


def report_table(version: ModelVersion) -> Table:
    """The report of one version as a two-column table (export output and `models show`)."""
    manifest, report = version.manifest, version.report
    table = Table(title=f"{manifest.name}/{manifest.version}", show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value")
    table.add_row("task", manifest.task)
    table.add_row("source", f"{manifest.source.kind}: {manifest.source.uri}")
    variant = version.variant
    table.add_row("variant", manifest.quantization + (f" ({variant})" if variant != manifest.quantization else ""))
    table.add_row("path", str(version.path))
    table.add_row("inputs", ", ".join(f"{s.name} {s.datatype}{s.shape}" for s in manifest.inputs))
    table.add_row("outputs", ", ".join(f"{s.name} {s.datatype}{s.shape}" for s in manifest.outputs))
    deployable = "[green]yes[/]" if manifest.deployable else "[red]no[/] (deploy with --force)"
    table.add_row("deployable", deployable + (" (default)" if manifest.default else ""))
    if report is None:
        table.add_row("report", "[yellow]missing[/]")
        return table
    table.add_row("size", f"{report.size_bytes / BYTES_PER_MB:.1f} MB")
    table.add_row("load", f"{report.load_s:.3f} s")
    table.add_row("latency", ", ".join(f"{key} {value}" for key, value in report.latency.items()))
    table.add_row("quality", ", ".join(f"{key} {value}" for key, value in report.quality.items() if key != "reference"))
    budget = report.budget
    colour = "green" if report.verdict == "accepted" else "red"
    verdict = f"[{colour}]{report.verdict}[/]"
    if budget.get("conversion_failure"):
        verdict += f" [red]the conversion is wrong: {budget['conversion_failure']}[/];"
    if budget:
        verdict += f" (loss {budget.get('loss')} vs budget {budget.get('max_loss')}"
        if budget.get("excess"):
            verdict += f", over by {budget.get('excess')}"
        verdict += f"; {budget.get('metric')})"
    table.add_row("verdict", verdict)
    if report.fusions:
        table.add_row("fusions", ", ".join(f"{op} x{count}" for op, count in report.fusions.items()))
    export_s = getattr(report, "export_s", None)
    if isinstance(export_s, dict) and "total" in export_s:
        table.add_row("export time", f"{export_s['total']:.1f} s")
    for note in report.notes:
        table.add_row("note", note)
    return table


@models_app.command("list")
def list_models(state_dir: StateDirOption = None, config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Every published version, with task, variant, verdict and whether it is served."""
    repository = repository_from(state_dir, config)
    rows: list[dict[str, Any]] = []
    for name in repository.names():
        serving = repository.serving_version(name)
        rows.extend(version_summary(version, serving) for version in repository.versions(name))
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        console.print("no models yet: run `appliance export --defaults` or `appliance export SOURCE --name N`")
        return
    table = Table("model", "version", "task", "variant", "verdict", "deployable", "serving", "size MB")
    for row in rows:
        table.add_row(
            row["name"],
            str(row["version"]),
            row["task"],
            row["variant"],
            row["verdict"] or "-",
            "yes" if row["deployable"] else "no",
            ("yes (default)" if row["default"] else "yes") if row["serving"] else "",
            f"{row['size_bytes'] / BYTES_PER_MB:.1f}",
        )
    console.print(table)


@models_app.command("show")
def show_model(
    ref: Annotated[str, typer.Argument(help="NAME or NAME/VERSION (default: the version served).")],
    state_dir: StateDirOption = None,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """The manifest and report of one version."""
    name, version = parse_ref(ref, version_required=False)
    try:
        found = repository_from(state_dir, config).get(name, version)
    except ApplianceError as exc:
        fail(str(exc))
    if as_json:
        payload = {"manifest": found.manifest.model_dump(mode="json"), "report": found.report.model_dump(mode="json") if found.report else None}
        typer.echo(json.dumps(payload, indent=2))
        return
    console.print(report_table(found))


@models_app.command("delete")
def delete_model(
    ref: Annotated[str, typer.Argument(help="NAME (every version) or NAME/VERSION.")],
    state_dir: StateDirOption = None,
    config: ConfigOption = None,
) -> None:
    """Delete one version, or a model with all its versions. Version numbers are never reused."""
    name, version = parse_ref(ref, version_required=False)
    try:
        removed = repository_from(state_dir, config).delete(name, version)
    except ApplianceError as exc:
        fail(str(exc))
    console.print(f"deleted {name} version{'s' if len(removed) != 1 else ''} {', '.join(map(str, removed))}")


@models_app.command("set-default")
def set_default(ref: RefArgument, state_dir: StateDirOption = None, config: ConfigOption = None) -> None:
    """Serve this version of the model (instead of the newest deployable one)."""
    name, version = parse_ref(ref, version_required=True)
    repository = repository_from(state_dir, config)
    try:
        chosen = repository.get(name, version)
        if not chosen.manifest.deployable:
            fail(f"model: {name}/{version} is not deployable; deploy it first (appliance models deploy {name}/{version})")
        repository.set_default(name, version)  # type: ignore[arg-type]
    except ApplianceError as exc:
        fail(str(exc))
    console.print(f"{name}/{version} is now the default version of {name}")


@models_app.command("deploy")
def deploy(
    ref: RefArgument,
    force: Annotated[bool, typer.Option("--force", help="Deploy a version its quality budget rejected.")] = False,
    state_dir: StateDirOption = None,
    config: ConfigOption = None,
) -> None:
    """Mark a version deployable (a rejected one needs --force)."""
    name, version = parse_ref(ref, version_required=True)
    repository = repository_from(state_dir, config)
    try:
        chosen = repository.get(name, version)
        report = chosen.report
        if report is not None and report.verdict == "rejected":
            why = rejection_reason(report.budget)
            if not force:
                fail(f"model: {name}/{version} was rejected: {why}; pass --force to deploy it anyway")
            err_console.print(f"[bold red]warning:[/] deploying {name}/{version} although it was rejected: {why}", highlight=False)
        repository.set_deployable(name, version, True)  # type: ignore[arg-type]
    except ApplianceError as exc:
        fail(str(exc))
    console.print(f"{name}/{version} is deployable")


def rejection_reason(budget: dict[str, Any]) -> str:
    """Why a version was rejected, in one line: a wrong conversion, or the budget's excess."""
    if budget.get("conversion_failure"):
        return f"its conversion is wrong ({budget['conversion_failure']})"
    return f"its quality loss {budget.get('loss')} is over the budget {budget.get('max_loss')}"


@models_app.command("undeploy")
def undeploy(ref: RefArgument, state_dir: StateDirOption = None, config: ConfigOption = None) -> None:
    """Withdraw a version from serving (its files stay)."""
    name, version = parse_ref(ref, version_required=True)
    try:
        repository_from(state_dir, config).set_deployable(name, version, False)  # type: ignore[arg-type]
    except ApplianceError as exc:
        fail(str(exc))
    console.print(f"{name}/{version} is no longer deployable")


def _decide(state_dir: Any, config: Any, name: str, change: Any) -> None:
    """Apply one decision about `name` in the database (audited), for a model that exists."""
    settings = settings_from(state_dir=state_dir, config=config)
    try:
        if name not in ModelRepository(settings.models_dir).names():
            fail(f"model: no model named {name!r} (see appliance models list)")
        settings.make_state_dir()
        database = Database(settings.db_url)
        try:
            upgrade(database)
            change(DeploymentStore(database))
        finally:
            database.close()
    except ApplianceError as exc:
        fail(str(exc))


NameArgument = Annotated[str, typer.Argument(help="Model name.")]


@models_app.command("pin")
def pin(name: NameArgument, state_dir: StateDirOption = None, config: ConfigOption = None) -> None:
    """Never evict this model or unload it for idleness (a running server applies it at its next poll)."""
    _decide(state_dir, config, name, lambda store: store.set_pinned(name, True, actor=CLI_ACTOR, address=CLI_ADDRESS))
    console.print(f"{name} is pinned: it stays loaded once loaded")


@models_app.command("unpin")
def unpin(name: NameArgument, state_dir: StateDirOption = None, config: ConfigOption = None) -> None:
    """Let this model be evicted when idle and another needs room."""
    _decide(state_dir, config, name, lambda store: store.set_pinned(name, False, actor=CLI_ACTOR, address=CLI_ADDRESS))
    console.print(f"{name} is not pinned")


@models_app.command("keep-alive")
def keep_alive(
    name: NameArgument,
    duration: Annotated[str, typer.Argument(help="Seconds or a duration such as 10m or 1h; -1: never unload; 'default': the server's.")],
    state_dir: StateDirOption = None,
    config: ConfigOption = None,
) -> None:
    """How long this model stays loaded after its last request."""
    try:
        seconds = None if duration.strip().lower() == "default" else parse_keep_alive(duration)
    except ApplianceError as exc:
        fail(str(exc), code=2)
    _decide(state_dir, config, name, lambda store: store.set_keep_alive(name, seconds, actor=CLI_ACTOR, address=CLI_ADDRESS))
    shown = "the server's default" if seconds is None else ("never unloaded" if seconds < 0 else f"{seconds:g} s")
    console.print(f"{name} keep-alive: {shown}")
