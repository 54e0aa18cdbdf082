"""Execution-provider selection and ONNX Runtime session options.

`auto` tries TensorRT, then CUDA, then CPU. What a session really got is read back from the
CREATED session (`get_providers()`), never inferred from `get_available_providers()`: the
onnxruntime-gpu wheel lists CUDA and TensorRT on a box without a GPU and only logs an error
when their libraries fail to load. Each preferred provider that was not obtained gets a
readable reason, shown in model metadata and by `appliance doctor`. Never imports torch.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import onnxruntime as ort

from appliance.errors import ModelRejected
from appliance.repository.manifest import Manifest, ProviderHints

log = logging.getLogger("appliance.runtime")

ProviderName = Literal["tensorrt", "cuda", "cpu"]
ORT_NAMES: dict[str, str] = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
SHORT_NAMES = {value: key for key, value in ORT_NAMES.items()}
#: Each explicit choice still ends on CPU, which every build has.
CHOICE_ORDER: dict[str, list[str]] = {
    "auto": ["tensorrt", "cuda", "cpu"],
    "tensorrt": ["tensorrt", "cuda", "cpu"],
    "cuda": ["cuda", "cpu"],
    "cpu": ["cpu"],
}
#: Largest sequence length used for TensorRT optimisation profiles when the manifest gives none.
DEFAULT_PROFILE_SEQ_LEN = 512
#: onnxruntime's logger severities: 3 = error, 4 = fatal.
ORT_LOG_ERROR = 3
ORT_LOG_FATAL = 4

REASON_NOT_BUILT = "not in this onnxruntime build (the CPU wheel has no GPU providers; install the gpu extra)"
REASON_NOT_CREATED = (
    "listed by onnxruntime but the session did not get it (no GPU, or CUDA/cuDNN/TensorRT libraries missing)"
)


@dataclass(frozen=True)
class ProviderConfig:
    """The settings that decide providers and session options for one model."""

    choice: str = "auto"
    cpu_threads: int | None = None
    instances: int = 1
    cuda_device_id: int = 0
    cuda_mem_limit_bytes: int | None = None
    trt_workspace_bytes: int = 2 << 30
    trt_cache_dir: Path | None = None


@dataclass(frozen=True)
class ProviderReport:
    """What a created session runs on and why each preferred provider was not used."""

    active: str
    session_providers: list[str]
    requested: list[str]
    fallbacks: dict[str, str] = field(default_factory=dict)
    threads: int = 0

    def summary(self) -> str:
        if not self.fallbacks:
            return self.active
        reasons = "; ".join(f"{name}: {why}" for name, why in self.fallbacks.items())
        return f"{self.active} (not used: {reasons})"

    def as_json(self) -> dict[str, Any]:
        return {
            "active": self.active,
            "session_providers": self.session_providers,
            "requested": self.requested,
            "fallbacks": self.fallbacks,
            "intra_op_threads": self.threads,
        }


class SessionLike(Protocol):
    def get_providers(self) -> list[str]: ...


SessionOpener = Callable[[str, ort.SessionOptions, list[str], list[dict[str, Any]]], Any]


def _open_session(path: str, options: ort.SessionOptions, providers: list[str], provider_options: list[dict[str, Any]]) -> Any:
    return ort.InferenceSession(path, sess_options=options, providers=providers, provider_options=provider_options)


def cpu_count() -> int:
    """Cores this process may use (cgroup/affinity aware where the OS tells)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def candidate_order(choice: str, hints: ProviderHints) -> list[str]:
    """Providers to try, best first: the setting's order, narrowed by the manifest's hints."""
    order = list(CHOICE_ORDER.get(choice, CHOICE_ORDER["auto"]))
    if choice == "auto":
        preferred = [name for name in hints.preferred if name in order]
        order = preferred + [name for name in order if name not in preferred]
        # A manifest leaving a GPU provider out of its preferences means it should not be tried.
        order = [name for name in order if name in preferred or name == "cpu"]
    if "cpu" not in order:
        order.append("cpu")
    return order


