"""The greedy part of the sampling kernel as a small ONNX graph, for providers where logits live
on the device (CUDA, TensorRT): argmax, the chosen token's log-probability and the top-n
alternatives, computed where the logits are so only a few numbers per row cross to the host.

Measured on the 2-core CPU box (bench/llm_sampling_kernels.py), log-softmax + top-n here is
several times faster than the numpy reference even on the CPU provider (ONNX Runtime's
vectorised kernels and threads), so the engine uses this form for log-probabilities everywhere
and numpy only for the draw itself. Must agree with `sampling.sample` for greedy rows (tests compare them). Never
imports the server.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

OPSET = 17


def greedy_logprobs_graph(top_n: int) -> onnx.ModelProto:
    """logits [rows, vocab] float, chosen [rows] int64 -> greedy token [rows] int64, the chosen
    tokens' logprob [rows], top_ids / top_logprobs [rows, n] (best first)."""
    nodes = [
        helper.make_node("ArgMax", ["logits"], ["token_2d"], axis=1, keepdims=1),
        helper.make_node("Squeeze", ["token_2d", "axis1"], ["token"]),
        helper.make_node("LogSoftmax", ["logits"], ["logp"], axis=1),
        helper.make_node("Unsqueeze", ["chosen", "axis1"], ["chosen_2d"]),
        helper.make_node("GatherElements", ["logp", "chosen_2d"], ["chosen_logp_2d"], axis=1),
        helper.make_node("Squeeze", ["chosen_logp_2d", "axis1"], ["logprob"]),
        helper.make_node("TopK", ["logp", "k"], ["top_logprobs", "top_ids"], axis=1, largest=1, sorted=1),
    ]
    graph = helper.make_graph(
        nodes,
        "greedy_logprobs",
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["rows", "vocab"]),
            helper.make_tensor_value_info("chosen", TensorProto.INT64, ["rows"]),
        ],
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
        # One thread, no spinning: it runs between the decoder's steps and must not leave a
        # second spinning thread pool competing with the decoder's.
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.top_n = top_n
        self.session = ort.InferenceSession(
            greedy_logprobs_graph(top_n).SerializeToString(), sess_options=options, providers=providers or ["CPUExecutionProvider"]
        )

    def __call__(self, logits: np.ndarray, chosen: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(greedy tokens, logprob of `chosen` (default: the greedy tokens), top ids, top logprobs)."""
        logits = np.ascontiguousarray(logits, dtype=np.float32)
        if chosen is None:
            chosen = logits.argmax(axis=1)
        token, logprob, top_ids, top_logprobs = self.session.run(None, {"logits": logits, "chosen": np.asarray(chosen, np.int64)})
        return token, logprob, top_ids, top_logprobs
