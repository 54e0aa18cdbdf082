"""Sentence-embedding pooling and L2 normalisation as an ONNX graph piece, plus the numpy
reference the tests compare it with.

The export stage appends these nodes to an encoder graph so the model itself outputs
`sentence_embedding` (the server then runs no per-request Python for it, on any provider).
Modes follow sentence-transformers' Pooling module: mean over unmasked tokens, the CLS token,
max over unmasked tokens, the last unmasked token (right padding). Never imports torch or
onnxruntime; pure graph construction and numpy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

PoolingMode = Literal["mean", "cls", "max", "last"]
POOLING_MODES: tuple[str, ...] = ("mean", "cls", "max", "last")

#: Node names of the piece start with this, so later passes (fp16 conversion) can find them.
NODE_PREFIX = "pooling/"
#: Floor for the token count of a row (sentence-transformers clamps at 1e-9).
MIN_TOKEN_COUNT = 1e-9
#: Floor for the L2 norm (torch.nn.functional.normalize's eps).
MIN_NORM = 1e-12
#: Value masked tokens get before max pooling (sentence-transformers uses -1e9).
MASKED_MAX_VALUE = -1e9


@dataclass(frozen=True)
class PoolingPiece:
    """Nodes and constants to append to a graph that has `hidden` [B,T,H] and `mask` [B,T]."""

    nodes: list[onnx.NodeProto]
    initializers: list[onnx.TensorProto]


def _reduce(op: str, data: str, axis: int, out: str, opset: int, name: str, keepdims: int) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    # ReduceSum takes axes as an input from opset 13, the other reductions from opset 18.
    axes_as_input = opset >= (13 if op == "ReduceSum" else 18)
    if axes_as_input:
        axes_name = f"{NODE_PREFIX}{name}_axes"
        init = numpy_helper.from_array(np.array([axis], dtype=np.int64), axes_name)
        return [helper.make_node(op, [data, axes_name], [out], name=f"{NODE_PREFIX}{name}", keepdims=keepdims)], [init]
    return [helper.make_node(op, [data], [out], name=f"{NODE_PREFIX}{name}", axes=[axis], keepdims=keepdims)], []


def pooling_piece(
    hidden: str,
    mask: str,
    output: str,
    *,
    mode: PoolingMode = "mean",
    normalize: bool = True,
    opset: int = 17,
) -> PoolingPiece:
    """Build the nodes computing `output` [B,H] from `hidden` [B,T,H] and `mask` [B,T] (int)."""
    if mode not in POOLING_MODES:
        raise ValueError(f"pooling mode {mode!r} is not one of {', '.join(POOLING_MODES)}")
    p = NODE_PREFIX
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def const(name: str, value: np.ndarray) -> str:
        full = f"{p}{name}"
        inits.append(numpy_helper.from_array(value, full))
        return full

    def add(result: tuple[list[onnx.NodeProto], list[onnx.TensorProto]]) -> None:
        nodes.extend(result[0])
        inits.extend(result[1])

    pooled = f"{p}pooled" if normalize else output
    nodes.append(helper.make_node("Cast", [mask], [f"{p}mask_f"], name=f"{p}mask_cast", to=TensorProto.FLOAT))
    if mode in ("mean", "max"):
        axes = const("unsqueeze_axes", np.array([-1], dtype=np.int64))
        nodes.append(helper.make_node("Unsqueeze", [f"{p}mask_f", axes], [f"{p}mask_3d"], name=f"{p}mask_unsqueeze"))
    if mode == "mean":
        nodes.append(helper.make_node("Mul", [hidden, f"{p}mask_3d"], [f"{p}masked"], name=f"{p}mask_mul"))
        add(_reduce("ReduceSum", f"{p}masked", 1, f"{p}summed", opset, "sum_tokens", 0))
        add(_reduce("ReduceSum", f"{p}mask_3d", 1, f"{p}counts", opset, "count_tokens", 0))
        floor = const("min_count", np.array(MIN_TOKEN_COUNT, dtype=np.float32))
        nodes.append(helper.make_node("Max", [f"{p}counts", floor], [f"{p}counts_safe"], name=f"{p}count_floor"))
        nodes.append(helper.make_node("Div", [f"{p}summed", f"{p}counts_safe"], [pooled], name=f"{p}mean"))
    elif mode == "max":
        one = const("one", np.array(1.0, dtype=np.float32))
        big = const("masked_value", np.array(MASKED_MAX_VALUE, dtype=np.float32))
        nodes.append(helper.make_node("Sub", [one, f"{p}mask_3d"], [f"{p}inv_mask"], name=f"{p}invert_mask"))
        nodes.append(helper.make_node("Mul", [f"{p}inv_mask", big], [f"{p}penalty"], name=f"{p}penalty"))
        nodes.append(helper.make_node("Add", [hidden, f"{p}penalty"], [f"{p}penalised"], name=f"{p}apply_penalty"))
        add(_reduce("ReduceMax", f"{p}penalised", 1, pooled, opset, "max_tokens", 0))
    elif mode == "cls":
        index = const("cls_index", np.array(0, dtype=np.int64))
        nodes.append(helper.make_node("Gather", [hidden, index], [pooled], name=f"{p}cls", axis=1))
    else:  # last unmasked token, right padding
        add(_reduce("ReduceSum", f"{p}mask_f", 1, f"{p}lengths_f", opset, "lengths", 1))
        one = const("one", np.array(1.0, dtype=np.float32))
        nodes.append(helper.make_node("Sub", [f"{p}lengths_f", one], [f"{p}last_f"], name=f"{p}last_index_f"))
        nodes.append(helper.make_node("Cast", [f"{p}last_f"], [f"{p}last_idx"], name=f"{p}last_index", to=TensorProto.INT64))
        nodes.append(helper.make_node("GatherND", [hidden, f"{p}last_idx"], [pooled], name=f"{p}last", batch_dims=1))
    if normalize:
        add(_reduce("ReduceL2", pooled, -1, f"{p}norm", opset, "l2", 1))
        floor = const("min_norm", np.array(MIN_NORM, dtype=np.float32))
        nodes.append(helper.make_node("Max", [f"{p}norm", floor], [f"{p}norm_safe"], name=f"{p}norm_floor"))
        nodes.append(helper.make_node("Div", [pooled, f"{p}norm_safe"], [output], name=f"{p}normalize"))
    return PoolingPiece(nodes=nodes, initializers=inits)


def pooling_model(hidden_size: int, *, mode: PoolingMode = "mean", normalize: bool = True, opset: int = 17) -> onnx.ModelProto:
    """A standalone model: (hidden [B,T,H] float, attention_mask [B,T] int64) -> embedding [B,H]."""
    piece = pooling_piece("hidden", "attention_mask", "sentence_embedding", mode=mode, normalize=normalize, opset=opset)
    graph = helper.make_graph(
        piece.nodes,
        "pooling",
        [
            helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", "tokens", hidden_size]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "tokens"]),
        ],
        [helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["batch", hidden_size])],
        initializer=piece.initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def pool_numpy(hidden: np.ndarray, mask: np.ndarray, *, mode: PoolingMode = "mean", normalize: bool = True) -> np.ndarray:
    """The reference: what the graph piece must compute, in float32 numpy."""
    hidden = hidden.astype(np.float32)
    mask_f = mask.astype(np.float32)
    if mode == "mean":
        summed = (hidden * mask_f[..., None]).sum(axis=1)
        pooled = summed / np.maximum(mask_f.sum(axis=1, keepdims=True), MIN_TOKEN_COUNT)
    elif mode == "max":
        pooled = (hidden + (1.0 - mask_f[..., None]) * MASKED_MAX_VALUE).max(axis=1)
    elif mode == "cls":
        pooled = hidden[:, 0, :]
    elif mode == "last":
        last = mask_f.sum(axis=1).astype(np.int64) - 1
        pooled = hidden[np.arange(hidden.shape[0]), last]
    else:
        raise ValueError(f"pooling mode {mode!r} is not one of {', '.join(POOLING_MODES)}")
    if normalize:
        pooled = pooled / np.maximum(np.linalg.norm(pooled, axis=-1, keepdims=True), MIN_NORM)
    return pooled.astype(np.float32)
