"""Tiny real ONNX models for runtime and API tests, built with onnx.helper and published
through ModelRepository.publish exactly as the export stage does.

- `publish_adder`: FP32 INPUT0 + INPUT1 -> OUTPUT0 (sum), OUTPUT1 (difference), batch dim -1.
- `publish_identity`: one Identity per datatype (FP32, FP16, INT64, INT32, INT8, UINT8, BOOL, BYTES).
- `publish_embedder`: input_ids/attention_mask -> masked mean pooling -> L2 norm ->
  `sentence_embedding`, plus `token_embeddings`; with a WordLevel tokenizer.json.
- `publish_heavy`: a stack of MatMuls slow enough to fill a queue (for 429/504 tests).
Only tests import this module.
"""

from __future__ import annotations

import zlib

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from appliance.repository.manifest import EmbeddingSpec, Manifest, Report, SourceInfo, TensorSpec, TokenizerSpec
from appliance.repository.store import ModelRepository, ModelVersion

OPSET = 17
EMBED_DIM = 8
EMBED_WORDS = ["hello", "world", "cat", "dog", "sat", "on", "the", "mat", "blue", "sky", "red", "car", "fast", "slow"]
EMBED_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
EMBED_MAX_LENGTH = 16
IDENTITY_TYPES = {
    "FP32": TensorProto.FLOAT,
    "FP16": TensorProto.FLOAT16,
    "INT64": TensorProto.INT64,
    "INT32": TensorProto.INT32,
    "INT8": TensorProto.INT8,
    "UINT8": TensorProto.UINT8,
    "BOOL": TensorProto.BOOL,
    "BYTES": TensorProto.STRING,
}


def _save(model: onnx.ModelProto, folder: Path) -> None:
    model.opset_import[0].version = OPSET
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(folder / "model.onnx"))


def _manifest(name: str, inputs: list[TensorSpec], outputs: list[TensorSpec], **extra: object) -> Manifest:
    return Manifest(
        name=name,
        version=1,
        task=extra.pop("task", "tensor"),  # type: ignore[arg-type]
        source=SourceInfo(kind="onnx", uri=f"tests:{name}", sha256="0" * 64),
        created_at=datetime.now(UTC).isoformat(),
        opset=OPSET,
        quantization="fp32",
        inputs=inputs,
        outputs=outputs,
        **extra,  # type: ignore[arg-type]
    )


def _report() -> Report:
    return Report(variant="fp32", size_bytes=1, load_s=0.0, verdict="accepted")


def publish_adder(repo: ModelRepository, name: str = "adder", *, max_batch_size: int = 32) -> ModelVersion:
    staged = repo.staging_dir()
    x = helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("INPUT1", TensorProto.FLOAT, ["batch", 4])
    s = helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", 4])
    d = helper.make_tensor_value_info("OUTPUT1", TensorProto.FLOAT, ["batch", 4])
    graph = helper.make_graph(
        [helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]), helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"])],
        "adder",
        [x, y],
        [s, d],
    )
    _save(helper.make_model(graph), staged)
    specs = [TensorSpec(name=n, datatype="FP32", shape=[-1, 4]) for n in ("INPUT0", "INPUT1")]
    outs = [TensorSpec(name=n, datatype="FP32", shape=[-1, 4]) for n in ("OUTPUT0", "OUTPUT1")]
    return repo.publish(staged, _manifest(name, specs, outs, max_batch_size=max_batch_size), _report())


def publish_identity(repo: ModelRepository, name: str = "identity") -> ModelVersion:
    staged = repo.staging_dir()
    inputs, outputs, nodes, in_specs, out_specs = [], [], [], [], []
    for kserve, onnx_type in IDENTITY_TYPES.items():
        inputs.append(helper.make_tensor_value_info(f"IN_{kserve}", onnx_type, ["batch", 2]))
        outputs.append(helper.make_tensor_value_info(f"OUT_{kserve}", onnx_type, ["batch", 2]))
        nodes.append(helper.make_node("Identity", [f"IN_{kserve}"], [f"OUT_{kserve}"]))
        in_specs.append(TensorSpec(name=f"IN_{kserve}", datatype=kserve, shape=[-1, 2]))  # type: ignore[arg-type]
        out_specs.append(TensorSpec(name=f"OUT_{kserve}", datatype=kserve, shape=[-1, 2]))  # type: ignore[arg-type]
    _save(helper.make_model(helper.make_graph(nodes, "identity", inputs, outputs)), staged)
    return repo.publish(staged, _manifest(name, in_specs, out_specs), _report())


