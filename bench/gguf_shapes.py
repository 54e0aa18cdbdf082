"""Benchmark models: GGUF files with seeded random weights in the exact shapes users run.

Speed does not depend on trained weights, so the size benchmarks (bench/llm_sizes_vs_llamacpp.py,
issue 18) run on files written here instead of downloads: the tensor shapes, GGML types,
hyper-parameters and tokenizer layout of the published models, the weights drawn from a seeded
generator. Both sides read the same file: llama.cpp directly, the appliance through
`appliance export FILE.gguf`.

Must never be imported by the appliance (a bench tool, not a runtime dependency), never
download anything, and never hold a whole model in memory: tensors are drawn, quantised and
written one at a time (row chunks for the large ones), so a 1.5B file needs a few hundred MB.

Shapes (from each model's published config.json; `--list` prints them):

| shape          | copies                          | arch  | hidden | layers | heads / KV | head_dim | MLP   | vocab   | context | rope theta | rms eps | notes |
| ---            | ---                             | ---   | ---    | ---    | ---        | ---      | ---   | ---     | ---     | ---        | ---     | ---   |
| qwen2.5-0.5b   | Qwen/Qwen2.5-0.5B-Instruct      | qwen2 | 896    | 24     | 14 / 2     | 64       | 4864  | 151,936 | 32,768  | 1e6        | 1e-6    | tied, q/k/v biases |
| qwen2.5-1.5b   | Qwen/Qwen2.5-1.5B-Instruct      | qwen2 | 1536   | 28     | 12 / 2     | 128      | 8960  | 151,936 | 32,768  | 1e6        | 1e-6    | tied, q/k/v biases |
| llama3.2-1b    | meta-llama/Llama-3.2-1B-Instruct | llama | 2048  | 16     | 32 / 8     | 64       | 8192  | 128,256 | 131,072 | 500,000    | 1e-5    | tied; Llama 3 rope scaling (factor 32, low 1, high 4, original 8,192) as llama.cpp's `rope_freqs.weight` |
| tiny           | (smoke tests)                   | qwen2 | 256    | 2      | 4 / 2      | 64       | 512   | 1,024   | 4,096   | 1e6        | 1e-6    | Qwen2.5's layout scaled down |
| tiny-llama3    | (smoke tests)                   | llama | 256    | 2      | 4 / 2      | 64       | 512   | 1,024   | 4,096   | 500,000    | 1e-5    | Llama 3.2's layout scaled down |

Parameters: 0.5B 494 M (136 M of them the tied embedding), 1.5B 1.54 G (233 M), Llama-3.2-1B
1.24 G (263 M).

Tokenizer (what llama.cpp and the appliance's GGUF reader both accept): a synthetic byte-level
BPE vocabulary of the real size and layout. `tokenizer.ggml.model` gpt2; the 256 byte symbols,
then tokens made by seeded random merges of letters (every merge's parts and result are in the
vocabulary, as `tokenizers` requires), then the family's special tokens at their real ids, then
`[PADn]` fillers (UNUSED) up to the embedding's row count, as llama.cpp's converter writes them.

* Qwen2.5: 151,643 BPE tokens, 22 specials from 151,643 (`<|endoftext|>` BOS and pad,
  `<|im_start|>`, `<|im_end|>` EOS, ... `<tool_call>` and the FIM tokens user-defined), 271
  pads; `tokenizer.ggml.pre` "qwen2"; BOS not added; Qwen2.5-Instruct's chat template.
* Llama 3.2: 128,000 BPE tokens, 256 specials from 128,000 (`<|begin_of_text|>` BOS,
  `<|eot_id|>` EOS, `<|start_header_id|>`, reserved ones); pre "llama-bpe"; BOS added; Llama
  3.2's chat template (reconstructed: same output for plain and tool chats).

Types (llama-quantize's per-tensor choices for each file type; norms, biases and rope factors
stay F32):

* Q4_0 / Q4_1: every layer weight in that type; the tied embedding (which is also the output
  head) in Q6_K, or Q8_0 where its rows are not a multiple of 256 (Qwen2.5-0.5B's 896).
* Q8_0: everything Q8_0.
* Q4_K_M: Q4_K, with attn_v and ffn_down in Q6_K on the layers llama.cpp's `use_more_bits`
  picks (the first and last eighth and every third between); embedding/head Q6_K; a tensor whose
  rows are not a multiple of 256 falls back as llama.cpp's does (Q4_K -> Q5_0, Q6_K -> Q8_0),
  so Qwen2.5-0.5B's Q4_K_M is mostly Q5_0 + Q8_0 (llama.cpp's fallback for its 896-wide rows).

Weights: N(0, 0.02) per tensor (a `numpy` PCG64 stream per tensor, seeded by (seed, index)),
quantised with `gguf.quants.quantize`. gguf-py 0.19 cannot quantise K-quants in Python
(`NotImplementedError` for Q4_K and Q6_K), so K-quant blocks are constructed instead: random
bytes for the codes and packed sub-block scales (every byte pattern is a valid block) and fixed
fp16 super-block scales, calibrated so the dequantised weights have the same std of 0.02 and
mean ~0. Norm weights are 1, q/k/v biases N(0, 0.02).

Cached: FILE.gguf is written with FILE.gguf.json beside it (the parameters, gguf and numpy
versions, size, sha256, time taken); it is rewritten only when missing or when those parameters
differ. Writes go to FILE.gguf.partial first, so an interrupted run never leaves a bad file.

    .venv/bin/python bench/gguf_shapes.py --list
    .venv/bin/python bench/gguf_shapes.py --shape qwen2.5-0.5b --type Q4_0 --out bench/.work/sizes/gguf
    .venv/bin/python bench/gguf_shapes.py --shape tiny --type Q4_K_M --out /tmp/gguf   # seconds
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: Bump when the bytes written for the same parameters change (cache key).
FORMAT_VERSION = 1
DEFAULT_SEED = 0
WEIGHT_STD = 0.02
#: Elements drawn and quantised at once: bounds the fp32 working set to ~64 MB.
CHUNK_ELEMENTS = 1 << 24
#: K-quants pack 256 weights per super-block; a row that is no multiple of it falls back.
QK_K = 256
FILE_TYPES: tuple[str, ...] = ("Q4_0", "Q4_1", "Q8_0", "Q4_K_M")


# -- tokenizer families ---------------------------------------------------------------------

QWEN2_CHAT_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

LLAMA3_CHAT_TEMPLATE = """{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- if tools_in_user_message and not tools is none %}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
    {%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}
{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

#: Qwen2.5's added tokens in id order from 151,643 (tokenizer.json's added_tokens).
QWEN2_SPECIALS: tuple[str, ...] = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
)
#: Llama 3's 256 special tokens in id order from 128,000.
LLAMA3_SPECIALS: tuple[str, ...] = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
    *(f"<|reserved_special_token_{index}|>" for index in range(3, 248)),
)


