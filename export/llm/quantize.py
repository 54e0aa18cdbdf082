"""Weight-only quantisation of decoder graphs (MatMulNBits / GatherBlockQuantized).

Why weight-only: dynamic activation quantisation wrecks small decoders (SmolLM2-135M:
perplexity 29.2 -> 51 with quantize_dynamic), while 8-bit weight-only MatMulNBits costs about
0.5%. Why our own pass and not the model builder's: the builder's int8 graph does not load
('lm_head.MatMul.weight_Q4 is not a graph input') and its int4 defaults quantise the LM head
to 4 bits, which costs too much perplexity. So the builder writes fp32 and this module
quantises it, with the LM head and the (possibly tied) embedding as separate choices, because
they are the speed/size/quality trade the report must show.

A tied embedding appears in the graph as a Transpose of the LM head's weight (model builder
graphs from before gather_table.py; our builder route now stores the table in gather order
beside the weight) or the LM head as a Transpose of the embedding (Optimum). MatMulNBits needs
a constant weight, so constant Transposes of initializers are folded first ("untying"): both
users then own their weight and can be quantised independently; the tie itself is found by
comparing the two by value.

Never imports torch; never changes graph inputs or outputs.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from appliance.errors import ExportError
from appliance.export.llm.grid_exact import GridBlocks, encode_grid_exact, grid_exact_candidates
from appliance.export.llm.grid_search import search_grid
from appliance.export.llm.initializer_alias import alias_constant_reshapes
from appliance.export.onnx_tools import drop_unread_initializers

EXTERNAL_DATA_SUFFIX = ".data"
#: Tensors smaller than this stay inside model.onnx; larger ones go to the external file.
EXTERNAL_DATA_THRESHOLD_BYTES = 1024
#: The smallest block MatMulNBits takes: where no larger power of two divides K, blocks of
#: this size are padded.
SMALLEST_BLOCK_SIZE = 16


@dataclass(frozen=True)
class WeightOnlyRecipe:
    """How each group of weights is stored. None keeps a group in fp32."""

    bits: int
    block_size: int = 32
    #: Block size of the 8-bit MatMuls (8-bit weights, promoted MatMuls, the LM head); None:
    #: `block_size`. A MatMul whose K it does not divide gets the largest power of two down to
    #: `block_size` that does (a padded block would keep the embedding from being shared).
    eight_bit_block_size: int | None = None
    lm_head_bits: int | None = None
    embedding_bits: int | None = None
    #: Bits for the quantisation-sensitive MatMuls (None: same as `bits`). Which ones: the
    #: groups in `promoted_groups` of the layers `promoted_layers` picks (llama.cpp's mixed
    #: rule: first and last eighth of the layers and every third layer between).
    promoted_bits: int | None = None
    promoted_groups: tuple[str, ...] = ()
    promoted_layers: str = "mixed"
    #: For tied embeddings with an 8-bit LM head: read the embedding from the LM head's
    #: quantised weights (GatherBlockQuantized over the same bytes) instead of storing a copy.
    share_embedding: bool = False
    #: False: unsigned codes with a per-block zero point (uint8), which follows the asymmetric
    #: grid of GGUF Q4_1/Q4_K sources more closely than symmetric codes do.
    symmetric: bool = True
    #: 4 = int8 activations inside MatMulNBits (the fast CPU kernel; accuracy_level 0 ran
    #: 8-bit weights at 8.7 tok/s against 58 tok/s).
    accuracy_level: int = 4
    #: Store every layer MatMul on the 4-bit grid its fp32 weights already sit on (a Q4_0 or Q4_1 GGUF
    #: source) instead of rounding them again: see grid_exact.py. A weight off any such grid
    #: is an ExportError, not a silent fallback. The LM head and embedding follow the fields
    #: above.
    grid_exact: bool = False
    #: 4-bit MatMuls get their codes from a per-block scale search (grid_search.py) instead of
    #: ONNX Runtime's round-to-nearest: less weight error at the same bytes and speed.
    search_scales: bool = False
    #: With search_scales: each 4-bit block may also move its zero point (asymmetric codes), at
    #: the same bytes read and speed on the CPU kernel (grid_search.py says why).
    search_zero_points: bool = False

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ExportError(f"quant: weight bits must be 4 or 8, not {self.bits}", field="quant")
        if self.lm_head_bits not in (None, 4, 8):
            raise ExportError(f"quant: lm_head bits must be 4, 8 or fp32, not {self.lm_head_bits}", field="quant")
        if self.embedding_bits not in (None, 4):
            raise ExportError("quant: the embedding can be stored in 4 bits or fp32 only", field="quant")
        if self.promoted_bits not in (None, 4, 8):
            raise ExportError(f"quant: promoted bits must be 4 or 8, not {self.promoted_bits}", field="quant")
        if self.promoted_layers not in ("mixed", "all"):
            raise ExportError(f"quant: promoted layers must be 'mixed' or 'all', not {self.promoted_layers!r}", field="quant")
        if self.grid_exact and self.bits != 4:
            raise ExportError("quant: the exact grid encoding stores 4-bit codes only", field="quant")
        if self.search_scales and not self.symmetric:
            raise ExportError("quant: the scale search writes its own codes; ask for zero points with search_zero_points, not symmetric=False", field="quant")
        if self.search_zero_points and not self.search_scales:
            raise ExportError("quant: zero points are searched only with the scale search (search_scales)", field="quant")
        for field, size in (("block_size", self.block_size), ("eight_bit_block_size", self.eight_bit_block_size)):
            if size is not None and (size < SMALLEST_BLOCK_SIZE or size & (size - 1) or size > 256):
                raise ExportError(f"{field}: {size} must be a power of two between {SMALLEST_BLOCK_SIZE} and 256", field=field)

    def block_for(self, bits: int, k_dim: int) -> int:
        """The block size of one MatMul of `bits` bits whose weight has `k_dim` rows: the
        recipe's size for those bits, or the largest power of two below it that divides K (a
        padded block wastes bytes and keeps a tied embedding from reading the LM head's); a K
        that not even SMALLEST_BLOCK_SIZE divides gets that size, padded."""
        block = self.eight_bit_block_size if bits == 8 and self.eight_bit_block_size else self.block_size
        while block > SMALLEST_BLOCK_SIZE and k_dim % block:
            block //= 2
        return block

    def promoted_nodes(self, model: onnx.ModelProto, num_layers: int) -> list[str]:
        """Names of the MatMuls that get `promoted_bits` instead of `bits`."""
        if self.promoted_bits is None or not self.promoted_groups:
            return []
        layers = promoted_layer_indices(num_layers, self.promoted_layers)
        chosen: list[str] = []
        for node in model.graph.node:
            match = _LAYER_IN_NAME.search(node.name)
            if node.op_type == "MatMul" and match and int(match.group(1)) in layers:
                if any(f"/{group}/" in node.name for group in self.promoted_groups):
                    chosen.append(node.name)
        return chosen

    def describe(self) -> dict[str, Any]:
        return {key: ("fp32" if value is None else value) for key, value in asdict(self).items()}


_LAYER_IN_NAME = re.compile(r"layers\.(\d+)/")


def promoted_layer_indices(num_layers: int, rule: str) -> set[int]:
    """Layers whose sensitive MatMuls keep more bits: "all", or "mixed" = the first and last
    eighth of the layers and every third one between (llama.cpp's Q4_K_M placement)."""
    if rule == "all":
        return set(range(num_layers))
    eighth = num_layers / 8
    return {
        index
        for index in range(num_layers)
        if index < eighth or index >= 7 * eighth or (index - round(eighth)) % 3 == 2
    }


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
        drop_unread_initializers(graph)
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


def _is_tied(model: onnx.ModelProto, lm_head: onnx.NodeProto, embedding: onnx.NodeProto) -> bool:
    """True when the embedding table is exactly the transposed LM head weight."""
    initializers = {init.name: init for init in model.graph.initializer}
    head = initializers.get(lm_head.input[1])
    table = initializers.get(embedding.input[0])
    if head is None or table is None or list(head.dims) != list(reversed(table.dims)):
        return False
    return bool(np.array_equal(numpy_helper.to_array(head).T, numpy_helper.to_array(table)))


def share_embedding_with_lm_head(model: onnx.ModelProto, lm_head_output: str, embedding: onnx.NodeProto) -> None:
    """Replace the embedding Gather by a GatherBlockQuantized over the 8-bit LM head weights.

    MatMulNBits stores B as [N=vocab, blocks, block bytes] with per-block scales [N, blocks]:
    row v is token v's (tied) embedding, block-quantised along the hidden size, which is what
    GatherBlockQuantized reads (gather_axis 0, quantize_axis 1). Symmetric 8-bit codes carry an
    implicit zero point of 128, given explicitly here.
    """
    graph = model.graph
    head = next(node for node in graph.node if node.op_type == "MatMulNBits" and lm_head_output in node.output)
    attrs = {a.name: a.i for a in head.attribute}
    if attrs.get("bits") != 8 or len(head.input) > 3 and head.input[3]:
        raise ExportError("internal: embedding sharing needs a symmetric 8-bit LM head", field="quant")
    initializers = {init.name: init for init in graph.initializer}
    weight_dims = list(initializers[head.input[1]].dims)
    vocab, blocks = weight_dims[0], weight_dims[1]
    hidden = attrs["K"]
    prefix = embedding.name
    shape = numpy_helper.from_array(np.asarray([vocab, blocks * weight_dims[2]], dtype=np.int64), f"{prefix}/shared_shape")
    zero = numpy_helper.from_array(np.full((vocab, blocks), 128, dtype=np.uint8), f"{prefix}/shared_zero_points")
    graph.initializer.extend([shape, zero])
    reshape = onnx.helper.make_node("Reshape", [head.input[1], shape.name], [f"{prefix}/shared_weight"], name=f"{prefix}/SharedReshape")
    gather = onnx.helper.make_node(
        "GatherBlockQuantized",
        [reshape.output[0], embedding.input[1], head.input[2], zero.name],
        list(embedding.output),
        name=f"{prefix}/SharedGatherBlockQuantized",
        domain="com.microsoft",
        gather_axis=0,
        quantize_axis=1,
        block_size=attrs["block_size"],
        bits=8,
    )
    if blocks * attrs["block_size"] != hidden and weight_dims[2] * blocks != hidden:
        raise ExportError("internal: padded LM head blocks cannot be shared with the embedding", field="quant")
    old_table = embedding.input[0]
    nodes = list(graph.node)
    index = nodes.index(embedding)
    del graph.node[:]
    graph.node.extend([*nodes[:index], reshape, gather, *nodes[index + 1 :]])
    used = {name for node in graph.node for name in node.input}
    if old_table not in used:
        graph.initializer.remove(initializers[old_table])


def _quantize_only(model: onnx.ModelProto, names: list[str], op_type: str, **kwargs: Any) -> onnx.ModelProto:
    """Quantise exactly the `op_type` nodes in `names`.

    MatMulNBitsQuantizer's `nodes_to_include` does not restrict what it quantises (onnxruntime
    1.32: every eligible node is still taken), so everything else is excluded instead.
    """
    wanted = set(names)
    others = [node.name for node in model.graph.node if node.op_type == op_type and node.name not in wanted]
    return _quantizer(model, nodes_to_exclude=others, op_types_to_quantize=(op_type,), **kwargs)


def _quantizer(model: onnx.ModelProto, **kwargs: Any) -> onnx.ModelProto:
    import logging

    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    # It logs two INFO lines per node (thousands for an LLM); the report says what was done.
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)

    quantizer = MatMulNBitsQuantizer(model, **kwargs)
    quantizer.process()
    return quantizer.model.model


