"""Every encoder family the embedding export claims, proven against PyTorch: a tiny random model
of each (BERT, XLM-RoBERTa, DistilBERT, MPNet, ModernBERT, RoBERTa, CamemBERT, ELECTRA, ALBERT;
2 layers, hidden 32, its own kind of tokenizer.json) with sentence-transformers pooling files is
exported at fp32 through the real pipeline, served by the serving layer (the path /v1/embeddings
takes: tokenizer.json, dynamic batcher, padded length buckets, pooling fused in the graph), and
each served embedding is within cosine 0.999 of the PyTorch model with the same pooling and
normalisation computed here.

The families between them use every pooling mode: mean (BERT, MPNet, RoBERTa, CamemBERT,
ALBERT), CLS (XLM-RoBERTa as bge-m3, ELECTRA unnormalised), last-token (DistilBERT,
unnormalised), max (ModernBERT). Pooling comes from modules.json + 1_Pooling/config.json; a
folder without them gets mean + normalisation, and the report says which pooling was used and
where it came from. A family the export claims without a test here fails
test_every_claimed_family_has_a_tiny_model_test."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from appliance.config import load_settings
from appliance.errors import ExportError
from appliance.export.pipeline import ExportRequest, run_export
from appliance.export.tasks.feature_extraction import DEFAULT_ORIGIN, FeatureExtractionExporter, declared_pooling
from appliance.repository import ModelRepository
from appliance.serving.tasks import Route
from tests.helpers.encoders import (
    FAMILY_POOLING,
    TINY_HIDDEN_SIZE,
    build_tiny_encoder,
    build_tiny_family_encoder,
    write_sentence_transformers_files,
)
from tests.helpers.serving import model_service

#: Served vs PyTorch, per text (the issue's bar for fp32).
MIN_COSINE = 0.999
#: Reference vectors of different texts are at most this similar (the tiny models' weights are
#: initialised wide enough for that), so MIN_COSINE cannot be met by a vector that ignores the text.
DISTINCT_TEXTS_MAX_COSINE = 0.995
#: The sentence-transformers max_seq_length the tiny folders declare.
MAX_SEQ_LENGTH = 64
TEXTS = [
    "Hi",
    "The train to the airport leaves every twenty minutes from platform four.",
    "Der Zug fährt um acht Uhr; le chat dort sur le canapé.",
    "A MAN IS PLAYING A GUITAR!",
    "what time is it",
    # Longer than every tokenizer's max_seq_length: truncated alike on both sides.
    " ".join(["she forgot her umbrella and got soaked walking home from the office"] * 8),
]


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("encoders-state")


def torch_embeddings(folder: Path, texts: list[str], pooling: str, normalize: bool) -> np.ndarray:
    """PyTorch reference, one text at a time (no padding at all), pooled like
    sentence-transformers' Pooling module and normalised like its Normalize module."""
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModel.from_pretrained(str(folder)).eval()
    rows = []
    with torch.inference_mode():
        for text in texts:
            batch = tokenizer([text], truncation=True, max_length=MAX_SEQ_LENGTH, return_tensors="pt")
            hidden = model(**batch).last_hidden_state[0]  # [tokens, hidden]
            if pooling == "mean":
                pooled = hidden.mean(dim=0)
            elif pooling == "cls":
                pooled = hidden[0]
            elif pooling == "last":
                pooled = hidden[-1]
            elif pooling == "max":
                pooled = hidden.max(dim=0).values
            else:
                raise AssertionError(pooling)
            if normalize:
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
            rows.append(pooled.numpy())
    return np.stack(rows)


def served_embeddings(state_dir: Path, name: str, texts: list[str]) -> np.ndarray:
    """Embeddings from the serving layer, all texts in one request (one padded batch per
    length bucket), as /v1/embeddings gets them."""

    async def scenario() -> np.ndarray:
        service = model_service(state_dir, serving={"load_at_start": False})
        await service.start()
        try:
            async with await service.lease(name, Route.EMBEDDINGS) as lease:
                result = await lease.client.embed(texts, None, dimensions=None, timeout_s=30.0)
                return np.asarray(result.vectors)
        finally:
            await service.close(0)

    return asyncio.run(scenario())


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.parametrize("family", list(FAMILY_POOLING))
def test_each_encoder_family_serves_fp32_embeddings_within_cosine_0999_of_pytorch(
    family: str, state_dir: Path, tmp_path: Path
) -> None:
    pooling, normalize = FAMILY_POOLING[family]
    folder = build_tiny_family_encoder(tmp_path / family, family)
    name = f"tiny-{family}"
    result = run_export(ExportRequest(source=str(folder), name=name, quant="fp32"), load_settings(state_dir=state_dir))

    manifest, report = result.version.manifest, result.report
    assert result.task == "feature-extraction" and report.verdict == "accepted" and manifest.deployable
    assert manifest.embedding is not None
    assert (manifest.embedding.pooling, manifest.embedding.normalize) == (pooling, normalize)
    assert manifest.embedding.dimension == TINY_HIDDEN_SIZE
    assert report.details["pooling"] == pooling and report.details["normalize"] is normalize
    assert report.details["pooling_from"] == "1_Pooling/config.json"
    assert report.quality["cosine_min"] > MIN_COSINE

    served = served_embeddings(state_dir, name, TEXTS)
    reference = torch_embeddings(folder, TEXTS, pooling, normalize)
    assert served.shape == (len(TEXTS), TINY_HIDDEN_SIZE)
    # The texts' vectors differ well beyond the bar, so meeting it says the text was read right.
    unit = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    assert (unit @ unit.T)[~np.eye(len(TEXTS), dtype=bool)].max() < DISTINCT_TEXTS_MAX_COSINE
    similarity = cosines(served, reference)
    assert similarity.min() > MIN_COSINE, dict(zip(TEXTS, similarity.round(6).tolist()))
    norms = np.linalg.norm(served, axis=1)
    if normalize:
        np.testing.assert_allclose(norms, 1.0, atol=1e-4)
    else:  # unnormalised: the vectors themselves match, not only their direction
        np.testing.assert_allclose(norms, np.linalg.norm(reference, axis=1), rtol=1e-3)