@dataclass(frozen=True)
class TokenizerFamily:
    """The vocabulary layout and special tokens of one model family, as its GGUF states them."""

    pre: str  # tokenizer.ggml.pre: which pre-tokenizer llama.cpp applies
    specials: tuple[str, ...]  # placed in this order right after the BPE tokens
    bos: str
    eos: str
    pad: str | None
    add_bos: bool
    chat_template: str

    def token_type(self, token: str) -> int:
        """llama.cpp's converter: `<|...|>` tokens are CONTROL, other added ones USER_DEFINED."""
        import gguf

        special = token.startswith("<|") and token.endswith("|>")
        return int(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)


QWEN2_TOKENIZER = TokenizerFamily(
    pre="qwen2", specials=QWEN2_SPECIALS, bos="<|endoftext|>", eos="<|im_end|>", pad="<|endoftext|>",
    add_bos=False, chat_template=QWEN2_CHAT_TEMPLATE,
)
LLAMA3_TOKENIZER = TokenizerFamily(
    pre="llama-bpe", specials=LLAMA3_SPECIALS, bos="<|begin_of_text|>", eos="<|eot_id|>", pad=None,
    add_bos=True, chat_template=LLAMA3_CHAT_TEMPLATE,
)
TOKENIZERS = {"qwen2": QWEN2_TOKENIZER, "llama3": LLAMA3_TOKENIZER}


