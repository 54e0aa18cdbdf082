"""`appliance models`: list (table and JSON), show, delete, set-default, deploy/undeploy with
--force for versions their quality budget rejected; bad references are one line and exit != 0."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from appliance.cli import app
from appliance.config import load_settings
from appliance.export.pipeline import ExportRequest, run_export
from appliance.repository import ModelRepository
from test_export_sources import write_linear_onnx


@pytest.fixture
def state(tmp_path: Path) -> Path:
    """Three versions of one tensor model: 1 and 2 accepted, 3 rejected (budget 0 on int8)."""
    source = write_linear_onnx(tmp_path / "linear.onnx")
    settings = load_settings(state_dir=tmp_path / "state")
    for quant, budget in (("fp32", None), ("fp32", None), ("int8", 0.0)):
        run_export(ExportRequest(source=str(source), name="linear", quant=quant, max_quality_loss=budget), settings)
    return tmp_path / "state"


def invoke(*args: str) -> "click.testing.Result":  # noqa: F821
    return CliRunner().invoke(app, list(args))


def listed(state: Path) -> list[dict[str, object]]:
    result = invoke("models", "list", "--json", "--state-dir", str(state))
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def assert_one_line_failure(result: object, fragment: str) -> None:
    assert result.exit_code != 0  # type: ignore[attr-defined]
    lines = [line for line in result.stderr.splitlines() if line.strip()]  # type: ignore[attr-defined]
    assert len(lines) == 1 and fragment in lines[0], result.stderr  # type: ignore[attr-defined]


def test_list_json_shows_every_version_and_which_one_is_served(state: Path) -> None:
    rows = listed(state)
    assert [(r["version"], r["quantization"], r["verdict"], r["deployable"], r["serving"]) for r in rows] == [
        (1, "fp32", "accepted", True, False),
        (2, "fp32", "accepted", True, True),
        (3, "int8", "rejected", False, False),
    ]
    assert all(r["task"] == "tensor" and r["size_bytes"] > 0 for r in rows)


def test_list_table_and_show(state: Path) -> None:
    table = invoke("models", "list", "--state-dir", str(state))
    assert table.exit_code == 0 and "linear" in table.stdout
    shown = invoke("models", "show", "linear/3", "--state-dir", str(state))
    assert shown.exit_code == 0 and "rejected" in shown.stdout and "deploy with --force" in shown.stdout
    as_json = json.loads(invoke("models", "show", "linear", "--json", "--state-dir", str(state)).stdout)
    assert as_json["manifest"]["version"] == 2 and as_json["report"]["verdict"] == "accepted"


def test_deploying_a_rejected_version_needs_force(state: Path) -> None:
    assert_one_line_failure(invoke("models", "deploy", "linear/3", "--state-dir", str(state)), "--force")
    assert listed(state)[2]["deployable"] is False
    assert invoke("models", "deploy", "linear/3", "--force", "--state-dir", str(state)).exit_code == 0
    assert listed(state)[2]["deployable"] is True


def test_undeploy_withdraws_a_version_from_serving(state: Path) -> None:
    assert invoke("models", "undeploy", "linear/2", "--state-dir", str(state)).exit_code == 0
    assert [r["serving"] for r in listed(state)] == [True, False, False]


def test_set_default_pins_the_served_version(state: Path) -> None:
    assert invoke("models", "set-default", "linear/1", "--state-dir", str(state)).exit_code == 0
    assert [(r["default"], r["serving"]) for r in listed(state)] == [(True, True), (False, False), (False, False)]
    assert_one_line_failure(invoke("models", "set-default", "linear/3", "--state-dir", str(state)), "not deployable")


def test_delete_one_version_then_the_model(state: Path) -> None:
    assert invoke("models", "delete", "linear/2", "--state-dir", str(state)).exit_code == 0
    assert [r["version"] for r in listed(state)] == [1, 3]
    assert invoke("models", "delete", "linear", "--state-dir", str(state)).exit_code == 0
    assert listed(state) == []
    assert ModelRepository(state / "models").next_version("linear") == 4


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("models", "show", "nope"), "not found"),
        (("models", "show", "linear/9"), "version 9 not found"),
        (("models", "deploy", "linear"), "needs a version"),
        (("models", "undeploy", "linear/x"), "not a positive number"),
        (("models", "delete", "/1"), "names no model"),
    ],
)
def test_bad_references_are_one_line(state: Path, args: tuple[str, ...], fragment: str) -> None:
    assert_one_line_failure(invoke(*args, "--state-dir", str(state)), fragment)
