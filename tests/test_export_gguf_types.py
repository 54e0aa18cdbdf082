"""GGUF tensor types the export reads: each common file type written as a tiny GGUF with the
`gguf` package, exported, and its fp32 graph checked against PyTorch on the same dequantised
weights; int4 and int4-exact on the 4-bit ones; unsupported types refused by name.

The tiny Llama here has hidden size 256 and MLP width 512 (untied head), so every 2-D weight
can take a K-quant (K-quants pack 256 weights per super-block). Weights of the types gguf-py
can quantise (F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) are the model's own, quantised by
`gguf.quants.quantize`. gguf-py 0.19 has no K-quant encoder, so Q2_K..Q6_K blocks are
constructed: random bytes for the codes and packed sub-block scales (every byte pattern is a
valid block) and chosen fp16 super-block scales, giving weights of the model's magnitude. The
reference weights are always `gguf.quants.dequantize` of the bytes in the file, read back with
`gguf.GGUFReader`, so the PyTorch model below owes nothing to the export's own loader.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers.decoders import make_tiny_llama, write_tiny_gguf
from typer.testing import CliRunner

from appliance.cli import app
from appliance.config import Settings, load_settings
from appliance.errors import ExportError
from appliance.export.llm.onnx_decoder import OnnxDecoder
from appliance.export.pipeline import ExportRequest, run_export
from appliance.export.sources import resolve
from appliance.export.sources.gguf import SUPPORTED_GGML_TYPES
from appliance.repository import ModelRepository, ModelVersion

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType

HIDDEN = 256
INTERMEDIATE = 512
#: Token-id prompts (vocabulary 320) and continuation length of the PyTorch comparison.
PROMPTS = [[5, 17, 42, 99, 150, 7], [33, 64, 128, 250, 12, 9, 81, 77], [200, 201, 202]]
NEW_TOKENS = 16
#: A step where PyTorch's top-2 logits are this close may pick either (a near tie, not a bug).
NEAR_TIE = 0.01
#: Largest |ONNX - PyTorch| logit: the logits reach ~15 at hidden 256 and fp32 kernels differ
#: by ~1e-4 of that (0.0015 measured); a wrongly read block moves them by whole units.
LOGITS_TOLERANCE = 0.01

#: Per file type: the GGML type of the 2-D weights, and overrides by GGUF name suffix, after
#: llama.cpp's choices (the K_M mixes keep attn_v / ffn_down / output in more bits).
LAYOUTS: dict[str, tuple[object, dict[str, object]]] = {
    "F16": (T.F16, {}),
    "BF16": (T.BF16, {}),
    "Q8_0": (T.Q8_0, {}),
    "Q4_0": (T.Q4_0, {"output.weight": T.Q6_K}),
    "Q4_1": (T.Q4_1, {"output.weight": T.Q6_K}),
    "Q5_0": (T.Q5_0, {"output.weight": T.Q6_K}),
    "Q5_1": (T.Q5_1, {"output.weight": T.Q6_K}),
    "Q4_K_M": (T.Q4_K, {"attn_v.weight": T.Q6_K, "ffn_down.weight": T.Q6_K, "output.weight": T.Q6_K}),
    "Q5_K_M": (T.Q5_K, {"attn_v.weight": T.Q6_K, "ffn_down.weight": T.Q6_K, "output.weight": T.Q6_K}),
    "Q6_K": (T.Q6_K, {}),
    "Q3_K_M": (T.Q3_K, {"attn_v.weight": T.Q5_K, "ffn_down.weight": T.Q4_K, "output.weight": T.Q6_K}),
    "Q2_K": (T.Q2_K, {"attn_v.weight": T.Q3_K, "ffn_down.weight": T.Q3_K, "output.weight": T.Q6_K}),
}
FILE_TYPES = {"F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16"}

#: K-quant blocks: byte offset -> fp16 value of the super-block scale (d) and, where the type
#: has one, the scale of the sub-block minimums (dmin), chosen (measured on random blocks) so
#: the weights have std ~0.2 and a mean near 0, like the tiny model's own weights.
K_QUANT_SCALES: dict[object, dict[int, float]] = {
    T.Q2_K: {80: 0.012, 82: 0.018},
    T.Q3_K: {108: 0.0046},
    T.Q4_K: {0: 0.001, 2: 0.007},
    T.Q5_K: {0: 0.0005, 2: 0.0074},
    T.Q6_K: {208: 0.00015},
}

#: write_tiny_gguf's names, reversed: GGUF tensor name -> Hugging Face name.
_GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    **{
        f"blk.{layer}.{gguf_name}": f"model.layers.{layer}.{hf_name}"
        for layer in range(2)
        for gguf_name, hf_name in {
            "attn_q.weight": "self_attn.q_proj.weight",
            "attn_k.weight": "self_attn.k_proj.weight",
            "attn_v.weight": "self_attn.v_proj.weight",
            "attn_output.weight": "self_attn.o_proj.weight",
            "ffn_gate.weight": "mlp.gate_proj.weight",
            "ffn_up.weight": "mlp.up_proj.weight",
            "ffn_down.weight": "mlp.down_proj.weight",
            "attn_norm.weight": "input_layernorm.weight",
            "ffn_norm.weight": "post_attention_layernorm.weight",
        }.items()
    },
}


def encode(data: np.ndarray, kind: object) -> np.ndarray:
    """The tensor's blocks: gguf-py's quantiser where it has one, else constructed K-quant blocks
    (random codes and sub-block scales seeded by the tensor, fixed fp16 super-block scales)."""
    if kind not in K_QUANT_SCALES:
        return gguf.quants.quantize(data, kind)
    block, size = gguf.GGML_QUANT_SIZES[kind]
    rows, cols = data.shape
    rng = np.random.default_rng(zlib.crc32(data.tobytes()))
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    for offset, value in K_QUANT_SCALES[kind].items():
        raw[..., offset : offset + 2] = np.frombuffer(np.float16(value).tobytes(), dtype=np.uint8)
    return raw.reshape(rows, -1)


def write_gguf(hf_folder: Path, path: Path, layout: str) -> Path:
    default, overrides = LAYOUTS[layout]

    def tensor_type(name: str, data: np.ndarray) -> object:
        if data.ndim != 2:
            return None  # norms stay F32, as llama.cpp keeps them
        return next((kind for suffix, kind in overrides.items() if name == suffix or name.endswith(f".{suffix}")), default)

    file_type = getattr(gguf.LlamaFileType, FILE_TYPES.get(layout, f"MOSTLY_{layout}"))
    return write_tiny_gguf(hf_folder, path, tensor_type=tensor_type, encode=encode, file_type=file_type)


def _unpermute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's interleaved Q/K rows back to Hugging Face's rotary layout."""
    rows = weight.shape[0]
    return weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def reference_model(hf_folder: Path, gguf_path: Path):  # noqa: ANN201 - LlamaForCausalLM
    """The tiny Llama with the GGUF's weights as `gguf.quants.dequantize` reads them."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(hf_folder)
    state = {}
    for tensor in gguf.GGUFReader(str(gguf_path)).tensors:
        weight = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        weight = weight.reshape([int(dim) for dim in reversed(tensor.shape)])
        if tensor.name.endswith("attn_q.weight"):
            weight = _unpermute(weight, config.num_attention_heads)
        elif tensor.name.endswith("attn_k.weight"):
            weight = _unpermute(weight, config.num_key_value_heads)
        state[_GGUF_TO_HF[tensor.name]] = torch.from_numpy(np.array(weight, copy=True))
    model = LlamaForCausalLM(config).eval()
    model.load_state_dict(state, strict=True)
    return model


def torch_greedy(model, prompt: list[int]) -> tuple[list[int], list[float]]:  # noqa: ANN001
    """Greedy tokens (full recompute each step) and each step's top-2 logit margin."""
    import torch

    ids = list(prompt)
    margins: list[float] = []
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            logits = model(torch.tensor([ids])).logits[0, -1]
            top = torch.topk(logits, 2).values
            margins.append(float(top[0] - top[1]))
            ids.append(int(logits.argmax()))
    return ids[len(prompt) :], margins