# -- shapes ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Llama3RopeScaling:
    """rope_scaling {"rope_type": "llama3", ...} of Llama 3.1/3.2's config.json."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_context: int


@dataclass(frozen=True)
class Shape:
    """One decoder's hyper-parameters, as its config.json publishes them."""

    name: str
    copies: str  # the Hugging Face repository whose config.json this is
    arch: str  # general.architecture
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp: int
    vocab: int
    bpe_tokens: int  # regular (merged and byte) tokens before the specials
    context: int
    rope_theta: float
    rms_eps: float
    tokenizer: str  # key of TOKENIZERS
    tied: bool = True
    qkv_bias: bool = False
    rope_scaling: Llama3RopeScaling | None = None

    @property
    def family(self) -> TokenizerFamily:
        return TOKENIZERS[self.tokenizer]

    @property
    def pads(self) -> int:
        return self.vocab - self.bpe_tokens - len(self.family.specials)

    def tensors(self) -> Iterator[tuple[str, tuple[int, ...], int | None]]:
        """(GGUF name, numpy shape (rows = outputs), layer or None), in llama.cpp's order."""
        q_rows, kv_rows = self.heads * self.head_dim, self.kv_heads * self.head_dim
        yield "token_embd.weight", (self.vocab, self.hidden), None
        if self.rope_scaling is not None:
            yield "rope_freqs.weight", (self.head_dim // 2,), None
        for layer in range(self.layers):
            block = f"blk.{layer}."
            yield block + "attn_norm.weight", (self.hidden,), layer
            yield block + "attn_q.weight", (q_rows, self.hidden), layer
            if self.qkv_bias:
                yield block + "attn_q.bias", (q_rows,), layer
            yield block + "attn_k.weight", (kv_rows, self.hidden), layer
            if self.qkv_bias:
                yield block + "attn_k.bias", (kv_rows,), layer
            yield block + "attn_v.weight", (kv_rows, self.hidden), layer
            if self.qkv_bias:
                yield block + "attn_v.bias", (kv_rows,), layer
            yield block + "attn_output.weight", (self.hidden, q_rows), layer
            yield block + "ffn_norm.weight", (self.hidden,), layer
            yield block + "ffn_gate.weight", (self.mlp, self.hidden), layer
            yield block + "ffn_up.weight", (self.mlp, self.hidden), layer
            yield block + "ffn_down.weight", (self.hidden, self.mlp), layer
        yield "output_norm.weight", (self.hidden,), None
        if not self.tied:
            yield "output.weight", (self.vocab, self.hidden), None

    @property
    def parameters(self) -> int:
        return sum(math.prod(dims) for name, dims, _ in self.tensors() if name != "rope_freqs.weight")


LLAMA32_ROPE = Llama3RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_context=8192)