def embedder_table(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((len(EMBED_SPECIALS) + len(EMBED_WORDS), EMBED_DIM)).astype(np.float32)


def embed_reference(table: np.ndarray, ids: list[int]) -> np.ndarray:
    """numpy reference of the tiny graph: mean of the token vectors, L2-normalised."""
    mean = table[ids].mean(axis=0)
    return mean / max(float(np.linalg.norm(mean)), 1e-12)


def write_tokenizer(path: Path) -> Tokenizer:
    vocab = {token: i for i, token in enumerate(EMBED_SPECIALS + EMBED_WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.add_special_tokens(EMBED_SPECIALS)
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    tokenizer.save(str(path))
    return tokenizer


def publish_embedder(
    repo: ModelRepository, name: str = "tiny-embed", *, min_dimensions: int | None = 4, max_length: int = EMBED_MAX_LENGTH
) -> ModelVersion:
    staged = repo.staging_dir()
    table = embedder_table()
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])
    out = helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["batch", EMBED_DIM])
    tokens = helper.make_tensor_value_info("token_embeddings", TensorProto.FLOAT, ["batch", "seq", EMBED_DIM])
    inits = [
        numpy_helper.from_array(table, "table"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
        numpy_helper.from_array(np.array([2], dtype=np.int64), "axis2"),
        numpy_helper.from_array(np.array(1e-9, dtype=np.float32), "eps"),
    ]
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["token_embeddings"]),
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask_f", "axis2"], ["mask_e"]),
        helper.make_node("Mul", ["token_embeddings", "mask_e"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axis1"], ["summed"], keepdims=0),
        helper.make_node("ReduceSum", ["mask_e", "axis1"], ["count"], keepdims=0),
        helper.make_node("Max", ["count", "eps"], ["count_safe"]),
        helper.make_node("Div", ["summed", "count_safe"], ["mean"]),
        helper.make_node("Mul", ["mean", "mean"], ["squares"]),
        helper.make_node("ReduceSum", ["squares", "axis1"], ["sq_sum"], keepdims=1),
        helper.make_node("Sqrt", ["sq_sum"], ["norm"]),
        helper.make_node("Max", ["norm", "eps"], ["norm_safe"]),
        helper.make_node("Div", ["mean", "norm_safe"], ["sentence_embedding"]),
    ]
    graph = helper.make_graph(nodes, "tiny-embed", [ids, mask], [out, tokens], initializer=inits)
    _save(helper.make_model(graph), staged)
    write_tokenizer(staged / "tokenizer.json")
    manifest = _manifest(
        name,
        [TensorSpec(name="input_ids", datatype="INT64", shape=[-1, -1]), TensorSpec(name="attention_mask", datatype="INT64", shape=[-1, -1])],
        [
            TensorSpec(name="sentence_embedding", datatype="FP32", shape=[-1, EMBED_DIM]),
            TensorSpec(name="token_embeddings", datatype="FP32", shape=[-1, -1, EMBED_DIM]),
        ],
        task="feature-extraction",
        tokenizer=TokenizerSpec(max_length=max_length, pad_token="[PAD]", pad_token_id=0),
        embedding=EmbeddingSpec(dimension=EMBED_DIM, min_dimensions=min_dimensions),
    )
    return repo.publish(staged, manifest, _report())


def publish_heavy(repo: ModelRepository, name: str = "heavy", *, width: int = 1024, layers: int = 8) -> ModelVersion:
    """Each row costs width^2 * layers multiply-adds: slow enough to queue up requests."""
    staged = repo.staging_dir()
    rng = np.random.default_rng(1)
    weight = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
    nodes, previous = [], "X"
    for layer in range(layers):
        nodes.append(helper.make_node("MatMul", [previous, "W"], [f"h{layer}"]))
        previous = f"h{layer}"
    nodes.append(helper.make_node("Identity", [previous], ["Y"]))
    graph = helper.make_graph(
        nodes,
        "heavy",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", width])],
        initializer=[numpy_helper.from_array(weight, "W")],
    )
    _save(helper.make_model(graph), staged)
    spec = [TensorSpec(name="X", datatype="FP32", shape=[-1, width])]
    return repo.publish(staged, _manifest(name, spec, [TensorSpec(name="Y", datatype="FP32", shape=[-1, width])]), _report())


def publish_weighty(repo: ModelRepository, name: str, *, megabytes: int = 24, width: int = 512) -> ModelVersion:
    """A chain of distinct `width`-square MatMuls holding about `megabytes` of weights: cheap
    to run, but with a resident cost the memory budget can see."""
    staged = repo.staging_dir()
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    layers = max(1, megabytes * (1 << 20) // (width * width * 4))
    nodes, initializers, previous = [], [], "X"
    for layer in range(layers):
        weight = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        initializers.append(numpy_helper.from_array(weight, f"W{layer}"))
        nodes.append(helper.make_node("MatMul", [previous, f"W{layer}"], [f"h{layer}"]))
        previous = f"h{layer}"
    nodes.append(helper.make_node("Identity", [previous], ["Y"]))
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", width])],
        initializer=initializers,
    )
    _save(helper.make_model(graph), staged)
    spec = [TensorSpec(name="X", datatype="FP32", shape=[-1, width])]
    return repo.publish(staged, _manifest(name, spec, [TensorSpec(name="Y", datatype="FP32", shape=[-1, width])]), _report())
