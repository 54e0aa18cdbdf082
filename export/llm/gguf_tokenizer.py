"""The tokenizer of a GGUF model, made to say what the GGUF file says.

transformers 4.57.6 converts a GGUF vocabulary into a `tokenizers` file but guesses the special
tokens: for SmolLM2 it makes `<|im_start|>` the EOS token and turns BOS insertion on, against
the file's own `tokenizer.ggml.eos_token_id` and `tokenizer.ggml.add_bos_token`. A server that
trusted that would never stop generating and would prefix every prompt with a stray token. So
the special tokens, BOS/EOS insertion, the pre-tokenizer and the chat template are rewritten
here from the GGUF metadata itself (`fix_tokenizer_files`).

The pre-tokenizer of a byte-level BPE ('gpt2') vocabulary is chosen from the header's
`tokenizer.ggml.pre` the way llama.cpp chooses it (`PRE_TOKENIZERS`: GPT-2's split, SmolLM's
digits-then-GPT-2, Qwen2's and Llama 3's splits, with Qwen2's NFC normaliser and Llama 3's
whole-word lookup before merging); a name not listed there is refused by name, never served
with another family's split. What real files declare: SmolLM2 "smollm", Qwen2.5
"qwen2", Llama 3.x "llama-bpe"; Mistral 7B, Gemma and Phi-3 are SentencePiece ('llama')
vocabularies, which have no pre-tokenizer here (llama.cpp ignores the key for them) and keep
the converter's.

`GgufReferenceTokenizer` is an independent byte-level BPE over the GGUF's own token and merge
lists with the same `PRE_TOKENIZERS` rules, written in plain Python. The tests check the fixed
`tokenizer.json` against it (and against a tokenizer built from each family's published
tokenizer.json rules); the export itself does not run it.

Never imports torch or transformers; never changes the vocabulary itself (ids stay the GGUF's).
"""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from appliance.errors import ExportError
from appliance.export.llm.gguf_header import GgufHeader

#: llama.cpp's token type for control tokens (<|im_start|>, <|endoftext|>, ...).
GGUF_TOKEN_TYPE_CONTROL = 3
GGUF_TOKEN_TYPE_USER_DEFINED = 4

#: GPT-2's pre-tokenizer split (GPT-2, SmolLM after its digit split): the regex of
#: `tokenizers`' ByteLevel(use_regex=True) and of llama.cpp's LLAMA_VOCAB_PRE_TYPE_GPT2.
GPT2_SPLIT_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
#: Qwen2 / Qwen2.5's split (their tokenizer.json's Split regex; llama.cpp's QWEN2 rules are the
#: same with the case-insensitive group spelt out): digits one by one.
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
#: Llama 3 / 3.1 / 3.2's split (Meta's tokenizer.json Split regex; llama.cpp's LLAMA3 rules):
#: digits in groups of up to three.
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class PreTokenizerRules:
    """How one family splits text before byte-level BPE (llama.cpp's pre-tokenizer type)."""

    family: str
    #: Split regex applied before ByteLevel (None: ByteLevel's own GPT-2 regex).
    split_pattern: str | None = None
    #: Every digit on its own before the split (SmolLM).
    digits_alone: bool = False
    #: NFC-normalise the text first (Qwen2).
    nfc: bool = False
    #: A pre-token that is itself in the vocabulary is taken whole, unmerged (Llama 3).
    ignore_merges: bool = False
    #: llama.cpp's add_bos when the header has no tokenizer.ggml.add_bos_token.
    add_bos_default: bool = False
    #: ByteLevel's trim_offsets in the family's tokenizer.json (offsets only, never ids).
    trim_offsets: bool = True

    def pre_tokenizer_json(self) -> dict[str, Any]:
        """The `pre_tokenizer` entry of tokenizer.json for these rules."""
        use_regex = self.split_pattern is None
        byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": self.trim_offsets, "use_regex": use_regex}
        steps: list[dict[str, Any]] = []
        if self.digits_alone:
            steps.append({"type": "Digits", "individual_digits": True})
        if self.split_pattern is not None:
            steps.append({"type": "Split", "pattern": {"Regex": self.split_pattern}, "behavior": "Isolated", "invert": False})
        if not steps:
            return byte_level
        return {"type": "Sequence", "pretokenizers": [*steps, byte_level]}


