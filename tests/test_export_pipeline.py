"""Tiny random encoders, classifiers and ONNX files through the whole export pipeline: every
variant that applies is published with a manifest the server can trust and a report with the
verdict against the quality budget; refusals publish nothing and leave nothing behind."""

from __future__ import annotations

import fcntl
import io
import json
import re
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from rich.console import Console
from tokenizers import Tokenizer

from appliance.config import Settings, load_settings
from appliance.errors import ExportError
from appliance.export.pipeline import ExportRequest, LineProgress, run_export
from appliance.repository import ModelRepository
from appliance.repository.store import STAGING_DIR
from helpers.encoders import TINY_HIDDEN_SIZE, build_tiny_classifier, build_tiny_encoder
from test_export_sources import write_linear_onnx


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_encoder(tmp_path_factory.mktemp("encoder") / "model")


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_classifier(tmp_path_factory.mktemp("classifier") / "model", labels=("sad", "neutral", "happy"))


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings(state_dir=tmp_path / "state")


def assert_nothing_left(settings: Settings) -> None:
    repository = ModelRepository(settings.models_dir)
    assert repository.names() == []
    staging = settings.models_dir / STAGING_DIR
    assert not staging.exists() or list(staging.iterdir()) == []


def embed_like_the_server(version_path: Path, texts: list[str]) -> np.ndarray:
    """Tokenise with `tokenizers` (no transformers) and run the published graph."""
    manifest = json.loads((version_path / "manifest.json").read_text())
    tokenizer = Tokenizer.from_file(str(version_path / manifest["tokenizer"]["file"]))
    tokenizer.enable_padding(pad_id=manifest["tokenizer"]["pad_token_id"], pad_token=manifest["tokenizer"]["pad_token"])
    encodings = tokenizer.encode_batch(texts)
    columns = {
        "input_ids": [e.ids for e in encodings],
        "attention_mask": [e.attention_mask for e in encodings],
        "token_type_ids": [e.type_ids for e in encodings],
    }
    feeds = {spec["name"]: np.array(columns[spec["name"]], dtype=np.int64) for spec in manifest["inputs"]}
    session = ort.InferenceSession(str(version_path / manifest["model_file"]), providers=["CPUExecutionProvider"])
    return session.run(["sentence_embedding"], feeds)[0]


@pytest.mark.parametrize("quant", ["fp32", "fp16", "int8", "int8-static"])
def test_every_encoder_variant_is_published_with_fused_pooling(tiny_encoder: Path, settings: Settings, quant: str) -> None:
    result = run_export(ExportRequest(source=str(tiny_encoder), name="tiny-embed", quant=quant), settings)
    version = result.version
    manifest, report = version.manifest, result.report
    assert result.task == "feature-extraction"
    assert manifest.quantization == quant and report.variant == quant
    assert [o.name for o in manifest.outputs] == ["sentence_embedding"]
    assert manifest.outputs[0].datatype == "FP32" and manifest.outputs[0].shape == [-1, TINY_HIDDEN_SIZE]
    assert {i.name for i in manifest.inputs} == {"input_ids", "attention_mask", "token_type_ids"}
    assert manifest.embedding is not None and manifest.embedding.pooling == "mean" and manifest.embedding.normalize
    assert manifest.tokenizer is not None and manifest.tokenizer.max_length == 64
    assert (version.path / "tokenizer.json").is_file()
    assert report.verdict == "accepted" and manifest.deployable
    assert set(report.quality) >= {"cosine_mean", "cosine_min", "nn_agreement"}
    assert report.budget["max_loss"] == 0.02 and report.budget["within"] is True
    assert set(report.latency) >= {"batch_1_ms", "batch_32_ms"}
    assert report.size_bytes > 0 and report.load_s > 0
    embeddings = embed_like_the_server(version.path, ["a short sentence.", "and another, somewhat longer one here"])
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-3)
    assert not list((settings.models_dir / STAGING_DIR).iterdir())


def test_fp32_export_matches_the_pytorch_reference(tiny_encoder: Path, settings: Settings) -> None:
    report = run_export(ExportRequest(source=str(tiny_encoder), name="tiny-embed", quant="fp32"), settings).report
    assert report.quality["cosine_min"] > 0.99999
    assert report.quality["nn_agreement"] == 1.0


def test_declared_cls_pooling_without_normalize_is_fused_as_declared(tmp_path: Path, settings: Settings) -> None:
    folder = build_tiny_encoder(tmp_path / "cls-model", pooling="cls", normalize=False, seed=3)
    version = run_export(ExportRequest(source=str(folder), name="cls-embed", quant="fp32"), settings).version
    assert version.manifest.embedding is not None
    assert version.manifest.embedding.pooling == "cls" and not version.manifest.embedding.normalize
    norms = np.linalg.norm(embed_like_the_server(version.path, ["one sentence", "two"]), axis=1)
    assert not np.allclose(norms, 1.0)
    assert version.report is not None and version.report.quality["cosine_min"] > 0.99999


