"""Which execution providers really create a session on this box (for `appliance doctor`).

Each provider in the onnxruntime build is tried with a tiny in-memory Add graph, and the
verdict rests on the created session's `get_providers()`, never on the build's list. Writes
nothing (no TensorRT cache). Never imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnxruntime as ort
from onnx import TensorProto, helper

from appliance.runtime.providers import ORT_LOG_FATAL, ORT_NAMES, REASON_NOT_BUILT

PROBE_OPSET = 17


@dataclass(frozen=True)
class ProviderProbe:
    name: str
    usable: bool
    detail: str


def tiny_model_bytes() -> bytes:
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["c"])],
        "probe",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4]) for n in ("a", "b")],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", PROBE_OPSET)])
    model.ir_version = 8
    return model.SerializeToString()


def probe_providers() -> list[ProviderProbe]:
    """One verdict per provider, best first."""
    built = set(ort.get_available_providers())
    model = tiny_model_bytes()
    results: list[ProviderProbe] = []
    ort.set_default_logger_severity(ORT_LOG_FATAL)
    for short in ("tensorrt", "cuda", "cpu"):
        full = ORT_NAMES[short]
        if full not in built:
            results.append(ProviderProbe(short, False, REASON_NOT_BUILT))
            continue
        options = ort.SessionOptions()
        options.log_severity_level = ORT_LOG_FATAL
        try:
            session = ort.InferenceSession(model, sess_options=options, providers=[full, "CPUExecutionProvider"] if short != "cpu" else [full])
        except Exception as exc:  # noqa: BLE001 - report, never crash the doctor
            results.append(ProviderProbe(short, False, f"session creation failed: {str(exc).splitlines()[0][:200] if str(exc) else exc.__class__.__name__}"))
            continue
        got = session.get_providers()
        if got and got[0] == full:
            results.append(ProviderProbe(short, True, f"creates sessions (onnxruntime {ort.__version__})"))
        else:
            results.append(ProviderProbe(short, False, "listed by the build, but the created session fell back to CPU (no GPU or CUDA/TensorRT libraries missing)"))
    return results
