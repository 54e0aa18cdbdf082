"""Weight-only quantisation of decoder graphs (MatMulNBits / GatherBlockQuantized).

Why weight-only: dynamic activation quantisation wrecks small decoders (SmolLM2-135M:
perplexity 29.2 -> 51 with quantize_dynamic), while 8-bit weight-only MatMulNBits costs about
0.5%. Why our own pass and not the model builder's: the builder's int8 graph does not load
('lm_head.MatMul.weight_Q4 is not a graph input') and its int4 defaults quantise the LM head
to 4 bits, which costs too much perplexity. So the builder writes fp32 and this module
quantises it, with the LM head and the (possibly tied) embedding as separate choices, because
they are the speed/size/quality trade the report must show.

A tied embedding appears in the graph as a Transpose of the LM head's weight (model builder)
or the LM head as a Transpose of the embedding (Optimum). MatMulNBits needs a constant
weight, so constant Transposes of initializers are folded first ("untying"): both users then
own their weight and can be quantised independently.

Never imports torch; never changes graph inputs or outputs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from appliance.errors import ExportError

EXTERNAL_DATA_SUFFIX = ".data"
#: Tensors smaller than this stay inside model.onnx; larger ones go to the external file.
EXTERNAL_DATA_THRESHOLD_BYTES = 1024


@dataclass(frozen=True)
class WeightOnlyRecipe:
    """How each group of weights is stored. None keeps a group in fp32."""

    bits: int
    block_size: int = 32
    lm_head_bits: int | None = None
    embedding_bits: int | None = None
    #: False: unsigned codes with a per-block zero point (uint8), which follows the asymmetric
    #: grid of GGUF Q4_1/Q4_K sources more closely than symmetric codes do.
    symmetric: bool = True
    #: 4 = int8 activations inside MatMulNBits (the fast CPU kernel; accuracy_level 0 ran
    #: 8-bit weights at 8.7 tok/s against 58 tok/s).
    accuracy_level: int = 4

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ExportError(f"quant: weight bits must be 4 or 8, not {self.bits}", field="quant")
        if self.lm_head_bits not in (None, 4, 8):
            raise ExportError(f"quant: lm_head bits must be 4, 8 or fp32, not {self.lm_head_bits}", field="quant")
        if self.embedding_bits not in (None, 4):
            raise ExportError("quant: the embedding can be stored in 4 bits or fp32 only", field="quant")
        if self.block_size < 16 or self.block_size & (self.block_size - 1) or self.block_size > 256:
            raise ExportError(
                f"block_size: {self.block_size} must be a power of two between 16 and 256", field="block_size"
            )

    def describe(self) -> dict[str, Any]:
        return {key: ("fp32" if value is None else value) for key, value in asdict(self).items()}


def load_with_weights(path: Path) -> onnx.ModelProto:
    return onnx.load(str(path), load_external_data=True)


def save_with_weights(model: onnx.ModelProto, path: Path) -> None:
    """model.onnx plus one external data file beside it (protobuf cannot hold > 2 GB)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=path.name + EXTERNAL_DATA_SUFFIX,
        size_threshold=EXTERNAL_DATA_THRESHOLD_BYTES,
    )


def _ensure_node_names(graph: onnx.GraphProto) -> None:
    used = {node.name for node in graph.node if node.name}
    for index, node in enumerate(graph.node):
        if not node.name:
            name = f"{node.op_type}_{index}"
            while name in used:
                name += "_"
            node.name = name
            used.add(name)


def fold_constant_transposes(model: onnx.ModelProto) -> list[str]:
    """Replace every Transpose of an initializer by a transposed initializer (unties tied
    embeddings); returns the names of the new initializers."""
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    folded: list[str] = []
    keep: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type == "Transpose" and node.input[0] in initializers:
            array = numpy_helper.to_array(initializers[node.input[0]])
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            transposed = np.ascontiguousarray(np.transpose(array, perm) if perm else array.T)
            graph.initializer.append(numpy_helper.from_array(transposed, node.output[0]))
            folded.append(node.output[0])
            continue
        keep.append(node)
    if folded:
        del graph.node[:]
        graph.node.extend(keep)
        used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
        unused = [init for init in graph.initializer if init.name not in used]
        for init in unused:
            graph.initializer.remove(init)
    return folded


def find_lm_head(model: onnx.ModelProto) -> onnx.NodeProto | None:
    """The MatMul that produces the logits (directly, or the one named lm_head)."""
    for node in model.graph.node:
        if node.op_type == "MatMul" and "logits" in node.output:
            return node
    candidates = [node for node in model.graph.node if node.op_type == "MatMul" and "lm_head" in node.name]
    return candidates[-1] if candidates else None


def find_embedding(model: onnx.ModelProto) -> onnx.NodeProto | None:
    """The Gather over the token-embedding table (an initializer of rank 2 fed input_ids)."""
    initializers = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Gather" and node.input[0] in initializers and len(initializers[node.input[0]].dims) == 2:
            if node.input[1] == "input_ids" or "embed" in node.name or "wte" in node.input[0]:
                return node
    return None


def _quantizer(model: onnx.ModelProto, **kwargs: Any) -> onnx.ModelProto:
    import logging

    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    # It logs two INFO lines per node (thousands for an LLM); the report says what was done.
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)

    quantizer = MatMulNBitsQuantizer(model, **kwargs)
    quantizer.process()
    return quantizer.model.model


def quantize_weight_only(source: Path, target: Path, recipe: WeightOnlyRecipe) -> dict[str, Any]:
    """Write `source` quantised by `recipe` to `target`; returns what was done (report)."""
    model = load_with_weights(source)
    _ensure_node_names(model.graph)
    # Untie only when the LM head or the embedding is quantised: kept in fp32, the tied
    # weight is stored once and shared.
    untied = fold_constant_transposes(model) if recipe.lm_head_bits or recipe.embedding_bits else []
    lm_head = find_lm_head(model)
    embedding = find_embedding(model)
    exclude = [lm_head.name] if lm_head is not None else []
    model = _quantizer(
        model,
        bits=recipe.bits,
        block_size=recipe.block_size,
        accuracy_level=recipe.accuracy_level,
        is_symmetric=recipe.symmetric,
        nodes_to_exclude=exclude,
        op_types_to_quantize=("MatMul",),
    )
    if lm_head is not None and recipe.lm_head_bits is not None:
        model = _quantizer(
            model,
            bits=recipe.lm_head_bits,
            block_size=recipe.block_size,
            accuracy_level=recipe.accuracy_level,
            is_symmetric=recipe.symmetric,
            nodes_to_include=[lm_head.name],
            op_types_to_quantize=("MatMul",),
        )
    if embedding is not None and recipe.embedding_bits is not None:
        model = _quantizer(
            model,
            bits=recipe.embedding_bits,
            block_size=recipe.block_size,
            is_symmetric=recipe.symmetric,
            nodes_to_include=[embedding.name],
            op_types_to_quantize=("Gather",),
            quant_axes=(("Gather", 1),),
        )
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in ("MatMulNBits", "GatherBlockQuantized", "MatMul", "Gather"):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    save_with_weights(model, target)
    return {"recipe": recipe.describe(), "untied": untied, "ops": counts, "lm_head": lm_head.name if lm_head else None}