SHAPES: dict[str, Shape] = {
    shape.name: shape
    for shape in (
        Shape(
            "qwen2.5-0.5b", "Qwen/Qwen2.5-0.5B-Instruct", "qwen2", hidden=896, layers=24, heads=14, kv_heads=2,
            head_dim=64, mlp=4864, vocab=151_936, bpe_tokens=151_643, context=32_768, rope_theta=1_000_000.0,
            rms_eps=1e-6, tokenizer="qwen2", qkv_bias=True,
        ),
        Shape(
            "qwen2.5-1.5b", "Qwen/Qwen2.5-1.5B-Instruct", "qwen2", hidden=1536, layers=28, heads=12, kv_heads=2,
            head_dim=128, mlp=8960, vocab=151_936, bpe_tokens=151_643, context=32_768, rope_theta=1_000_000.0,
            rms_eps=1e-6, tokenizer="qwen2", qkv_bias=True,
        ),
        Shape(
            "llama3.2-1b", "meta-llama/Llama-3.2-1B-Instruct", "llama", hidden=2048, layers=16, heads=32, kv_heads=8,
            head_dim=64, mlp=8192, vocab=128_256, bpe_tokens=128_000, context=131_072, rope_theta=500_000.0,
            rms_eps=1e-5, tokenizer="llama3", rope_scaling=LLAMA32_ROPE,
        ),
        Shape(
            "tiny", "(smoke tests: Qwen2.5's layout scaled down)", "qwen2", hidden=256, layers=2, heads=4, kv_heads=2,
            head_dim=64, mlp=512, vocab=1024, bpe_tokens=992, context=4096, rope_theta=1_000_000.0, rms_eps=1e-6,
            tokenizer="qwen2", qkv_bias=True,
        ),
        Shape(
            "tiny-llama3", "(smoke tests: Llama 3.2's layout scaled down)", "llama", hidden=256, layers=2, heads=4,
            kv_heads=2, head_dim=64, mlp=512, vocab=1024, bpe_tokens=768, context=4096, rope_theta=500_000.0,
            rms_eps=1e-5, tokenizer="llama3", rope_scaling=LLAMA32_ROPE,
        ),
    )
}


# -- vocabulary -----------------------------------------------------------------------------


def byte_symbols() -> list[str]:
    """GPT-2's printable stand-in for each byte 0..255 (the byte-level BPE alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {byte: chr(byte) for byte in printable}
    shift = 0
    for byte in range(256):
        if byte not in mapping:
            mapping[byte] = chr(256 + shift)
            shift += 1
    return [mapping[byte] for byte in range(256)]


def synthetic_bpe(count: int, seed: int) -> tuple[list[str], list[str]]:
    """`count` regular tokens (the 256 byte symbols, then merged ones) and their merges.

    Each merge joins an earlier token made of letters (or the space symbol 'Ġ') with one more
    letter, so every merge's parts and result are in the vocabulary, no token repeats and no
    token contains a space: what `tokenizers`' BPE model and llama.cpp's loader both require.
    """
    symbols = byte_symbols()
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    space = symbols[ord(" ")]
    tokens = list(symbols[: min(count, 256)])
    mergeable = [space, *letters]
    seen = set(tokens)
    merges: list[str] = []
    rng = np.random.default_rng([seed, 0x70C])
    while len(tokens) < count:
        lefts = rng.random(4096)
        rights = rng.integers(0, len(letters), 4096)
        for left_draw, right_index in zip(lefts, rights):
            # Favour early (short) tokens: lengths then spread like a real vocabulary's
            # (median 6 letters, 95% within 9).
            left = mergeable[int(len(mergeable) * left_draw**2)]
            token = left + letters[int(right_index)]
            if token in seen:
                continue
            seen.add(token)
            tokens.append(token)
            mergeable.append(token)
            merges.append(f"{left} {letters[int(right_index)]}")
            if len(tokens) == count:
                break
    return tokens, merges


def vocabulary(shape: Shape, seed: int) -> tuple[list[str], list[int], list[str]]:
    """Tokens, token types and merges for `shape` (BPE tokens, specials, pads)."""
    import gguf

    family = shape.family
    if shape.pads < 0:
        raise ValueError(f"{shape.name}: {shape.bpe_tokens} BPE tokens + {len(family.specials)} specials exceed vocab {shape.vocab}")
    tokens, merges = synthetic_bpe(shape.bpe_tokens, seed)
    types = [int(gguf.TokenType.NORMAL)] * len(tokens)
    tokens += list(family.specials)
    types += [family.token_type(token) for token in family.specials]
    first_pad = len(tokens)
    tokens += [f"[PAD{index}]" for index in range(first_pad, shape.vocab)]
    types += [int(gguf.TokenType.UNUSED)] * shape.pads
    return tokens, types, merges


# -- GGML types -----------------------------------------------------------------------------


def use_more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's choice of the layers whose attn_v / ffn_down get more bits in *_K_M files."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def tensor_type(shape: Shape, file_type: str, name: str, dims: tuple[int, ...], layer: int | None):  # noqa: ANN201 - gguf.GGMLQuantizationType
    """The GGML type llama-quantize gives tensor `name` in a `file_type` file (see module doc)."""
    import gguf

    T = gguf.GGMLQuantizationType
    if len(dims) == 1:
        return T.F32
    base = {"Q4_0": T.Q4_0, "Q4_1": T.Q4_1, "Q8_0": T.Q8_0, "Q4_K_M": T.Q4_K}[file_type]
    is_head = name == "output.weight" or (shape.tied and name == "token_embd.weight")
    if is_head:
        kind = T.Q8_0 if base == T.Q8_0 else T.Q6_K
    elif file_type == "Q4_K_M" and layer is not None and (name.endswith("attn_v.weight") or name.endswith("ffn_down.weight")):
        kind = T.Q6_K if use_more_bits(layer, shape.layers) else T.Q4_K
    else:
        kind = base
    if dims[-1] % QK_K and kind in (T.Q4_K, T.Q6_K):
        kind = {T.Q4_K: T.Q5_0, T.Q6_K: T.Q8_0}[kind]
    return kind


def file_type_code(file_type: str) -> int:
    import gguf

    return int(getattr(gguf.LlamaFileType, f"MOSTLY_{file_type}"))


# -- weights --------------------------------------------------------------------------------

#: K-quant blocks: byte offset of each fp16 scale field and its value relative to the
#: super-block scale d (Q4_K: d then dmin = 7.5 d, which centres d*sc*q - dmin*m on zero).
_K_QUANT_FIELDS: dict[str, dict[int, float]] = {"Q4_K": {0: 1.0, 2: 7.5}, "Q6_K": {208: 1.0}}


def _k_quant_scale(kind: Any) -> float:  # noqa: ANN401 - gguf.GGMLQuantizationType
    """The d that gives dequantised weights of std WEIGHT_STD, measured on random blocks."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[kind]
    raw = np.random.default_rng(1).integers(0, 256, size=(64, size * 16), dtype=np.uint8)
    _set_fields(raw, kind, 1.0)
    std = float(gguf.quants.dequantize(raw, kind).std())
    return WEIGHT_STD / std


