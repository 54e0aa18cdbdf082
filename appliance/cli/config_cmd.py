"""`appliance config`: show the effective settings, or their documentation as a table."""

from __future__ import annotations

import json
from typing import Annotated, get_args, get_origin

import typer
from pydantic import BaseModel

from appliance.cli.app import ConfigOption, StateDirOption, app, console, settings_from
from appliance.config import Settings


def settings_table_markdown() -> str:
    """The README's configuration table, generated from the field descriptions."""
    rows = ["| setting | environment | default | meaning |", "| --- | --- | --- | --- |"]

    def walk(model: type[BaseModel], prefix: str, env_prefix: str) -> None:
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation, f"{prefix}{name}.", f"{env_prefix}{name.upper()}__")
                continue
            per_name = _per_name_model(annotation)
            if per_name is not None:
                # `serving.models`, `scale.models`: one table per model name, each field documented.
                rows.append(f"| `{prefix}{name}` | `{env_prefix}{name.upper()}` | `{{}}` | {field.description or ''} |")
                walk(per_name, f"{prefix}{name}.NAME.", f"{env_prefix}{name.upper()}__NAME__")
                continue
            default = field.get_default(call_default_factory=False) if field.default_factory is None else "(computed)"
            rows.append(
                f"| `{prefix}{name}` | `{env_prefix}{name.upper()}` | `{default}` | {field.description or ''} |"
            )

    walk(Settings, "", "APPLIANCE_")
    return "\n".join(rows)


def _per_name_model(annotation: object) -> type[BaseModel] | None:
    """The value model of a `dict[str, SomeSettings]` field, else None."""
    if get_origin(annotation) is not dict:
        return None
    args = get_args(annotation)
    value = args[1] if len(args) == 2 else None
    return value if isinstance(value, type) and issubclass(value, BaseModel) else None


@app.command("config")
def show_config(
    state_dir: StateDirOption = None,
    config: ConfigOption = None,
    markdown: Annotated[bool, typer.Option("--markdown", help="Print the settings reference table.")] = False,
) -> None:
    """Print the effective settings (command line > environment > TOML file > defaults)."""
    if markdown:
        typer.echo(settings_table_markdown())
        return
    settings = settings_from(state_dir=state_dir, config=config)
    console.print_json(json.dumps(settings.model_dump(mode="json")))