GPT2_RULES = PreTokenizerRules("gpt2")
SMOLLM_RULES = PreTokenizerRules("smollm", digits_alone=True)
QWEN2_RULES = PreTokenizerRules("qwen2", split_pattern=QWEN2_SPLIT_PATTERN, nfc=True, trim_offsets=False)
LLAMA3_RULES = PreTokenizerRules("llama3", split_pattern=LLAMA3_SPLIT_PATTERN, ignore_merges=True, add_bos_default=True)

#: `tokenizer.ggml.pre` -> rules, for byte-level BPE vocabularies; the names are llama.cpp's
#: (llama-vocab.cpp) for these families. "default" (and a file without the key) keeps GPT-2's
#: split, as this export always did for them.
PRE_TOKENIZERS: dict[str, PreTokenizerRules] = {
    "default": GPT2_RULES,
    "gpt2": GPT2_RULES,
    "gpt-2": GPT2_RULES,
    "smollm": SMOLLM_RULES,
    "qwen2": QWEN2_RULES,
    "deepseek-r1-qwen": QWEN2_RULES,
    "llama-bpe": LLAMA3_RULES,
    "llama3": LLAMA3_RULES,
    "llama-v3": LLAMA3_RULES,
}


@dataclass(frozen=True)
class GgufTokenizerFacts:
    """Special tokens and insertion rules as the GGUF header states them."""

    tokenizer_model: str
    pre_tokenizer: str | None
    bos_token_id: int | None
    eos_token_id: int | None
    unk_token_id: int | None
    pad_token_id: int | None
    add_bos_token: bool
    add_eos_token: bool
    chat_template: str | None
    tokens: list[str]
    token_types: list[int]

    def token(self, token_id: int | None) -> str | None:
        if token_id is None:
            return None
        return self.tokens[token_id]

    @property
    def control_token_ids(self) -> list[int]:
        return [
            index
            for index, kind in enumerate(self.token_types)
            if kind in (GGUF_TOKEN_TYPE_CONTROL, GGUF_TOKEN_TYPE_USER_DEFINED)
        ]


def tokenizer_facts(header: GgufHeader) -> GgufTokenizerFacts:
    """Read the tokenizer block of a GGUF header; ExportError when ids point outside the vocab."""
    meta = header.metadata
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise ExportError(f"source: {header.path.name} has no tokenizer (tokenizer.ggml.tokens missing)", field="source")
    token_types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    model = str(meta.get("tokenizer.ggml.model", ""))

    def token_id(key: str) -> int | None:
        value = meta.get(f"tokenizer.ggml.{key}")
        if value is None:
            return None
        if not isinstance(value, int) or not 0 <= value < len(tokens):
            raise ExportError(
                f"source: {header.path.name}: tokenizer.ggml.{key} = {value!r} is outside the "
                f"vocabulary of {len(tokens)} tokens",
                field="source",
            )
        return value

    # llama.cpp's defaults when the flag is absent: SentencePiece vocabularies add BOS, and of
    # the byte-level BPE ones only Llama 3's.
    pre = meta.get("tokenizer.ggml.pre")
    known = PRE_TOKENIZERS.get(str(pre)) if pre is not None else None
    add_bos = meta.get("tokenizer.ggml.add_bos_token", model == "llama" or (known is not None and known.add_bos_default))
    add_eos = meta.get("tokenizer.ggml.add_eos_token", False)
    template = meta.get("tokenizer.chat_template")
    return GgufTokenizerFacts(
        tokenizer_model=model,
        pre_tokenizer=str(pre) if pre is not None else None,
        bos_token_id=token_id("bos_token_id"),
        eos_token_id=token_id("eos_token_id"),
        unk_token_id=token_id("unknown_token_id"),
        pad_token_id=token_id("padding_token_id"),
        add_bos_token=bool(add_bos),
        add_eos_token=bool(add_eos),
        chat_template=template if isinstance(template, str) and template.strip() else None,
        tokens=[str(token) for token in tokens],
        token_types=[int(kind) for kind in token_types],
    )


