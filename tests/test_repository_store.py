"""The model repository: atomic publishing, growing versions, defaults, deletion."""

from pathlib import Path

import pytest

from appliance.errors import ModelNotFound
from appliance.repository import Manifest, ModelRepository, SourceInfo, TensorSpec


def _manifest(name: str = "m", **extra: object) -> Manifest:
    return Manifest(
        name=name,
        version=1,
        task="tensor",
        source=SourceInfo(kind="onnx", uri="x.onnx", sha256="0" * 64),
        created_at="2026-01-01T00:00:00Z",
        opset=17,
        quantization="fp32",
        inputs=[TensorSpec(name="x", datatype="FP32", shape=[-1, 4])],
        outputs=[TensorSpec(name="y", datatype="FP32", shape=[-1, 4])],
        **extra,
    )


def _publish(repo: ModelRepository, **extra: object) -> int:
    staged = repo.staging_dir()
    (staged / "model.onnx").write_bytes(b"onnx")
    return repo.publish(staged, _manifest(**extra), None).version


def test_versions_only_grow_even_after_delete(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path / "models")
    assert [_publish(repo), _publish(repo)] == [1, 2]
    repo.delete("m", 2)
    assert _publish(repo) == 3
    assert [v.version for v in repo.versions("m")] == [1, 3]


def test_staging_is_invisible_until_published(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path / "models")
    staged = repo.staging_dir()
    (staged / "model.onnx").write_bytes(b"partial")
    assert repo.names() == []
    repo.clean_staging()
    assert not staged.exists()


def test_default_version_is_served_over_newest(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path / "models")
    _publish(repo, default=True)
    _publish(repo)
    assert repo.get("m").version == 1
    repo.set_default("m", 2)
    assert repo.get("m").version == 2
    assert [v.manifest.default for v in repo.versions("m")] == [False, True]


def test_rejected_version_is_not_served_until_forced(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path / "models")
    _publish(repo, deployable=False)
    with pytest.raises(ModelNotFound):
        repo.get("m")
    repo.set_deployable("m", 1, True)
    assert repo.get("m").version == 1


def test_corrupt_manifest_is_reported_not_served(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path / "models")
    _publish(repo)
    (repo.root / "m" / "1" / "manifest.json").write_text("{not json")
    assert repo.versions("m") == []
    assert 1 in repo.broken_versions("m")


def test_unsafe_names_are_refused() -> None:
    with pytest.raises(ValueError, match="invalid model name"):
        _manifest(name="../etc")