def assert_continues_as_pytorch(version: ModelVersion, model) -> None:  # noqa: ANN001
    import torch

    assert version.manifest.generation is not None
    decoder = OnnxDecoder(version.model_path, version.manifest.generation)
    for prompt in PROMPTS:
        with torch.no_grad():
            expected_logits = model(torch.tensor([prompt])).logits[0].numpy()
        assert np.abs(decoder.logits(prompt) - expected_logits).max() < LOGITS_TOLERANCE
        expected, margins = torch_greedy(model, prompt)
        got = decoder.greedy(prompt, NEW_TOKENS)
        for step, (want, have) in enumerate(zip(expected, got, strict=True)):
            if want != have:
                # Only a near tie may differ; after it the continuations part ways.
                assert margins[step] < NEAR_TIE, (prompt, step, expected, got)
                break


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """make_tiny_llama's tokenizer and config, widened to hidden 256 / MLP 512, head untied."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = make_tiny_llama(tmp_path_factory.mktemp("gguf-types") / "llama", tie_embeddings=False)
    config = LlamaConfig.from_pretrained(folder)
    config.hidden_size, config.intermediate_size, config.head_dim = HIDDEN, INTERMEDIATE, HIDDEN // 4
    torch.manual_seed(0)
    LlamaForCausalLM(config).eval().save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return load_settings(state_dir=tmp_path_factory.mktemp("state"))


@pytest.fixture(scope="module")
def gguf_files(hf_folder: Path) -> dict[str, Path]:
    return {layout: write_gguf(hf_folder, hf_folder.parent / f"tiny-{layout}.gguf", layout) for layout in LAYOUTS}


# -- every supported type ------------------------------------------------------------------


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_file_type_exports_at_fp32_and_continues_as_pytorch_on_its_dequantised_weights(
    layout: str, hf_folder: Path, gguf_files: dict[str, Path], settings: Settings
) -> None:
    path = gguf_files[layout]
    source = resolve(str(path))
    default, overrides = LAYOUTS[layout]
    expected_types = {default.name, *(kind.name for kind in overrides.values())}  # type: ignore[attr-defined]
    assert set(source.details["gguf_tensor_types"]) == expected_types | {"F32"}
    version = run_export(ExportRequest(source=str(path), name=f"tiny-{layout.lower()}", quant="fp32"), settings).version
    assert version.report is not None and version.report.verdict == "accepted"
    assert version.report.quality["logits_max_abs_diff"] < LOGITS_TOLERANCE
    assert_continues_as_pytorch(version, reference_model(hf_folder, path))


def test_the_constructed_k_quant_blocks_have_the_models_magnitude(gguf_files: dict[str, Path]) -> None:
    for layout in ("Q4_K_M", "Q5_K_M", "Q6_K", "Q3_K_M", "Q2_K"):
        for tensor in gguf.GGUFReader(str(gguf_files[layout])).tensors:
            if tensor.tensor_type in K_QUANT_SCALES:
                weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
                assert 0.1 < float(weight.std()) < 0.4, (layout, tensor.name)
                assert abs(float(weight.mean())) < 0.1, (layout, tensor.name)


# -- re-quantised or kept ------------------------------------------------------------------


def test_a_q4_k_m_gguf_is_requantised_to_int4(gguf_files: dict[str, Path], settings: Settings) -> None:
    version = run_export(ExportRequest(source=str(gguf_files["Q4_K_M"]), name="tiny-q4km-int4", quant="int4"), settings).version
    assert version.manifest.quantization == "int4"
    assert version.report is not None and version.report.details["ops"]["MatMulNBits"] >= 1
    assert version.manifest.generation is not None
    tokens = OnnxDecoder(version.model_path, version.manifest.generation).greedy(PROMPTS[0], 8)
    assert len(tokens) == 8 and all(0 <= token < 320 for token in tokens)


def test_a_q4_0_gguf_keeps_its_own_grid_as_int4_exact(gguf_files: dict[str, Path], settings: Settings) -> None:
    version = run_export(ExportRequest(source=str(gguf_files["Q4_0"]), name="tiny-q4_0-exact", quant="int4-exact"), settings).version
    report = version.report
    assert report is not None and report.variant == "int4-exact"
    # Two layers, five weight MatMuls each (fused qkv, o, gate, up, down), all on the Q4_0 grid.
    assert report.details["grid_exact_matmuls"] == 10
    assert report.verdict == "accepted" and report.budget["loss"] <= 0.02
    # A Q4_0 block is MatMulNBits' symmetric form: one MatMulNBits per weight, no block sums,
    # no zero points.
    ops = report.details["ops"]
    assert "ReduceSum" not in ops, ops
    graph = onnx.load(str(version.model_path), load_external_data=False).graph
    nbits = [node for node in graph.node if node.op_type == "MatMulNBits" and node.name.startswith("/model/layers.")]
    assert len(nbits) == 10 and all(len(node.input) == 3 for node in nbits), [list(node.input) for node in nbits]


def test_a_q4_0_matrix_becomes_one_matmulnbits_without_zero_points() -> None:
    """Blocks whose largest magnitude is positive (a negative scale) and negative, an all-zero
    block (scale 0), and an odd number of blocks per row."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from appliance.export.llm.grid_exact import encode_grid_exact, grid_exact_candidates

    rng = np.random.default_rng(5)
    rows = rng.standard_normal((40, 96)).astype(np.float32)  # [out, in]: 3 blocks per row
    rows[:20, ::32] = 5.0
    rows[20:, ::32] = -5.0
    rows[7, 32:64] = 0.0
    weight = np.ascontiguousarray(gguf.quants.dequantize(gguf.quants.quantize(rows, T.Q4_0), T.Q4_0).T)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, None, 96])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    grids = grid_exact_candidates(model, ["proj"], 32)
    assert grids["proj"].is_symmetric()
    assert encode_grid_exact(model, grids, 32) == 1
    assert [node.op_type for node in model.graph.node] == ["MatMulNBits"]
    assert len(model.graph.node[0].input) == 3, "no zero-point input: every block's is the default 8"
    x = rng.standard_normal((1, 4, 96)).astype(np.float32)
    (got,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    expected = x @ weight
    # accuracy_level 4 rounds the activations to int8 inside MatMulNBits: close, not bit-equal.
    assert np.abs(got - expected).max() <= 0.01 * np.abs(expected).max()


def test_a_q4_0_weight_is_recovered_exactly_whichever_sign_its_largest_value_has() -> None:
    from appliance.export.llm.grid_exact import recover_grid

    rng = np.random.default_rng(4)
    rows = rng.standard_normal((48, 64)).astype(np.float32)  # [out, in], as GGUF stores it
    rows[:24, ::32] = 5.0  # half the blocks' largest magnitude positive (negative scale) ...
    rows[24:, ::32] = -5.0  # ... half negative
    dequantised = gguf.quants.dequantize(gguf.quants.quantize(rows, T.Q4_0), T.Q4_0)
    grid = recover_grid(np.ascontiguousarray(dequantised.T), 32)
    assert grid is not None and grid.is_symmetric()
    assert (grid.scales[:24] < 0).all() and (grid.scales[24:] > 0).all(), "the largest value takes code 0"
    rebuilt = (grid.codes * grid.scales[..., None] + grid.mins[..., None]).reshape(dequantised.shape)
    np.testing.assert_array_equal(rebuilt.astype(np.float32), dequantised)


@pytest.mark.parametrize("layout", ["Q4_K_M", "Q8_0"])
def test_int4_exact_refuses_a_gguf_whose_layer_weights_are_not_q4_0_or_q4_1_naming_their_types(
    layout: str, gguf_files: dict[str, Path], tmp_path: Path
) -> None:
    settings = load_settings(state_dir=tmp_path)
    with pytest.raises(ExportError) as caught:
        run_export(ExportRequest(source=str(gguf_files[layout]), name="x", quant="int4-exact"), settings)
    message = str(caught.value)
    assert caught.value.field == "quant" and "\n" not in message
    default, overrides = LAYOUTS[layout]
    for kind in {default, overrides.get("attn_v.weight", default)}:
        assert kind.name in message  # type: ignore[attr-defined]
    assert "Q4_0 or Q4_1" in message and "use int4" in message
    assert ModelRepository(settings.models_dir).names() == []


# -- refused ---------------------------------------------------------------------------------


def _gguf_with_raw_tensor(path: Path, kind: object) -> Path:
    """A header-valid llama GGUF whose only tensor is one block row of `kind` (random bytes)."""
    block, size = gguf.GGML_QUANT_SIZES[kind]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_embedding_length(block)
    writer.add_head_count(1)
    raw = np.random.default_rng(0).integers(0, 256, size=(4, size), dtype=np.uint8)
    writer.add_tensor("blk.0.attn_q.weight", raw, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("kind", ["IQ2_XXS", "TQ1_0", "IQ4_XS", "MXFP4"])
def test_an_unsupported_tensor_type_is_refused_by_name_listing_the_supported_ones(kind: str, tmp_path: Path) -> None:
    path = _gguf_with_raw_tensor(tmp_path / f"model-{kind}.gguf", T[kind])
    with pytest.raises(ExportError) as caught:
        resolve(str(path))
    message = str(caught.value)
    assert caught.value.field == "source" and "\n" not in message
    assert f"GGML type {kind} ('blk.0.attn_q.weight')" in message
    assert "supported: " + ", ".join(SUPPORTED_GGML_TYPES) in message


def test_the_cli_refuses_an_unsupported_type_with_one_line_and_a_nonzero_exit(tmp_path: Path) -> None:
    path = _gguf_with_raw_tensor(tmp_path / "iq2.gguf", T.IQ2_XXS)
    result = CliRunner().invoke(app, ["export", str(path), "--name", "iq2", "--state-dir", str(tmp_path / "state")])
    assert result.exit_code != 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "IQ2_XXS" in lines[0] and "Q4_K" in lines[0], result.stderr
    assert "Traceback" not in result.output
    assert ModelRepository(load_settings(state_dir=tmp_path / "state").models_dir).names() == []


def test_every_supported_type_is_covered_by_a_file_type_above() -> None:
    covered = {"F32"} | {kind.name for default, overrides in LAYOUTS.values() for kind in (default, *overrides.values())}  # type: ignore[attr-defined]
    assert covered == set(SUPPORTED_GGML_TYPES)
