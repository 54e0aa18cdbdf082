"""Loading a version safely: external data must stay inside the version folder, no symlinks,
and the graph must match its manifest — checked before onnxruntime reads anything."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from appliance.errors import ModelRejected
from appliance.repository.manifest import TensorSpec
from appliance.repository.store import ModelRepository, ModelVersion, read_version
from appliance.runtime.loading import check_signature, check_version_files
from appliance.runtime.providers import ProviderConfig, create_session
from tests.helpers.tiny_models import _manifest, _report


def _publish_external(repo: ModelRepository, location: str = "weights.bin") -> ModelVersion:
    """y = x @ W with W (64x64) stored as external data at `location`."""
    staged = repo.staging_dir()
    weight = np.arange(64 * 64, dtype=np.float32).reshape(64, 64) / 4096
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "ext",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 64])],
        initializer=[numpy_helper.from_array(weight, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(staged / "model.onnx"), save_as_external_data=True, location="weights.bin", size_threshold=0)
    if location != "weights.bin":
        _rewrite_location(staged / "model.onnx", location)
    manifest = _manifest("ext", [TensorSpec(name="x", datatype="FP32", shape=[-1, 64])], [TensorSpec(name="y", datatype="FP32", shape=[-1, 64])])
    return repo.publish(staged, manifest, _report())


def _rewrite_location(model_path: Path, location: str) -> None:
    model = onnx.load(str(model_path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    model_path.write_bytes(model.SerializeToString())


def test_external_data_inside_the_version_folder_loads_and_runs(tmp_path: Path) -> None:
    version = _publish_external(ModelRepository(tmp_path))
    check_version_files(version)
    session, _ = create_session(version.model_path, version.manifest, ProviderConfig())
    (y,) = session.run(None, {"x": np.ones((1, 64), np.float32)})
    assert y.shape == (1, 64)


@pytest.mark.parametrize("location", ["../../../escape.bin", "/etc/passwd", "sub/../../x.bin"])
def test_external_data_path_leaving_the_version_folder_is_refused(tmp_path: Path, location: str) -> None:
    version = _publish_external(ModelRepository(tmp_path), location)
    with pytest.raises(ModelRejected, match="leaves the version folder|relative path"):
        check_version_files(version)


def test_symlinked_external_data_is_refused(tmp_path: Path) -> None:
    version = _publish_external(ModelRepository(tmp_path / "models"))
    outside = tmp_path / "outside.bin"
    os.replace(version.path / "weights.bin", outside)
    os.symlink(outside, version.path / "weights.bin")
    with pytest.raises(ModelRejected, match="symbolic link"):
        check_version_files(version)


def test_symlinked_model_file_is_refused(tmp_path: Path) -> None:
    version = _publish_external(ModelRepository(tmp_path / "models"))
    real = tmp_path / "real.onnx"
    os.replace(version.model_path, real)
    os.symlink(real, version.model_path)
    with pytest.raises(ModelRejected, match="symbolic link"):
        check_version_files(version)


def test_external_range_past_the_end_of_its_file_is_refused(tmp_path: Path) -> None:
    version = _publish_external(ModelRepository(tmp_path))
    with open(version.path / "weights.bin", "r+b") as handle:
        handle.truncate(100)
    with pytest.raises(ModelRejected, match="exceeds its file"):
        check_version_files(version)


def test_manifest_that_lies_about_the_graph_is_refused(tmp_path: Path) -> None:
    version = _publish_external(ModelRepository(tmp_path))
    session, _ = create_session(version.model_path, version.manifest, ProviderConfig())
    lying = version.manifest.model_copy(update={"inputs": [TensorSpec(name="x", datatype="INT64", shape=[-1, 64])]})
    with pytest.raises(ModelRejected, match="says INT64, the graph has FP32"):
        check_signature(ModelVersion(version.path, lying, None), session.get_inputs(), session.get_outputs())
    renamed = version.manifest.model_copy(update={"outputs": [TensorSpec(name="logits", datatype="FP32", shape=[-1, 64])]})
    with pytest.raises(ModelRejected, match="'logits' is not in the graph"):
        check_signature(ModelVersion(version.path, renamed, None), session.get_inputs(), session.get_outputs())
    assert read_version(version.path).manifest.name == "ext"