def intra_op_threads(config: ProviderConfig) -> int:
    """Threads per session: the cores split between instances, so instances never oversubscribe."""
    if config.cpu_threads is not None:
        return max(1, config.cpu_threads // max(1, config.instances))
    return max(1, cpu_count() // max(1, config.instances))


def session_options(config: ProviderConfig) -> ort.SessionOptions:
    """Session options chosen on purpose (figures in MEASUREMENTS.md §6).

    - intra-op threads = cores / instances; inter-op 1, sequential execution: these graphs
      have no parallel branches worth a second pool.
    - spinning stays on: turning it off cost about 35% decode speed on the target CPU.
    - memory pattern on: the batcher's length buckets repeat shapes, so planned buffers reuse.
    - CPU arena on: batches allocate the same sizes again and again; the arena avoids malloc churn.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads(config)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_mem_pattern = True
    options.enable_cpu_mem_arena = True
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")
    options.log_severity_level = ORT_LOG_ERROR
    return options


def trt_profile_shapes(manifest: Manifest) -> dict[str, str]:
    """TensorRT optimisation profiles for dynamic inputs, so new shapes never rebuild the engine."""
    max_batch = max(1, manifest.max_batch_size)
    seq = manifest.tokenizer.max_length if manifest.tokenizer else DEFAULT_PROFILE_SEQ_LEN
    low, opt, high = [], [], []
    for spec in manifest.inputs:
        if spec.datatype == "BYTES" or -1 not in spec.shape:
            continue
        dims_min, dims_opt, dims_max = [], [], []
        for axis, dim in enumerate(spec.shape):
            if dim != -1:
                dims_min.append(dim), dims_opt.append(dim), dims_max.append(dim)
            elif axis == 0 and manifest.max_batch_size > 0:
                dims_min.append(1), dims_opt.append(max(1, max_batch // 2)), dims_max.append(max_batch)
            else:
                dims_min.append(1), dims_opt.append(min(128, seq)), dims_max.append(seq)
        low.append(f"{spec.name}:{'x'.join(map(str, dims_min))}")
        opt.append(f"{spec.name}:{'x'.join(map(str, dims_opt))}")
        high.append(f"{spec.name}:{'x'.join(map(str, dims_max))}")
    if not low:
        return {}
    return {
        "trt_profile_min_shapes": ",".join(low),
        "trt_profile_opt_shapes": ",".join(opt),
        "trt_profile_max_shapes": ",".join(high),
    }


def provider_options(name: str, config: ProviderConfig, manifest: Manifest) -> dict[str, Any]:
    """Options for one provider: device, memory limits, TensorRT caches and precision flags."""
    if name == "cuda":
        options: dict[str, Any] = {
            "device_id": config.cuda_device_id,
            "arena_extend_strategy": "kSameAsRequested",
            "do_copy_in_default_stream": True,
        }
        if config.cuda_mem_limit_bytes is not None:
            options["gpu_mem_limit"] = config.cuda_mem_limit_bytes
        return options
    if name == "tensorrt":
        options = {
            "device_id": config.cuda_device_id,
            "trt_max_workspace_size": config.trt_workspace_bytes,
            "trt_fp16_enable": manifest.providers.trt_fp16,
            "trt_int8_enable": manifest.providers.trt_int8,
        }
        if config.trt_cache_dir is not None:
            engine_dir = config.trt_cache_dir / manifest.name / str(manifest.version)
            engine_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            options.update(
                trt_engine_cache_enable=True,
                trt_engine_cache_path=str(engine_dir),
                trt_timing_cache_enable=True,
                trt_timing_cache_path=str(config.trt_cache_dir),
            )
        options.update(trt_profile_shapes(manifest))
        return options
    return {}


def create_session(
    model_path: Path,
    manifest: Manifest,
    config: ProviderConfig,
    *,
    available: Callable[[], Sequence[str]] = ort.get_available_providers,
    opener: SessionOpener = _open_session,
) -> tuple[Any, ProviderReport]:
    """Create a session on the best provider that really works, and report the fallbacks.

    `available` and `opener` are parameters only so the selection logic can be unit-tested
    with a faked provider list; production always uses onnxruntime's.
    """
    order = candidate_order(config.choice, manifest.providers)
    built = set(available())
    fallbacks: dict[str, str] = {}
    wanted: list[str] = []
    for name in order:
        if ORT_NAMES[name] in built or name == "cpu":
            wanted.append(name)
        else:
            fallbacks[name] = REASON_NOT_BUILT
    options = session_options(config)
    if any(name != "cpu" for name in wanted):
        # A failing CUDA/TensorRT load is reported once by us, below, not as onnxruntime's
        # multi-line error log.
        ort.set_default_logger_severity(ORT_LOG_FATAL)
    session: Any = None
    last_error: Exception | None = None
    start = 0
    while start < len(wanted):
        tried = wanted[start:]
        try:
            session = opener(
                str(model_path),
                options,
                [ORT_NAMES[name] for name in tried],
                [provider_options(name, config, manifest) for name in tried],
            )
            break
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own hierarchy
            last_error = exc
            if tried[0] == "cpu":
                break
            fallbacks[tried[0]] = f"session creation failed: {_first_line(exc)}"
            start += 1
    if session is None:
        raise ModelRejected(f"onnxruntime cannot load {model_path.name}: {_first_line(last_error)}", field="model")
    got = list(session.get_providers())
    for name in wanted:
        if ORT_NAMES[name] not in got and name not in fallbacks:
            fallbacks[name] = REASON_NOT_CREATED
    active = SHORT_NAMES.get(got[0], got[0]) if got else "cpu"
    # Providers ranked below the one in use were never needed: no reason to report for them.
    rank = order.index(active) if active in order else len(order)
    fallbacks = {name: why for name, why in fallbacks.items() if order.index(name) < rank}
    report = ProviderReport(
        active=active,
        session_providers=got,
        requested=[ORT_NAMES[name] for name in wanted],
        fallbacks=fallbacks,
        threads=options.intra_op_num_threads,
    )
    if any(why != REASON_NOT_BUILT for why in fallbacks.values()):
        # A GPU provider was in the build but did not work: one warning line, no stack trace.
        log.warning("model %s: running on %s", manifest.name, report.summary())
    elif fallbacks:
        log.info("model %s: running on %s", manifest.name, report.summary())
    return session, report


def _first_line(exc: BaseException | None) -> str:
    text = str(exc).strip() if exc is not None else "unknown error"
    return (text.splitlines() or ["unknown error"])[0][:300]