def _grid_exact_layers(model: onnx.ModelProto, recipe: WeightOnlyRecipe, lm_head: onnx.NodeProto | None) -> dict[str, GridBlocks]:
    """Every MatMul except the LM head, recovered on its 4-bit grid; ExportError naming how
    many are off-grid (the source was not a Q4_1-style 4-bit model)."""
    initializers = {init.name for init in model.graph.initializer}
    names = [
        node.name
        for node in model.graph.node
        if node.op_type == "MatMul" and node is not lm_head and node.input[1] in initializers
    ]
    grids = grid_exact_candidates(model, names, recipe.block_size)
    if not names or len(grids) != len(names):
        raise ExportError(
            f"quant: int4-exact needs weights that already sit on a 4-bit grid (a Q4_0 or Q4_1 GGUF source); "
            f"{len(names) - len(grids)} of {len(names)} MatMuls do not in blocks of {recipe.block_size}, so use int4",
            field="quant",
        )
    return grids


def _matmul_plan(
    model: onnx.ModelProto,
    recipe: WeightOnlyRecipe,
    lm_head: onnx.NodeProto | None,
    promoted: set[str],
    grid_exact: set[str],
) -> dict[tuple[int, int], list[str]]:
    """The MatMuls with a constant weight to quantise, grouped by (bits, block size): the LM
    head at `lm_head_bits`, promoted ones at `promoted_bits`, the rest at `bits`; grid-exact
    MatMuls and groups kept in fp32 are left out."""
    initializers = {init.name: init for init in model.graph.initializer}
    plan: dict[tuple[int, int], list[str]] = {}
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.name in grid_exact or node.input[1] not in initializers:
            continue
        if lm_head is not None and node.name == lm_head.name:
            bits = recipe.lm_head_bits
        elif node.name in promoted:
            bits = recipe.promoted_bits
        else:
            bits = recipe.bits
        if bits is None:
            continue
        k_dim = int(initializers[node.input[1]].dims[0])
        plan.setdefault((bits, recipe.block_for(bits, k_dim)), []).append(node.name)
    return plan


