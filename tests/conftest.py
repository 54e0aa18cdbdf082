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
        if "reliability" in item.keywords:
            item.add_marker(skip)