def test_plain_encoder_without_sentence_transformers_files_gets_mean_pooling_and_a_note(tmp_path: Path, settings: Settings) -> None:
    folder = build_tiny_encoder(tmp_path / "plain", sentence_transformers=False)
    result = run_export(ExportRequest(source=str(folder), name="plain", quant="fp32"), settings)
    assert result.task == "feature-extraction"
    assert any("mean pooling" in note for note in result.report.notes)


def test_auto_picks_int8_for_encoders_on_cpu(tiny_encoder: Path, settings: Settings) -> None:
    result = run_export(ExportRequest(source=str(tiny_encoder), name="tiny-embed", provider="cpu"), settings)
    assert result.version.manifest.quantization == "int8"


def test_auto_picks_fp16_for_encoders_on_gpu_providers(tiny_encoder: Path, settings: Settings) -> None:
    result = run_export(ExportRequest(source=str(tiny_encoder), name="tiny-embed", provider="cuda"), settings)
    assert result.version.manifest.quantization == "fp16"
    assert result.version.manifest.providers.trt_fp16


@pytest.mark.parametrize("quant", ["fp32", "int8", "int8-static"])
def test_classifier_variants_keep_labels_and_agree_with_pytorch(tiny_classifier: Path, settings: Settings, quant: str) -> None:
    result = run_export(
        ExportRequest(source=str(tiny_classifier), name="tiny-cls", quant=quant, max_quality_loss=0.1), settings
    )
    manifest = result.version.manifest
    assert result.task == "text-classification"
    assert manifest.labels == ["sad", "neutral", "happy"]
    assert [o.name for o in manifest.outputs] == ["logits"] and manifest.outputs[0].shape == [-1, 3]
    assert result.report.quality["label_agreement"] >= 0.9
    assert result.report.budget["from"] == "--max-quality-loss"


def test_a_variant_over_budget_is_published_rejected_and_not_deployable(tiny_encoder: Path, settings: Settings) -> None:
    result = run_export(ExportRequest(source=str(tiny_encoder), name="strict", quant="int8", max_quality_loss=0.0), settings)
    report = result.report
    assert report.verdict == "rejected" and not result.version.manifest.deployable
    assert report.budget["excess"] > 0 and report.budget["loss"] == report.budget["excess"]
    assert ModelRepository(settings.models_dir).serving_version("strict") is None


def test_force_publishes_a_rejected_variant_as_deployable(tiny_encoder: Path, settings: Settings) -> None:
    result = run_export(
        ExportRequest(source=str(tiny_encoder), name="forced", quant="int8", max_quality_loss=0.0, force=True), settings
    )
    assert result.report.verdict == "rejected"
    assert result.version.manifest.deployable and getattr(result.report, "forced") is True


def test_versions_only_grow(tiny_encoder: Path, settings: Settings) -> None:
    first = run_export(ExportRequest(source=str(tiny_encoder), name="grow", quant="fp32"), settings).version
    ModelRepository(settings.models_dir).delete("grow", first.version)
    second = run_export(ExportRequest(source=str(tiny_encoder), name="grow", quant="fp32"), settings).version
    assert (first.version, second.version) == (1, 2)


def test_tensor_model_variants_with_user_calibration(tmp_path: Path, settings: Settings) -> None:
    path = write_linear_onnx(tmp_path / "linear" / "linear.onnx")
    calibration = tmp_path / "calibration.npz"
    np.savez(calibration, x=np.random.default_rng(0).uniform(0.5, 1.0, (16, 4)).astype(np.float32))
    for quant in ("fp32", "int8", "int8-static"):
        result = run_export(
            ExportRequest(source=str(path), name="linear", quant=quant, calibration=calibration), settings
        )
        manifest = result.version.manifest
        assert result.task == "tensor" and manifest.quantization == quant
        assert [(i.name, i.datatype, i.shape) for i in manifest.inputs] == [("x", "FP32", [-1, 4])]
        assert [(o.name, o.shape) for o in manifest.outputs] == [("y", [-1, 2])]
        assert manifest.max_batch_size == 32
        assert result.report.quality["examples"] == 16
        assert result.report.quality["output_cosine_min"] > 0.99


def test_tensor_int8_static_without_calibration_is_refused(tmp_path: Path, settings: Settings) -> None:
    path = write_linear_onnx(tmp_path / "linear.onnx")
    with pytest.raises(ExportError, match="--calibration"):
        run_export(ExportRequest(source=str(path), name="linear", quant="int8-static"), settings)
    assert_nothing_left(settings)