def _set_fields(raw: np.ndarray, kind: Any, d: float) -> None:  # noqa: ANN401
    import gguf

    _block, size = gguf.GGML_QUANT_SIZES[kind]
    blocks = raw.reshape(raw.shape[0], -1, size)
    for offset, ratio in _K_QUANT_FIELDS[kind.name].items():
        blocks[..., offset : offset + 2] = np.frombuffer(np.float16(d * ratio).tobytes(), dtype=np.uint8)


def rope_factors(shape: Shape) -> np.ndarray:
    """llama.cpp's `rope_freqs.weight` for Llama 3 rope scaling (convert_hf_to_gguf.py's formula)."""
    scaling = shape.rope_scaling
    assert scaling is not None
    dim = shape.head_dim
    freqs = 1.0 / (shape.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    low_wavelen = scaling.original_context / scaling.low_freq_factor
    high_wavelen = scaling.original_context / scaling.high_freq_factor
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(scaling.factor)
        else:
            smooth = (scaling.original_context / wavelen - scaling.low_freq_factor) / (
                scaling.high_freq_factor - scaling.low_freq_factor
            )
            factors.append(1.0 / ((1.0 - smooth) / scaling.factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def tensor_bytes(name: str, dims: tuple[int, ...], kind: Any, shape: Shape, rng: np.random.Generator, k_scales: dict[Any, float]) -> np.ndarray:  # noqa: ANN401
    """The tensor's data as the file stores it (float32, or uint8 blocks [rows, bytes per row])."""
    import gguf

    T = gguf.GGMLQuantizationType
    if name == "rope_freqs.weight":
        return rope_factors(shape)
    if len(dims) == 1:
        if name.endswith("norm.weight"):
            return np.ones(dims, dtype=np.float32)
        return (rng.standard_normal(dims, dtype=np.float32) * WEIGHT_STD).astype(np.float32)
    rows, cols = dims
    block, size = gguf.GGML_QUANT_SIZES[kind]
    out = np.empty((rows, cols // block * size), dtype=np.uint8)
    step = max(1, CHUNK_ELEMENTS // cols)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        if kind in (T.Q4_K, T.Q6_K):
            chunk = rng.integers(0, 256, size=(stop - start, out.shape[1]), dtype=np.uint8)
            _set_fields(chunk, kind, k_scales[kind])
            out[start:stop] = chunk
        else:
            weights = rng.standard_normal((stop - start, cols), dtype=np.float32)
            weights *= WEIGHT_STD
            out[start:stop] = gguf.quants.quantize(weights, kind)
    return out


# -- writing --------------------------------------------------------------------------------


@dataclass
class Written:
    """What `ensure_gguf` produced (or found cached)."""

    path: Path
    cached: bool
    record: dict[str, Any] = field(default_factory=dict)


def parameters(shape: Shape, file_type: str, seed: int) -> dict[str, Any]:
    """Everything the file's bytes depend on: the cache key in the sidecar."""
    import gguf

    try:
        from importlib.metadata import version

        gguf_version = version("gguf")
    except Exception:  # noqa: BLE001 - a source checkout of gguf-py has no metadata
        gguf_version = getattr(gguf, "__version__", "unknown")
    return {
        "format_version": FORMAT_VERSION,
        "shape": asdict(shape),
        "type": file_type,
        "seed": seed,
        "weight_std": WEIGHT_STD,
        "chunk_elements": CHUNK_ELEMENTS,
        "numpy": np.__version__,
        "gguf": gguf_version,
    }


def gguf_path(out_dir: Path, shape_name: str, file_type: str) -> Path:
    return out_dir / f"{shape_name}-{file_type}.gguf"


def sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def ensure_gguf(shape_name: str, file_type: str, out_dir: Path, *, seed: int = DEFAULT_SEED, log: bool = True) -> Written:
    """The GGUF of `shape_name` in `file_type` under `out_dir`: written unless a file with the
    same recorded parameters is already there."""
    if shape_name not in SHAPES:
        raise SystemExit(f"unknown shape {shape_name!r}; known: {', '.join(SHAPES)}")
    if file_type not in FILE_TYPES:
        raise SystemExit(f"unknown type {file_type!r}; known: {', '.join(FILE_TYPES)}")
    shape = SHAPES[shape_name]
    path = gguf_path(out_dir, shape_name, file_type)
    wanted = parameters(shape, file_type, seed)
    sidecar = sidecar_path(path)
    if path.exists() and sidecar.exists():
        try:
            record = json.loads(sidecar.read_text())
        except ValueError:
            record = {}
        if record.get("parameters") == wanted and record.get("size_bytes") == path.stat().st_size:
            return Written(path, cached=True, record=record)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if log:
        print(f"writing {path} ({shape.parameters / 1e6:.0f} M parameters, {file_type}) ...", file=sys.stderr, flush=True)
    types = write_gguf(shape, file_type, path, seed)
    record = {
        "parameters": wanted,
        "size_bytes": path.stat().st_size,
        "sha256": file_sha256(path),
        "tensor_types": types,
        "write_s": round(time.perf_counter() - started, 1),
    }
    sidecar.write_text(json.dumps(record, indent=2) + "\n")
    if log:
        print(f"wrote {path} ({record['size_bytes'] / 2**20:.0f} MiB) in {record['write_s']} s", file=sys.stderr, flush=True)
    return Written(path, cached=False, record=record)


def write_gguf(shape: Shape, file_type: str, path: Path, seed: int) -> dict[str, int]:
    """Write the file (to PATH.partial, renamed when complete); returns tensors per GGML type."""
    import gguf

    family = shape.family
    tokens, token_types, merges = vocabulary(shape, seed)
    plan = [(name, dims, layer, tensor_type(shape, file_type, name, dims, layer)) for name, dims, layer in shape.tensors()]

    partial = path.with_name(path.name + ".partial")
    writer = gguf.GGUFWriter(str(partial), shape.arch)
    writer.add_type("model")
    writer.add_name(f"{shape.name} (random weights, {file_type})")
    writer.add_block_count(shape.layers)
    writer.add_context_length(shape.context)
    writer.add_embedding_length(shape.hidden)
    writer.add_feed_forward_length(shape.mlp)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_rope_freq_base(shape.rope_theta)
    writer.add_layer_norm_rms_eps(shape.rms_eps)
    if shape.arch == "llama":
        # What convert_hf_to_gguf.py writes for Llama 3.2 (its config.json has head_dim).
        writer.add_vocab_size(shape.vocab)
        writer.add_rope_dimension_count(shape.head_dim)
        writer.add_key_length(shape.head_dim)
        writer.add_value_length(shape.head_dim)
    writer.add_file_type(file_type_code(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(family.pre)
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    index = {token: position for position, token in enumerate(tokens)}
    writer.add_bos_token_id(index[family.bos])
    writer.add_eos_token_id(index[family.eos])
    if family.pad is not None:
        writer.add_pad_token_id(index[family.pad])
    writer.add_add_bos_token(family.add_bos)
    writer.add_chat_template(family.chat_template)

    counts: dict[str, int] = {}
    for name, dims, _layer, kind in plan:
        if kind == gguf.GGMLQuantizationType.F32:
            writer.add_tensor_info(name, dims, np.dtype(np.float32), math.prod(dims) * 4)
        else:
            block, size = gguf.GGML_QUANT_SIZES[kind]
            nbytes = math.prod(dims) // block * size
            writer.add_tensor_info(name, dims, np.dtype(np.float32), nbytes, raw_dtype=kind)
        counts[kind.name] = counts.get(kind.name, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    k_scales = {kind: _k_quant_scale(kind) for _n, _d, _l, kind in plan if kind.name in _K_QUANT_FIELDS}
    for position, (name, dims, _layer, kind) in enumerate(plan):
        rng = np.random.default_rng([seed, position])
        writer.write_tensor_data(tensor_bytes(name, dims, kind, shape, rng, k_scales))
    writer.close()
    os.replace(partial, path)
    return dict(sorted(counts.items()))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def describe(shape: Shape) -> str:
    rope = ""
    if shape.rope_scaling is not None:
        scaling = shape.rope_scaling
        rope = f", llama3 rope scaling {scaling.factor:g}/{scaling.low_freq_factor:g}/{scaling.high_freq_factor:g}/{scaling.original_context}"
    return (
        f"{shape.name:<13} {shape.arch:<5} hidden {shape.hidden}, {shape.layers} layers, {shape.heads}/{shape.kv_heads} heads "
        f"x {shape.head_dim}, MLP {shape.mlp}, vocab {shape.vocab:,} ({shape.bpe_tokens:,} BPE + {len(shape.family.specials)} "
        f"special + {shape.pads} pad), context {shape.context:,}, rope theta {shape.rope_theta:g}, eps {shape.rms_eps:g}"
        f"{', tied' if shape.tied else ''}{', qkv bias' if shape.qkv_bias else ''}{rope}; {shape.parameters / 1e6:.0f} M params"
        f" — {shape.copies}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES))
    parser.add_argument("--tiny", action="store_true", help="same as --shape tiny")
    parser.add_argument("--type", dest="file_type", choices=FILE_TYPES, action="append", help="repeatable (default Q4_0)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / ".work" / "sizes" / "gguf")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--list", action="store_true", help="print the shapes and exit")
    args = parser.parse_args()
    if args.list:
        for shape in SHAPES.values():
            print(describe(shape))
        return
    shape_name = "tiny" if args.tiny else args.shape
    if shape_name is None:
        parser.error("--shape (or --tiny) is required")
    for file_type in args.file_type or ["Q4_0"]:
        written = ensure_gguf(shape_name, file_type, args.out, seed=args.seed)
        state = "cached" if written.cached else "written"
        print(f"{written.path}  {state}  {written.record['size_bytes']:,} bytes  {written.record['tensor_types']}")


if __name__ == "__main__":
    main()
