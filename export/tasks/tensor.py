"""Task tensor: an existing ONNX model of any kind (vision, tabular, ...) published for KServe V2
serving with its signature read from the graph.

The source is checked by the onnx source (checker, external data inside its folder, no
symlinks). Variants: fp32 as given, fp16, int8 (dynamic) and int8-static (QDQ calibrated on
the user's `--calibration FILE.npz`: one array per input name, first axis = examples). Quality
is measured against the fp32 model itself on the calibration inputs (or generated inputs when
none are given): cosine of each example's outputs, worst case. Never imports torch.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import onnx

from appliance.errors import ExportError
from appliance.export import onnx_tools
from appliance.export.tasks.base import (
    LATENCY_BATCH_SIZES,
    Artifact,
    Evaluation,
    ManifestFields,
    Measurement,
    TaskExporter,
    median_ms,
    register_task,
)
from appliance.export.variants.common import EXTERNAL_DATA_THRESHOLD_BYTES, save_model
from appliance.repository import TensorSpec

MODEL_FILE = "model.onnx"
#: Rows per calibration feed.
CALIBRATION_BATCH_SIZE = 8
#: Examples generated when the user gives no inputs (and the size of free dynamic axes).
GENERATED_EXAMPLES = 16
GENERATED_DYNAMIC_DIM = 8
KSERVE_TO_NUMPY: dict[str, Any] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}


def load_npz_inputs(path: Any, inputs: list[TensorSpec]) -> dict[str, np.ndarray]:
    """Arrays for every model input from a user's .npz, cast to the declared types."""
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ExportError(f"calibration: {path} is not a readable .npz ({exc})", field="calibration") from None
    with archive:
        missing = [spec.name for spec in inputs if spec.name not in archive.files]
        if missing:
            raise ExportError(
                f"calibration: {path.name} lacks input {missing[0]!r} (has: {', '.join(archive.files) or 'nothing'})",
                field="calibration",
            )
        arrays: dict[str, np.ndarray] = {}
        for spec in inputs:
            array = archive[spec.name]
            if spec.datatype not in KSERVE_TO_NUMPY:
                raise ExportError(
                    f"calibration: input {spec.name!r} of type {spec.datatype} cannot be calibrated",
                    field="calibration",
                )
            if array.ndim != len(spec.shape):
                raise ExportError(
                    f"calibration: input {spec.name!r} has {array.ndim} dimensions, the model expects {len(spec.shape)}",
                    field="calibration",
                )
            arrays[spec.name] = array.astype(KSERVE_TO_NUMPY[spec.datatype])
    counts = {array.shape[0] for array in arrays.values()}
    if len(counts) != 1 or 0 in counts:
        raise ExportError(
            "calibration: every input needs the same number (> 0) of examples on axis 0", field="calibration"
        )
    return arrays