def test_calibration_file_missing_an_input_is_refused(tmp_path: Path, settings: Settings) -> None:
    path = write_linear_onnx(tmp_path / "linear.onnx")
    calibration = tmp_path / "wrong.npz"
    np.savez(calibration, not_x=np.zeros((4, 4), dtype=np.float32))
    with pytest.raises(ExportError, match="lacks input 'x'"):
        run_export(ExportRequest(source=str(path), name="linear", quant="int8-static", calibration=calibration), settings)
    assert_nothing_left(settings)


def test_quantisation_that_does_not_fit_the_task_is_refused(tiny_encoder: Path, settings: Settings) -> None:
    with pytest.raises(ExportError, match="does not fit task feature-extraction"):
        run_export(ExportRequest(source=str(tiny_encoder), name="tiny-embed", quant="int4"), settings)
    assert_nothing_left(settings)


def test_existing_name_with_a_different_task_is_refused(tiny_encoder: Path, tiny_classifier: Path, settings: Settings) -> None:
    run_export(ExportRequest(source=str(tiny_classifier), name="taken", quant="fp32", max_quality_loss=1.0), settings)
    with pytest.raises(ExportError, match="already exists with task text-classification"):
        run_export(ExportRequest(source=str(tiny_encoder), name="taken", quant="fp32"), settings)
    assert [v.version for v in ModelRepository(settings.models_dir).versions("taken")] == [1]


def test_stale_staging_leftovers_are_removed_but_a_running_export_is_not(tiny_encoder: Path, settings: Settings) -> None:
    staging = settings.models_dir / STAGING_DIR
    (staging / "deadbeef-work" / "reference").mkdir(parents=True)
    (staging / "deadbeef.lock").write_text("")
    (staging / "cafe-version").mkdir()
    live_lock = staging / "feed.lock"
    (staging / "feed-work").mkdir()
    with open(live_lock, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        run_export(ExportRequest(source=str(tiny_encoder), name="tiny-embed", quant="fp32"), settings)
        assert sorted(p.name for p in staging.iterdir()) == ["feed-work", "feed.lock"]


def test_tensor_model_with_external_data_in_a_subfolder_is_published_self_contained(tmp_path: Path, settings: Settings) -> None:
    import onnx

    path = write_linear_onnx(tmp_path / "m" / "linear.onnx", external=True)
    (path.parent / "data").mkdir()
    (path.parent / "weights.bin").rename(path.parent / "data" / "weights.bin")
    model = onnx.load(str(path), load_external_data=False)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = "data/weights.bin"
    onnx.save_model(model, str(path))
    version = run_export(ExportRequest(source=str(path), name="linear", quant="fp32"), settings).version
    assert sorted(p.name for p in version.path.iterdir()) == ["manifest.json", "model.onnx", "report.json"]
    session = ort.InferenceSession(str(version.model_path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"x": np.ones((1, 4), dtype=np.float32)})[0], [[4.0, 4.0]])


@pytest.mark.parametrize("failing", ["lock", "work", "version"])
def test_an_interrupt_while_the_staging_lease_is_set_up_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    # A fresh-clone CI run caught it: Ctrl-C right as an export started left its lock, work and
    # version folders behind, because `with` runs __exit__ only after __enter__ returned.
    from appliance.export import staging

    repository = ModelRepository(tmp_path / "models")
    lease = staging.StagingLease(repository)
    real_mkdir, real_flock = Path.mkdir, fcntl.flock

    def mkdir(path: Path, *args: object, **kwargs: object) -> None:
        if path.name.endswith(f"-{failing}"):
            raise KeyboardInterrupt
        real_mkdir(path, *args, **kwargs)  # type: ignore[arg-type]

    def flock(handle: object, operation: int) -> None:
        if failing == "lock":
            raise KeyboardInterrupt
        real_flock(handle, operation)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "mkdir", mkdir)
    monkeypatch.setattr(staging.fcntl, "flock", flock)
    with pytest.raises(KeyboardInterrupt):
        with lease:
            pytest.fail("the lease must not be entered")
    monkeypatch.undo()
    assert list((tmp_path / "models" / STAGING_DIR).iterdir()) == []


def test_plain_progress_lines_say_when_each_sub_step_began() -> None:
    """A log (not a terminal) gets one line per sub-step with the seconds since its stage
    began, so a long evaluation shows where its time went."""
    out = io.StringIO()
    progress = LineProgress(Console(file=out, width=200))
    progress.start_stage("evaluate", "comparing with the unquantised reference")
    progress.step("PyTorch reference: perplexity")
    progress.finish_stage()
    lines = out.getvalue().splitlines()
    assert lines[0] == "evaluate: comparing with the unquantised reference"
    assert re.fullmatch(r"evaluate: PyTorch reference: perplexity \(at \d+\.\d s\)", lines[1]), lines[1]
    assert re.fullmatch(r"evaluate: done in \d+\.\d s", lines[2]), lines[2]
