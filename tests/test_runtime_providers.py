"""Execution-provider selection.

What cannot run here (CUDA, TensorRT) is faked at exactly two points and nowhere else: the
provider list onnxruntime reports and the session creation. The CPU path runs for real.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import onnxruntime as ort
import pytest

from appliance.errors import ModelRejected
from appliance.repository.manifest import ProviderHints
from appliance.repository.store import ModelRepository
from appliance.runtime.providers import (
    REASON_NOT_BUILT,
    REASON_NOT_CREATED,
    ProviderConfig,
    candidate_order,
    create_session,
    provider_options,
    session_options,
)
from tests.helpers.tiny_models import publish_adder, publish_embedder

GPU_BUILD = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


class FakeSession:
    """Stands in for a session the GPU build would create: only what selection reads."""

    def __init__(self, providers: list[str]) -> None:
        self._providers = providers

    def get_providers(self) -> list[str]:
        return self._providers


def test_cpu_build_runs_on_cpu_and_says_why_gpu_providers_were_not_used(tmp_path: Path) -> None:
    version = publish_adder(ModelRepository(tmp_path))
    session, report = create_session(version.model_path, version.manifest, ProviderConfig())
    assert session.get_providers() == ["CPUExecutionProvider"]
    assert report.active == "cpu"
    assert report.fallbacks == {"tensorrt": REASON_NOT_BUILT, "cuda": REASON_NOT_BUILT}


def test_gpu_build_on_a_box_without_gpu_uses_what_the_created_session_got(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    version = publish_adder(ModelRepository(tmp_path))
    asked: list[list[str]] = []

    def opener(path: str, options: Any, providers: list[str], provider_options: list[dict[str, Any]]) -> FakeSession:
        asked.append(providers)
        return FakeSession(["CPUExecutionProvider"])  # what onnxruntime-gpu does without libcublasLt

    with caplog.at_level(logging.WARNING, logger="appliance.runtime"):
        _, report = create_session(version.model_path, version.manifest, ProviderConfig(), available=lambda: GPU_BUILD, opener=opener)
    assert asked == [GPU_BUILD]
    assert report.active == "cpu"
    assert report.fallbacks == {"tensorrt": REASON_NOT_CREATED, "cuda": REASON_NOT_CREATED}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0].getMessage()


def test_tensorrt_failing_to_create_falls_through_to_cuda(tmp_path: Path) -> None:
    version = publish_adder(ModelRepository(tmp_path))

    def opener(path: str, options: Any, providers: list[str], provider_options: list[dict[str, Any]]) -> FakeSession:
        if providers[0] == "TensorrtExecutionProvider":
            raise RuntimeError("TensorRT EP failed to create engine from network\nmore lines")
        return FakeSession(providers)

    _, report = create_session(
        version.model_path, version.manifest, ProviderConfig(trt_cache_dir=tmp_path / "trt"), available=lambda: GPU_BUILD, opener=opener
    )
    assert report.active == "cuda"
    assert report.fallbacks == {"tensorrt": "session creation failed: TensorRT EP failed to create engine from network"}


def test_explicit_cpu_choice_never_tries_gpu_providers(tmp_path: Path) -> None:
    version = publish_adder(ModelRepository(tmp_path))
    _, report = create_session(
        version.model_path, version.manifest, ProviderConfig(choice="cpu"), available=lambda: GPU_BUILD,
        opener=lambda path, options, providers, opts: FakeSession(providers),
    )
    assert report.requested == ["CPUExecutionProvider"] and report.fallbacks == {}


def test_manifest_preferences_narrow_auto_and_cpu_always_closes_the_list() -> None:
    assert candidate_order("auto", ProviderHints()) == ["tensorrt", "cuda", "cpu"]
    assert candidate_order("auto", ProviderHints(preferred=["cuda", "cpu"])) == ["cuda", "cpu"]
    assert candidate_order("cuda", ProviderHints()) == ["cuda", "cpu"]


def test_tensorrt_caches_live_under_the_state_dir_and_precision_follows_the_manifest(tmp_path: Path) -> None:
    version = publish_embedder(ModelRepository(tmp_path / "models"))
    manifest = version.manifest.model_copy(update={"providers": ProviderHints(trt_fp16=True)})
    config = ProviderConfig(trt_cache_dir=tmp_path / "trt-cache", trt_workspace_bytes=1 << 30, cuda_device_id=1)
    options = provider_options("tensorrt", config, manifest)
    assert options["trt_engine_cache_enable"] and options["trt_timing_cache_enable"]
    assert options["trt_engine_cache_path"] == str(tmp_path / "trt-cache" / "tiny-embed" / "1")
    assert options["trt_fp16_enable"] is True and options["trt_int8_enable"] is False
    assert options["trt_max_workspace_size"] == 1 << 30 and options["device_id"] == 1
    assert options["trt_profile_max_shapes"] == "input_ids:32x16,attention_mask:32x16"
    cuda = provider_options("cuda", ProviderConfig(cuda_mem_limit_bytes=1 << 30), manifest)
    assert cuda["gpu_mem_limit"] == 1 << 30


def test_cpu_threads_are_split_between_instances_with_spinning_on() -> None:
    options = session_options(ProviderConfig(cpu_threads=8, instances=2))
    assert options.intra_op_num_threads == 4 and options.inter_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert options.enable_mem_pattern and options.enable_cpu_mem_arena
    assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL


def test_unloadable_model_is_rejected_with_one_line(tmp_path: Path) -> None:
    version = publish_adder(ModelRepository(tmp_path))
    version.model_path.write_bytes(b"not onnx at all")
    with pytest.raises(ModelRejected) as caught:
        create_session(version.model_path, version.manifest, ProviderConfig())
    assert "\n" not in caught.value.message