def test_every_claimed_family_has_a_tiny_model_test() -> None:
    assert set(FAMILY_POOLING) == set(FeatureExtractionExporter.encoders)
    assert {mode for mode, _normalize in FAMILY_POOLING.values()} == {"mean", "cls", "max", "last"}


# -- where pooling comes from ----------------------------------------------------------------
def _folder_with_pooling(tmp_path: Path, **flags: bool) -> Path:
    folder = tmp_path / "st"
    folder.mkdir()
    write_sentence_transformers_files(folder, pooling="mean", normalize=True, dimension=8)
    config = json.loads((folder / "1_Pooling" / "config.json").read_text())
    config.update({key: False for key in config if key.startswith("pooling_mode_")}, **flags)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    ("flag", "mode"),
    [
        ("pooling_mode_mean_tokens", "mean"),
        ("pooling_mode_cls_token", "cls"),
        ("pooling_mode_max_tokens", "max"),
        ("pooling_mode_lasttoken", "last"),
    ],
)
def test_the_pooling_flag_in_1_pooling_config_decides_the_mode(tmp_path: Path, flag: str, mode: str) -> None:
    declared = declared_pooling(_folder_with_pooling(tmp_path, **{flag: True}))
    assert (declared.mode, declared.normalize, declared.declared) == (mode, True, True)
    assert declared.origin == "1_Pooling/config.json"


def test_a_folder_without_modules_json_gets_mean_pooling_and_normalisation_by_default(tmp_path: Path) -> None:
    declared = declared_pooling(tmp_path)
    assert (declared.mode, declared.normalize, declared.declared, declared.origin) == ("mean", True, False, DEFAULT_ORIGIN)


def test_normalisation_follows_the_normalize_module(tmp_path: Path) -> None:
    folder = tmp_path / "st"
    folder.mkdir()
    write_sentence_transformers_files(folder, pooling="cls", normalize=False, dimension=8)
    assert declared_pooling(folder)[:2] == ("cls", False)


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        ({"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": True}, "exactly one pooling mode, found mean, cls"),
        ({}, "exactly one pooling mode, found none"),
        ({"pooling_mode_weightedmean_tokens": True}, r"weightedmean_tokens \(1_Pooling/config.json\) is not supported \(supported: mean_tokens, cls_token, max_tokens, lasttoken\)"),
        ({"pooling_mode_mean_sqrt_len_tokens": True}, "mode mean_sqrt_len_tokens .* is not supported"),
    ],
)
def test_pooling_the_graph_cannot_reproduce_is_refused_by_name(tmp_path: Path, flags: dict[str, bool], says: str) -> None:
    with pytest.raises(ExportError, match=says):
        declared_pooling(_folder_with_pooling(tmp_path, **flags))


def test_a_dense_module_after_pooling_is_refused_naming_the_supported_modules(tmp_path: Path) -> None:
    folder = _folder_with_pooling(tmp_path, pooling_mode_mean_tokens=True)
    modules = json.loads((folder / "modules.json").read_text())
    modules.insert(2, {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    (folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ExportError, match="module Dense is not supported .supported: Transformer, Pooling, Normalize"):
        declared_pooling(folder)


def test_every_variants_report_says_the_default_pooling_was_assumed(tmp_path: Path) -> None:
    folder = build_tiny_encoder(tmp_path / "plain", sentence_transformers=False)
    settings = load_settings(state_dir=tmp_path / "state")
    report = run_export(ExportRequest(source=str(folder), name="plain", task="feature-extraction", quant="int8"), settings).report
    assert report.details["pooling"] == "mean" and report.details["normalize"] is True
    assert report.details["pooling_from"] == DEFAULT_ORIGIN
    assert any("mean pooling + L2 normalisation assumed" in note for note in report.notes)
    assert report.details["method"] == "dynamic int8"


# -- what is not supported is refused by name ------------------------------------------------
def _retyped(tmp_path: Path, model_type: str, architecture: str) -> Path:
    folder = build_tiny_encoder(tmp_path / "src")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type=model_type, architectures=[architecture])
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_an_unsupported_encoder_is_refused_naming_every_supported_family(tmp_path: Path) -> None:
    settings = load_settings(state_dir=tmp_path / "state")
    folder = _retyped(tmp_path, "deberta-v2", "DebertaV2Model")
    with pytest.raises(ExportError) as caught:
        run_export(ExportRequest(source=str(folder), name="deberta", quant="fp32"), settings)
    message = str(caught.value)
    assert "DebertaV2Model is not supported for feature-extraction" in message
    for supported in ("BertModel", "XLMRobertaModel", "DistilBertModel", "MPNetModel", "ModernBertModel"):
        assert supported in message
    assert ModelRepository(settings.models_dir).names() == []


def test_modernbert_is_an_embedder_only_and_refused_as_a_cross_encoder(tmp_path: Path) -> None:
    settings = load_settings(state_dir=tmp_path / "state")
    folder = _retyped(tmp_path, "modernbert", "ModernBertForSequenceClassification")
    shutil.rmtree(folder / "1_Pooling")
    (folder / "modules.json").unlink()
    with pytest.raises(ExportError, match="ModernBertForSequenceClassification is not supported for text-classification"):
        run_export(ExportRequest(source=str(folder), name="mb-rerank", task="text-classification", quant="fp32"), settings)