def generated_inputs(inputs: list[TensorSpec], seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic inputs from the signature alone (normal floats, zero integers)."""
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    for spec in inputs:
        if spec.datatype not in KSERVE_TO_NUMPY:
            raise ExportError(
                f"source: input {spec.name!r} of type {spec.datatype} needs --calibration inputs",
                field="calibration",
            )
        dims = [
            dim if dim != -1 else (GENERATED_EXAMPLES if index == 0 else GENERATED_DYNAMIC_DIM)
            for index, dim in enumerate(spec.shape)
        ]
        dtype = KSERVE_TO_NUMPY[spec.datatype]
        if np.issubdtype(dtype, np.floating):
            arrays[spec.name] = rng.standard_normal(dims).astype(dtype)
        else:
            arrays[spec.name] = np.zeros(dims, dtype=dtype)
    return arrays


def rows_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(a.shape[0], -1).astype(np.float64) if a.ndim else a.reshape(1, 1).astype(np.float64)
    b = b.reshape(b.shape[0], -1).astype(np.float64) if b.ndim else b.reshape(1, 1).astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dots = (a * b).sum(axis=1)
    # Two all-zero rows are identical; one zero row against a non-zero one is maximally wrong.
    return np.where(norms > 0, dots / np.maximum(norms, 1e-30), np.where(np.abs(a - b).max(axis=1) == 0, 1.0, 0.0))


@register_task
class TensorExporter(TaskExporter):
    task = "tensor"
    variants = ("fp32", "fp16", "int8", "int8-static")
    default_max_quality_loss = 0.02
    quality_metric = "1 - output_cosine_min (outputs vs the fp32 source model, worst example)"

    @classmethod
    def claims(cls, source: Any) -> bool:
        return source.format == "onnx"

    @classmethod
    def supported_architectures(cls) -> tuple[str, ...]:
        return ("any .onnx file (task tensor)",)

    def check_source(self) -> None:
        if self.source.format != "onnx":
            raise ExportError(f"task tensor needs an .onnx file, not a {self.source.format} source", field="task")

    def auto_variant(self, provider: str) -> str:
        # Nothing is known about an arbitrary graph's tolerance to quantisation: keep it as given.
        return "fp32"

    @functools.cached_property
    def signature(self) -> tuple[list[TensorSpec], list[TensorSpec]]:
        return onnx_tools.signature(self.source.path)

    @functools.cached_property
    def batched(self) -> bool:
        """Whether every input has a dynamic first axis the batcher may stack requests on."""
        inputs, _ = self.signature
        return all(spec.shape and spec.shape[0] == -1 for spec in inputs)

    @functools.cached_property
    def examples(self) -> dict[str, np.ndarray]:
        inputs, _ = self.signature
        if self.ctx.calibration is not None:
            return load_npz_inputs(self.ctx.calibration, inputs)
        return generated_inputs(inputs)

    def _feeds(self, rows: int) -> list[dict[str, np.ndarray]]:
        count = next(iter(self.examples.values())).shape[0]
        step = rows if self.batched else 1
        return [
            {name: array[start : start + step] for name, array in self.examples.items()}
            for start in range(0, count, step)
        ]

    def export_reference(self) -> Artifact:
        """The source model re-saved as model.onnx, its weights inline or, past the protobuf
        limit, in one model.onnx.data beside it (whatever external-data layout it came with)."""
        out = self.ctx.subdir("reference")
        external = sum(path.stat().st_size for path in self.source.weight_files) > EXTERNAL_DATA_THRESHOLD_BYTES
        save_model(onnx.load(str(self.source.path)), out, MODEL_FILE, external)
        return Artifact(
            directory=out,
            variant="fp32",
            quantization="fp32",
            model_file=MODEL_FILE,
            details={"source_file": self.source.path.name},
        )

    def optimise(self, reference: Artifact) -> Artifact:
        """No offline pass: the server's ONNX Runtime applies every graph optimisation at load
        time (ORT_ENABLE_ALL), and a saved pre-optimised graph would tie the file to this CPU
        and ORT version for no run-time gain. The report lists the fusions ORT makes."""
        reference.notes.append("offline optimisation skipped: ONNX Runtime fuses at load time (see fusions)")
        return reference

    def calibration_reader(self) -> list[dict[str, np.ndarray]]:
        if self.ctx.calibration is None:
            raise ExportError("quant: int8-static for a tensor model needs --calibration FILE.npz", field="calibration")
        return self._feeds(CALIBRATION_BATCH_SIZE)

    def _run(self, artifact: Artifact) -> list[list[np.ndarray]]:
        session = onnx_tools.open_session(artifact.model_path, threads=self.ctx.threads)
        outputs = []
        try:
            for feeds in self._feeds(CALIBRATION_BATCH_SIZE):
                outputs.append(session.run(None, feeds))
        except ExportError:
            raise
        except Exception as exc:  # noqa: BLE001 - onnxruntime's errors are untyped
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            hint = "check --calibration" if self.ctx.calibration else "pass --calibration FILE.npz with example inputs"
            raise ExportError(f"evaluate: the model does not run on the example inputs ({text}); {hint}", field="calibration") from None
        return outputs

    @functools.cached_property
    def reference_outputs(self) -> list[list[np.ndarray]]:
        return self._run(self.export_reference_artifact)

    @functools.cached_property
    def export_reference_artifact(self) -> Artifact:
        return Artifact(directory=self.ctx.work_dir / "reference", variant="fp32", quantization="fp32")

    def evaluate(self, candidate: Artifact) -> Evaluation:
        reference = self.reference_outputs
        produced = self._run(candidate)
        cosines: list[np.ndarray] = []
        max_abs = 0.0
        for ref_batch, got_batch in zip(reference, produced):
            for ref, got in zip(ref_batch, got_batch):
                cosines.append(rows_cosine(np.asarray(got), np.asarray(ref)))
                if ref.size:
                    max_abs = max(max_abs, float(np.abs(np.asarray(got, dtype=np.float64) - np.asarray(ref, dtype=np.float64)).max()))
        flat = np.concatenate(cosines) if cosines else np.ones(1)
        examples = next(iter(self.examples.values())).shape[0]
        quality = {
            "output_cosine_mean": round(float(flat.mean()), 6),
            "output_cosine_min": round(float(flat.min()), 6),
            "max_abs_diff": round(max_abs, 6),
            "examples": int(examples),
            "inputs": "calibration file" if self.ctx.calibration else "generated from the signature",
            "reference": "the fp32 source model (ONNX Runtime)",
        }
        return Evaluation(quality=quality, loss=1.0 - float(flat.min()))

    def measure(self, candidate: Artifact) -> Measurement:
        import time

        started = time.perf_counter()
        session = onnx_tools.open_session(candidate.model_path, threads=self.ctx.threads)
        load_s = time.perf_counter() - started
        latency: dict[str, Any] = {}
        sizes = LATENCY_BATCH_SIZES if self.batched else (1,)
        for batch in sizes:
            feeds = {name: np.resize(array, (batch, *array.shape[1:])) for name, array in self.examples.items()}
            latency[f"batch_{batch}_ms"] = round(median_ms(lambda: session.run(None, feeds)), 3)
        latency["provider"] = "cpu"
        return Measurement(load_s=round(load_s, 4), latency=latency)

    def manifest_fields(self, candidate: Artifact) -> ManifestFields:
        inputs, outputs = onnx_tools.signature(candidate.model_path)
        return ManifestFields(inputs=inputs, outputs=outputs, max_batch_size=32 if self.batched else 0)
