"""The GGUF source: a bounded header reader, the config it derives, and the tokenizer fix.

A tiny Llama is written as an F32 GGUF (tests/helpers/decoders.py) with SmolLM2's special
token layout: BOS <|im_start|> (1), EOS <|im_end|> (2), add_bos_token false, the case that
transformers 4.57.6's converter gets wrong.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from helpers.decoders import CHAT_TEMPLATE, IM_END, IM_START, make_tiny_llama, write_tiny_gguf

from appliance.errors import ExportError
from appliance.export.llm.eval_data import render_chat
from appliance.export.llm.gguf_header import read_gguf_header
from appliance.export.llm.gguf_tokenizer import GgufReferenceTokenizer, tokenizer_facts
from appliance.export.sources import resolve


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "hf")


@pytest.fixture(scope="module")
def tiny_gguf(tiny_llama: Path) -> Path:
    return write_tiny_gguf(tiny_llama, tiny_llama.parent / "tiny.gguf")


@pytest.fixture(scope="module")
def dequantised(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from appliance.export.llm.gguf_load import gguf_to_hf_folder

    folder = tmp_path_factory.mktemp("from-gguf")
    gguf_to_hf_folder(read_gguf_header(tiny_gguf), folder)
    return folder


def _gguf_bytes(kv_payload: bytes, kv_count: int = 1, tensor_count: int = 0) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, tensor_count, kv_count) + kv_payload


def _key(name: str) -> bytes:
    return struct.pack("<Q", len(name)) + name.encode()


# -- header -------------------------------------------------------------------------------


def test_header_reads_metadata_and_tensor_table(tiny_gguf: Path) -> None:
    header = read_gguf_header(tiny_gguf)
    assert header.architecture == "llama"
    assert header.arch_value("block_count") == 2
    assert header.metadata["tokenizer.ggml.eos_token_id"] == 2
    assert header.metadata["tokenizer.chat_template"] == CHAT_TEMPLATE
    names = {tensor.name for tensor in header.tensors}
    assert {"token_embd.weight", "blk.0.attn_q.weight", "output_norm.weight"} <= names
    last = max(header.tensors, key=lambda tensor: tensor.offset_bytes)
    assert header.data_offset_bytes + last.offset_bytes + last.size_bytes <= header.file_size_bytes


@pytest.mark.parametrize("keep_fraction", [0.0001, 0.01, 0.3, 0.9, 0.9999])
def test_truncated_gguf_is_refused_with_one_clear_error(tiny_gguf: Path, tmp_path: Path, keep_fraction: float) -> None:
    data = tiny_gguf.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: max(1, int(len(data) * keep_fraction))])
    with pytest.raises(ExportError) as caught:
        resolve(str(cut))
    assert caught.value.field == "source"
    assert "cut.gguf" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_lying_array_count_is_refused_before_anything_is_allocated(tmp_path: Path) -> None:
    # An array of 2**60 uint32 in a 60-byte file: must fail on the bound, not try to read it.
    payload = _key("tokenizer.ggml.token_type") + struct.pack("<IIQ", 9, 4, 1 << 60)
    path = tmp_path / "lying.gguf"
    path.write_bytes(_gguf_bytes(payload))
    with pytest.raises(ExportError, match="truncated"):
        read_gguf_header(path)


def test_lying_string_length_is_refused(tmp_path: Path) -> None:
    payload = _key("general.name") + struct.pack("<IQ", 8, 1 << 62) + b"abc"
    path = tmp_path / "lying.gguf"
    path.write_bytes(_gguf_bytes(payload))
    with pytest.raises(ExportError, match="general.name"):
        read_gguf_header(path)


def test_lying_metadata_count_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "lying.gguf"
    path.write_bytes(_gguf_bytes(b"", kv_count=1 << 40))
    with pytest.raises(ExportError, match="metadata entries"):
        read_gguf_header(path)


def test_tensor_beyond_the_end_of_the_file_is_refused(tiny_gguf: Path, tmp_path: Path) -> None:
    header = read_gguf_header(tiny_gguf)
    cut = tmp_path / "short.gguf"
    cut.write_bytes(tiny_gguf.read_bytes()[: header.data_offset_bytes + 16])
    with pytest.raises(ExportError, match="truncated: tensor"):
        read_gguf_header(cut)


def test_a_file_that_is_not_gguf_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04" + bytes(64))
    with pytest.raises(ExportError, match="not a GGUF file"):
        resolve(str(path))


# -- source -------------------------------------------------------------------------------


def test_gguf_source_derives_the_config_from_the_header(tiny_gguf: Path) -> None:
    source = resolve(str(tiny_gguf))
    assert source.kind == "gguf" and source.format == "gguf"
    assert source.architectures == ["LlamaForCausalLM"]
    assert source.config is not None and source.config["num_key_value_heads"] == 2
    assert len(source.sha256) == 64


def test_unsupported_gguf_architecture_is_named(tmp_path: Path) -> None:
    payload = _key("general.architecture") + struct.pack("<IQ", 8, 5) + b"mamba"
    path = tmp_path / "mamba.gguf"
    path.write_bytes(_gguf_bytes(payload))
    with pytest.raises(ExportError, match="'mamba' is not supported; supported: .*llama"):
        resolve(str(path))


def test_gguf_weights_dequantise_to_the_original_model(tiny_llama: Path, dequantised: Path) -> None:
    import torch
    from safetensors.torch import load_file

    original = load_file(str(tiny_llama / "model.safetensors"))
    loaded = load_file(str(dequantised / "model.safetensors"))
    for name, tensor in original.items():
        if name in loaded:
            assert torch.equal(tensor, loaded[name]), name
    assert "model.layers.1.self_attn.q_proj.weight" in loaded


def test_the_four_transformers_loads_share_one_parse_of_the_file(tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gguf

    from appliance.export.llm.gguf_load import gguf_to_hf_folder

    parsed: list[str] = []
    original_class, original_init = gguf.GGUFReader, gguf.GGUFReader.__init__

    def counting_init(self: object, path: object, mode: str = "r") -> None:
        parsed.append(Path(str(path)).name)
        original_init(self, path, mode)

    monkeypatch.setattr(gguf.GGUFReader, "__init__", counting_init)
    gguf_to_hf_folder(read_gguf_header(tiny_gguf), tmp_path / "hf")
    assert parsed == [tiny_gguf.name]
    # restored afterwards: the next reader parses the file again
    assert gguf.GGUFReader is original_class
    gguf.GGUFReader(tiny_gguf)
    assert parsed == [tiny_gguf.name, tiny_gguf.name]


# -- tokenizer ----------------------------------------------------------------------------


def test_special_tokens_follow_the_gguf_metadata_not_the_converter(dequantised: Path) -> None:
    config = json.loads((dequantised / "tokenizer_config.json").read_text())
    assert config["bos_token"] == IM_START
    assert config["eos_token"] == IM_END
    assert config["add_bos_token"] is False
    assert config["chat_template"] == CHAT_TEMPLATE
    generation = json.loads((dequantised / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2 and generation["bos_token_id"] == 1


def test_fixed_tokenizer_adds_no_bos_when_the_gguf_says_so(dequantised: Path) -> None:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(dequantised / "tokenizer.json"))
    ids = tokenizer.encode("hello there").ids
    assert ids and ids[0] != 1


def test_gguf_asking_for_bos_gets_a_tokenizer_that_adds_it(tiny_llama: Path, tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    from appliance.export.llm.gguf_load import gguf_to_hf_folder

    path = write_tiny_gguf(tiny_llama, tmp_path / "bos.gguf", add_bos_token=True)
    gguf_to_hf_folder(read_gguf_header(path), tmp_path / "hf")
    ids = Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json")).encode("hello there").ids
    assert ids[0] == 1 and ids.count(1) == 1


def test_chat_template_token_ids_equal_the_gguf_vocabulary_tokenisation(tiny_gguf: Path, dequantised: Path) -> None:
    from tokenizers import Tokenizer

    header = read_gguf_header(tiny_gguf)
    facts = tokenizer_facts(header)
    reference = GgufReferenceTokenizer(header)
    tokenizer = Tokenizer.from_file(str(dequantised / "tokenizer.json"))
    messages = [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "Rewrite 12,345 numbers: don't   wait!\n\nThe river  bank."},
    ]
    text = render_chat(facts.chat_template, messages, {})
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert ids == reference.encode(text)
    assert ids[0] == 1 and ids.count(2) == 2  # <|im_start|> opens, two turns closed by <|im_end|>