def _searched_grids(model: onnx.ModelProto, names: list[str], block_size: int, *, zero_points: bool) -> dict[str, GridBlocks]:
    """4-bit grids of the named MatMuls' weights by grid_search.search_grid; a weight whose K
    the block does not divide is left out (ONNX Runtime's quantiser pads it)."""
    initializers = {init.name: init for init in model.graph.initializer}
    wanted = set(names)
    weights = {node.name: initializers[node.input[1]] for node in model.graph.node if node.name in wanted}
    return {
        name: search_grid(numpy_helper.to_array(weight), block_size, zero_points=zero_points)
        for name, weight in weights.items()
        if weight.dims[0] % block_size == 0
    }


def quantize_weight_only(source: Path, target: Path, recipe: WeightOnlyRecipe) -> dict[str, Any]:
    """Write `source` quantised by `recipe` to `target`; returns what was done (report)."""
    model = load_with_weights(source)
    _ensure_node_names(model.graph)
    # Untie only when the LM head or the embedding is quantised: kept in fp32, the tied
    # weight stays as the reference holds it.
    quantises_tie = bool(recipe.lm_head_bits or recipe.embedding_bits)
    untied = fold_constant_transposes(model) if quantises_tie else []
    lm_head = find_lm_head(model)
    embedding = find_embedding(model)
    num_layers = len({int(m.group(1)) for node in model.graph.node if (m := _LAYER_IN_NAME.search(node.name))})
    promoted = recipe.promoted_nodes(model, num_layers)
    # Compared by value: the builder's reference stores a tied table in gather order beside the
    # LM head weight (gather_table.py), with no Transpose left to say they are one tensor.
    tied = quantises_tie and lm_head is not None and embedding is not None and _is_tied(model, lm_head, embedding)
    grids = _grid_exact_layers(model, recipe, lm_head) if recipe.grid_exact else {}
    plan = _matmul_plan(model, recipe, lm_head, set(promoted), set(grids))
    searched = 0
    for (bits, block_size), names in sorted(plan.items()):
        if bits == 4 and recipe.search_scales:
            searched_grids = _searched_grids(model, names, block_size, zero_points=recipe.search_zero_points)
            searched += encode_grid_exact(model, searched_grids, block_size)
            names = [name for name in names if name not in searched_grids]
            if not names:
                continue
        model = _quantize_only(
            model,
            names,
            "MatMul",
            bits=bits,
            block_size=block_size,
            accuracy_level=recipe.accuracy_level,
            is_symmetric=recipe.symmetric,
        )
    lm_head_output = lm_head.output[0] if lm_head is not None else ""
    if recipe.share_embedding and tied and recipe.lm_head_bits == 8 and embedding is not None:
        share_embedding_with_lm_head(model, lm_head_output, embedding)
        embedding = None
    if embedding is not None and recipe.embedding_bits is not None:
        model = _quantize_only(
            model,
            [embedding.name],
            "Gather",
            bits=recipe.embedding_bits,
            block_size=recipe.block_size,
            is_symmetric=recipe.symmetric,
            quant_axes=(("Gather", 1),),
        )
    if grids:
        encode_grid_exact(model, grids, recipe.block_size)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in ("MatMulNBits", "GatherBlockQuantized", "MatMul", "Gather"):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    save_with_weights(model, target)
    alias_constant_reshapes(target)  # the shared embedding's table: the LM head's bytes, not a copy
    return {
        "recipe": recipe.describe(),
        "untied": untied,
        "ops": counts,
        "lm_head": lm_head.name if lm_head else None,
        "promoted_matmuls": 0 if grids else len(promoted),
        "blocks": {f"{bits}-bit/{block_size}": len(names) for (bits, block_size), names in sorted(plan.items())},
        "grid_exact_matmuls": len(grids),
        "scale_searched_matmuls": searched,
        "embedding_shared_with_lm_head": bool(recipe.share_embedding and tied and recipe.lm_head_bits == 8),
    }
