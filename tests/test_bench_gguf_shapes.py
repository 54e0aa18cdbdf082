"""bench/gguf_shapes.py, the benchmark-model maker: its files are what the appliance's GGUF
reader and llama.cpp both accept, its layouts follow llama-quantize's choices, and it rewrites
a file only when the recorded parameters change. Tiny shape only: seconds."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.export.llm.gguf_header import read_gguf_header
from appliance.export.llm.gguf_tokenizer import GGUF_TOKEN_TYPE_CONTROL, tokenizer_facts
from appliance.export.sources.gguf import check_tensor_types, config_from_header
from tests.helpers.bench_modules import load_bench_module

gguf = pytest.importorskip("gguf")


shapes = load_bench_module("gguf_shapes")


def test_published_shapes_have_the_published_parameter_counts() -> None:
    counts = {name: shape.parameters for name, shape in shapes.SHAPES.items()}
    assert round(counts["qwen2.5-0.5b"] / 1e6) == 494
    assert round(counts["qwen2.5-1.5b"] / 1e6) == 1544
    assert round(counts["llama3.2-1b"] / 1e6) == 1236


def test_q4_k_m_falls_back_like_llama_quantize_where_rows_are_not_multiples_of_256() -> None:
    shape = shapes.SHAPES["qwen2.5-0.5b"]
    counts: dict[str, int] = {}
    for name, dims, layer in shape.tensors():
        kind = shapes.tensor_type(shape, "Q4_K_M", name, dims, layer).name
        counts[kind] = counts.get(kind, 0) + 1
    # 896-wide rows cannot hold K-quant super-blocks: Q4_K -> Q5_0, Q6_K -> Q8_0 (as the
    # published Qwen2.5-0.5B-Instruct Q4_K_M file); ffn_down's 4,864-wide rows keep K-quants.
    assert counts == {"F32": 121, "Q8_0": 13, "Q5_0": 132, "Q4_K": 12, "Q6_K": 12}


def test_tiny_file_is_read_by_the_appliance_gguf_reader(tmp_path: Path) -> None:
    written = shapes.ensure_gguf("tiny", "Q4_K_M", tmp_path, log=False)
    header = read_gguf_header(written.path)
    check_tensor_types(header)
    config = config_from_header(header)
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (256, 2, 1024)
    facts = tokenizer_facts(header)
    assert (facts.tokenizer_model, facts.pre_tokenizer) == ("gpt2", "qwen2")
    assert facts.token(facts.bos_token_id) == "<|endoftext|>" and facts.token(facts.eos_token_id) == "<|im_end|>"
    assert not facts.add_bos_token
    assert facts.token_types[facts.tokens.index("<|im_start|>")] == GGUF_TOKEN_TYPE_CONTROL
    assert "<|im_start|>assistant" in (facts.chat_template or "")
    assert {t.type_name for t in header.tensors} == {"F32", "Q4_K", "Q6_K"}


def test_synthetic_vocabulary_is_a_valid_bpe_model(tmp_path: Path) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    tokens, merges = shapes.synthetic_bpe(2000, seed=0)
    assert len(set(tokens)) == len(tokens) == 2000
    vocab = {token: index for index, token in enumerate(tokens)}
    # tokenizers refuses a merge whose parts or result are missing from the vocabulary.
    model = tokenizers.models.BPE(vocab, [tuple(merge.split(" ")) for merge in merges])
    assert model.token_to_id(tokens[-1]) == 1999


def test_a_file_is_rewritten_only_when_its_parameters_change(tmp_path: Path) -> None:
    first = shapes.ensure_gguf("tiny", "Q4_0", tmp_path, log=False)
    again = shapes.ensure_gguf("tiny", "Q4_0", tmp_path, log=False)
    assert not first.cached and again.cached
    assert again.record["sha256"] == first.record["sha256"]
    other_seed = shapes.ensure_gguf("tiny", "Q4_0", tmp_path, seed=1, log=False)
    assert not other_seed.cached and other_seed.record["sha256"] != first.record["sha256"]


def test_llama3_shape_carries_llama_cpp_rope_factors(tmp_path: Path) -> None:
    written = shapes.ensure_gguf("tiny-llama3", "Q8_0", tmp_path, log=False)
    reader = gguf.GGUFReader(str(written.path))
    factors = next(t for t in reader.tensors if t.name == "rope_freqs.weight").data
    # Llama 3.2's scaling (factor 32, original 8,192): high frequencies kept, low divided by 32.
    assert factors[0] == 1.0 and factors[-1] == 32.0
    facts = tokenizer_facts(read_gguf_header(written.path))
    assert facts.pre_tokenizer == "llama-bpe" and facts.add_bos_token
    assert facts.token(facts.eos_token_id) == "<|eot_id|>"