def _post_processor(facts: GgufTokenizerFacts) -> dict[str, Any] | None:
    """A TemplateProcessing that adds exactly the BOS/EOS the GGUF asks for, or none."""
    bos = facts.token(facts.bos_token_id) if facts.add_bos_token else None
    eos = facts.token(facts.eos_token_id) if facts.add_eos_token else None
    if bos is None and eos is None:
        return None
    single: list[dict[str, Any]] = []
    pair: list[dict[str, Any]] = []
    specials: dict[str, Any] = {}
    for piece, type_id, target in (("A", 0, single), ("A", 0, pair), ("B", 1, pair)):
        if bos is not None:
            target.append({"SpecialToken": {"id": bos, "type_id": type_id}})
        target.append({"Sequence": {"id": piece, "type_id": type_id}})
        if eos is not None:
            target.append({"SpecialToken": {"id": eos, "type_id": type_id}})
    for token, token_id in ((bos, facts.bos_token_id), (eos, facts.eos_token_id)):
        if token is not None:
            specials[token] = {"id": token, "ids": [token_id], "tokens": [token]}
    return {"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials}


def pre_tokenizer_rules(facts: GgufTokenizerFacts, name: str = "the GGUF") -> PreTokenizerRules | None:
    """The pre-tokenizer rules of a byte-level BPE vocabulary (None for other vocabularies,
    whose pre-tokenizer the converter sets); ExportError naming an unknown `tokenizer.ggml.pre`."""
    if facts.tokenizer_model != "gpt2":
        return None
    if facts.pre_tokenizer is None:
        return GPT2_RULES
    rules = PRE_TOKENIZERS.get(facts.pre_tokenizer)
    if rules is None:
        raise ExportError(
            f"source: {name} declares tokenizer.ggml.pre = {facts.pre_tokenizer!r}, a pre-tokenizer the export "
            f"does not know; known: {', '.join(sorted(PRE_TOKENIZERS))}",
            field="source",
        )
    return rules


def check_pre_tokenizer(header: GgufHeader) -> None:
    """ExportError unless the header's byte-level BPE pre-tokenizer is one of PRE_TOKENIZERS
    (a header without a vocabulary passes here; the loader refuses it by name)."""
    if not header.metadata.get("tokenizer.ggml.tokens"):
        return
    pre_tokenizer_rules(tokenizer_facts(header), header.path.name)


def fix_tokenizer_files(folder: Path, facts: GgufTokenizerFacts) -> None:
    """Rewrite tokenizer.json, tokenizer_config.json and special_tokens_map.json in `folder`
    (as transformers saved them) so special tokens and BOS/EOS insertion follow the GGUF."""
    tokenizer_path = folder / "tokenizer.json"
    data = json.loads(tokenizer_path.read_text())
    vocab_size = len(facts.tokens)
    added = {entry["id"]: entry for entry in data.get("added_tokens", [])}
    for token_id in facts.control_token_ids:
        if token_id not in added:
            added[token_id] = {
                "id": token_id,
                "content": facts.tokens[token_id],
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
    for token_id, entry in added.items():
        if not 0 <= token_id < vocab_size or facts.tokens[token_id] != entry["content"]:
            raise ExportError(
                f"source: converted tokenizer disagrees with the GGUF vocabulary at id {token_id}",
                field="source",
            )
    data["added_tokens"] = [added[key] for key in sorted(added)]
    data["post_processor"] = _post_processor(facts)
    rules = pre_tokenizer_rules(facts)
    if rules is not None:
        data["normalizer"] = {"type": "NFC"} if rules.nfc else None
        data["pre_tokenizer"] = rules.pre_tokenizer_json()
        data["decoder"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
        data["model"]["ignore_merges"] = rules.ignore_merges
    tokenizer_path.write_text(json.dumps(data, ensure_ascii=False, indent=2))

    special = {
        "bos_token": facts.token(facts.bos_token_id),
        "eos_token": facts.token(facts.eos_token_id),
        "unk_token": facts.token(facts.unk_token_id),
        "pad_token": facts.token(facts.pad_token_id),
    }
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    config.update(special)
    config["add_bos_token"] = facts.add_bos_token
    config["add_eos_token"] = facts.add_eos_token
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config.pop("legacy", None)
    if facts.chat_template is not None:
        config["chat_template"] = facts.chat_template
    config_path.write_text(json.dumps(config, ensure_ascii=False, indent=2))
    present = {key: value for key, value in special.items() if value is not None}
    (folder / "special_tokens_map.json").write_text(json.dumps(present, ensure_ascii=False, indent=2))


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (byte-level BPE alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping: dict[int, str] = {byte: chr(byte) for byte in printable}
    shift = 0
    for byte in range(256):
        if byte not in mapping:
            mapping[byte] = chr(256 + shift)
            shift += 1
    return mapping


class GgufReferenceTokenizer:
    """Byte-level BPE straight from a GGUF's token and merge lists (llama.cpp's rules).

    Slow and simple on purpose: it is the yardstick the tests check the fast `tokenizers` file
    against, not something to serve with. Every `PRE_TOKENIZERS` family is supported.
    """

    def __init__(self, header: GgufHeader) -> None:
        import regex

        facts = tokenizer_facts(header)
        rules = pre_tokenizer_rules(facts, header.path.name)
        if rules is None:
            raise ExportError(
                f"source: reference tokenisation supports byte-level BPE ('gpt2') vocabularies, not "
                f"{facts.tokenizer_model!r}",
                field="source",
            )
        self._rules = rules
        merges = header.metadata.get("tokenizer.ggml.merges") or []
        self._ranks: dict[tuple[str, str], int] = {}
        for rank, merge in enumerate(merges):
            left, _, right = str(merge).partition(" ")
            self._ranks[(left, right)] = rank
        self._ids = {token: index for index, token in enumerate(facts.tokens)}
        self._split = regex.compile(rules.split_pattern or GPT2_SPLIT_PATTERN)
        controls = sorted((facts.tokens[i] for i in facts.control_token_ids), key=len, reverse=True)
        self._specials = regex.compile("|".join(regex.escape(token) for token in controls)) if controls else None
        self._byte_map = _bytes_to_unicode()

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, control tokens written literally matched as themselves."""
        ids: list[int] = []
        position = 0
        matches = list(self._specials.finditer(text)) if self._specials else []
        for match in matches:
            ids.extend(self._encode_plain(text[position : match.start()]))
            ids.append(self._ids[match.group(0)])
            position = match.end()
        ids.extend(self._encode_plain(text[position:]))
        return ids

    def _encode_plain(self, text: str) -> list[int]:
        ids: list[int] = []
        if self._rules.nfc:
            text = unicodedata.normalize("NFC", text)
        pieces = [text]
        if self._rules.digits_alone:
            import regex

            pieces = [part for part in regex.split(r"(\p{N})", text) if part]
        for piece in pieces:
            for word in self._words(piece):
                symbols = [self._byte_map[byte] for byte in word.encode("utf-8")]
                whole = "".join(symbols)
                merged = [whole] if self._rules.ignore_merges and whole in self._ids else self._bpe(symbols)
                for symbol in merged:
                    if symbol not in self._ids:
                        raise ExportError(f"source: GGUF vocabulary lacks the BPE symbol {symbol!r}", field="source")
                    ids.append(self._ids[symbol])
        return ids

    def _words(self, text: str) -> list[str]:
        """The split's matches and the text between them, in order (tokenizers' "Isolated")."""
        words: list[str] = []
        position = 0
        for match in self._split.finditer(text):
            if match.start() > position:
                words.append(text[position : match.start()])
            if match.end() > match.start():
                words.append(match.group(0))
            position = match.end()
        if position < len(text):
            words.append(text[position:])
        return words

    def _bpe(self, symbols: list[str]) -> list[str]:
        while len(symbols) > 1:
            best_rank: int | None = None
            best_at = -1
            for index in range(len(symbols) - 1):
                rank = self._ranks.get((symbols[index], symbols[index + 1]))
                if rank is not None and (best_rank is None or rank < best_rank):
                    best_rank, best_at = rank, index
            if best_rank is None:
                break
            symbols = [*symbols[:best_at], symbols[best_at] + symbols[best_at + 1], *symbols[best_at + 2 :]]
        return symbols
