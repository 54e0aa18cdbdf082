"""The greedy part of the sampling kernel as a small ONNX graph, for providers where logits live
on the device (CUDA, TensorRT): argmax, the chosen token's log-probability and the top-n
alternatives, computed where the logits are so only a few numbers per row cross to the host.

On the CPU provider the numpy kernel (sampling.py) is as fast or faster, since the logits are
already in host memory (bench/llm_sampling_kernels.py measures both); the engine therefore uses
numpy on CPU. Must agree with `sampling.sample` for greedy rows (tests compare them). Never
imports the server.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

OPSET = 17


def greedy_logprobs_graph(top_n: int) -> onnx.ModelProto:
    """logits [rows, vocab] float -> token [rows] int64, logprob [rows], top_ids / top_logprobs [rows, n]."""
    nodes = [
        helper.make_node("ArgMax", ["logits"], ["token_2d"], axis=1, keepdims=1),
        helper.make_node("Squeeze", ["token_2d", "axis1"], ["token"]),
        helper.make_node("LogSoftmax", ["logits"], ["logp"], axis=1),
        helper.make_node("GatherElements", ["logp", "token_2d"], ["chosen_2d"], axis=1),
        helper.make_node("Squeeze", ["chosen_2d", "axis1"], ["logprob"]),
        helper.make_node("TopK", ["logp", "k"], ["top_logprobs", "top_ids"], axis=1, largest=1, sorted=1),
    ]
    graph = helper.make_graph(
        nodes,
        "greedy_logprobs",
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["rows", "vocab"])],
        [
            helper.make_tensor_value_info("token", TensorProto.INT64, ["rows"]),
            helper.make_tensor_value_info("logprob", TensorProto.FLOAT, ["rows"]),
            helper.make_tensor_value_info("top_ids", TensorProto.INT64, ["rows", top_n]),
            helper.make_tensor_value_info("top_logprobs", TensorProto.FLOAT, ["rows", top_n]),
        ],
        initializer=[
            helper.make_tensor("axis1", TensorProto.INT64, [1], [1]),
            helper.make_tensor("k", TensorProto.INT64, [1], [top_n]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


class GreedyLogprobsKernel:
    """The graph above in an InferenceSession on the given providers."""

    def __init__(self, top_n: int, providers: list[str] | None = None) -> None:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.top_n = top_n
        self.session = ort.InferenceSession(
            greedy_logprobs_graph(top_n).SerializeToString(), sess_options=options, providers=providers or ["CPUExecutionProvider"]
        )

    def __call__(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        token, logprob, top_ids, top_logprobs = self.session.run(None, {"logits": np.ascontiguousarray(logits, dtype=np.float32)})
        return token, logprob, top_ids, top_logprobs
