"""appliance/benchmark/serverproc.py: a private server's state can hold companion versions of
the served model (the draft of `generation.speculative = "draft"`); the served version is its
default, and the real repository's files and default are left as they were."""

from __future__ import annotations

from pathlib import Path

from appliance.benchmark.serverproc import link_versions
from appliance.repository.store import ModelRepository
from tests.helpers.tiny_models import publish_adder


def test_companions_are_linked_and_the_served_version_is_the_private_default(tmp_path: Path) -> None:
    real = ModelRepository(tmp_path / "real")
    first = publish_adder(real)
    second = publish_adder(real)
    real.set_default("adder", second.version)
    manifest_before = (second.path / "manifest.json").read_bytes()

    private_dir = tmp_path / "private" / "models"
    link_versions(real.get("adder", first.version), (real.get("adder", second.version),), private_dir)

    private = ModelRepository(private_dir)
    assert [v.version for v in private.versions("adder")] == [first.version, second.version]
    assert private.get("adder").version == first.version
    assert real.get("adder").version == second.version
    assert (second.path / "manifest.json").read_bytes() == manifest_before
    linked = private_dir / "adder" / str(second.version) / "model.onnx"
    assert linked.stat().st_ino == (second.path / "model.onnx").stat().st_ino


def test_without_companions_only_the_served_version_is_there(tmp_path: Path) -> None:
    real = ModelRepository(tmp_path / "real")
    first = publish_adder(real)
    publish_adder(real)
    private_dir = tmp_path / "private" / "models"
    link_versions(real.get("adder", first.version), (), private_dir)
    assert [v.version for v in ModelRepository(private_dir).versions("adder")] == [first.version]
