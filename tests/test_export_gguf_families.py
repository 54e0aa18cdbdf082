"""GGUF files of the Qwen2 and Llama 3 families: the exported tokenizer splits text as the
family's published tokenizer does, an unknown pre-tokenizer is refused by name, and Llama 3's
rope scaling (llama.cpp's `rope_freqs.weight`) reaches the saved config.

The files come from bench/gguf_shapes.py (`tiny`: Qwen2.5's layout, pre "qwen2"; `tiny-llama3`:
Llama 3.2's, pre "llama-bpe", rope_freqs written as llama.cpp's converter writes it). The
reference tokenizers are built here with `tokenizers` from the file's own vocabulary and merges
and each family's published tokenizer.json rules, independently of the export's code.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from appliance.errors import ExportError
from appliance.export.llm.gguf_header import read_gguf_header
from appliance.export.llm.gguf_rope import default_inv_freq, llama3_factors, llama3_rope_scaling
from appliance.export.llm.gguf_tokenizer import GgufReferenceTokenizer, tokenizer_facts
from appliance.export.sources import resolve
from tests.helpers.bench_modules import load_bench_module

gguf = pytest.importorskip("gguf")
tokenizers = pytest.importorskip("tokenizers")

#: Published pre-tokenizer regexes (Qwen/Qwen2.5-*/tokenizer.json, meta-llama/Llama-3.*/tokenizer.json).
PUBLISHED_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PUBLISHED_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
#: Digits, contractions (either case), runs of newlines and spaces, a decomposed é (NFC
#: matters), CJK and punctuation runs.
TRICKY = "In 2024 we sold 1234 apples...\n\n Why's THAT? It'S cafe\u0301 naïve 東京 12345678 don't\r\n\tX  y (ok)!!\n   "


shapes = load_bench_module("gguf_shapes")


@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """shape name -> (GGUF file, the Hugging Face folder the export made of it)."""
    from appliance.export.llm.gguf_load import gguf_to_hf_folder

    root = tmp_path_factory.mktemp("families")
    made: dict[str, tuple[Path, Path]] = {}
    for shape in ("tiny", "tiny-llama3"):
        path = shapes.ensure_gguf(shape, "Q8_0", root, log=False).path
        folder = root / f"{shape}-hf"
        gguf_to_hf_folder(read_gguf_header(path), folder)
        made[shape] = (path, folder)
    return made


def _published_tokenizer(path: Path, regex: str, *, nfc: bool, ignore_merges: bool):  # noqa: ANN202 - tokenizers.Tokenizer
    """The family's tokenizer.json rules over the GGUF's own vocabulary and merges."""
    from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers

    facts = tokenizer_facts(read_gguf_header(path))
    metadata = read_gguf_header(path).metadata
    vocab = {token: index for index, token in enumerate(facts.tokens)}
    merges = [tuple(str(merge).split(" ")) for merge in metadata["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(models.BPE(vocab, merges, ignore_merges=ignore_merges))
    if nfc:
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.add_special_tokens([AddedToken(facts.tokens[i], normalized=False, special=True) for i in facts.control_token_ids])
    return tokenizer


def _pieces(tokenizer, text: str) -> list[str]:  # noqa: ANN001 - tokenizers.Tokenizer
    normalised = tokenizer.normalizer.normalize_str(text) if tokenizer.normalizer is not None else text
    return [piece for piece, _ in tokenizer.pre_tokenizer.pre_tokenize_str(normalised)]


def _gpt2_pieces(text: str) -> list[str]:
    from tokenizers import pre_tokenizers

    return [piece for piece, _ in pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str(text)]


CASES = [
    pytest.param("tiny", PUBLISHED_QWEN2_REGEX, True, False, id="qwen2"),
    pytest.param("tiny-llama3", PUBLISHED_LLAMA3_REGEX, False, True, id="llama-bpe"),
]


@pytest.mark.parametrize(("shape", "regex", "nfc", "ignore_merges"), CASES)
def test_exported_tokenizer_splits_like_the_family_published_tokenizer(
    families: dict[str, tuple[Path, Path]], shape: str, regex: str, nfc: bool, ignore_merges: bool
) -> None:
    from tokenizers import Tokenizer

    path, folder = families[shape]
    exported = Tokenizer.from_file(str(folder / "tokenizer.json"))
    published = _published_tokenizer(path, regex, nfc=nfc, ignore_merges=ignore_merges)
    assert _pieces(exported, TRICKY) == _pieces(published, TRICKY)
    assert _pieces(exported, TRICKY) != _gpt2_pieces(TRICKY)  # what the export produced before
    ids = exported.encode(TRICKY, add_special_tokens=False).ids
    assert ids == published.encode(TRICKY, add_special_tokens=False).ids
    assert ids == GgufReferenceTokenizer(read_gguf_header(path)).encode(TRICKY)


def test_qwen2_splits_digits_one_by_one_and_keeps_newlines_with_punctuation(families: dict[str, tuple[Path, Path]]) -> None:
    from tokenizers import Tokenizer

    exported = Tokenizer.from_file(str(families["tiny"][1] / "tokenizer.json"))
    pieces = _pieces(exported, "In 2024 we sold...\n\n Why's")
    assert pieces == ["In", "Ġ", "2", "0", "2", "4", "Ġwe", "Ġsold", "...ĊĊ", "ĠWhy", "'s"]
    assert _pieces(exported, "cafe\u0301") == ["cafÃ©"]  # NFC first, as Qwen2's normaliser


def test_llama3_splits_digits_in_threes_and_adds_bos(families: dict[str, tuple[Path, Path]]) -> None:
    from tokenizers import Tokenizer

    path, folder = families["tiny-llama3"]
    exported = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert _pieces(exported, "sold 1234567 x") == ["sold", "Ġ", "123", "456", "7", "Ġx"]
    bos = tokenizer_facts(read_gguf_header(path)).bos_token_id
    assert exported.encode("hi").ids[0] == bos


def _with_pre(source: Path, target: Path, old: str, new: str) -> Path:
    """A copy of `source` whose tokenizer.ggml.pre value `old` is replaced by `new` (same length)."""
    assert len(old) == len(new)
    key = b"tokenizer.ggml.pre"
    stored = struct.pack("<Q", len(key)) + key + struct.pack("<IQ", 8, len(old))
    data = source.read_bytes()
    assert data.count(stored + old.encode()) == 1
    target.write_bytes(data.replace(stored + old.encode(), stored + new.encode()))
    return target


def test_unknown_pre_tokenizer_is_refused_by_name(families: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    from appliance.export.llm.gguf_load import gguf_to_hf_folder

    path = _with_pre(families["tiny"][0], tmp_path / "odd.gguf", "qwen2", "tekkn")
    for attempt in (
        lambda: resolve(str(path)),
        lambda: gguf_to_hf_folder(read_gguf_header(path), tmp_path / "hf"),
        lambda: GgufReferenceTokenizer(read_gguf_header(path)),
    ):
        with pytest.raises(ExportError) as caught:
            attempt()
        message = str(caught.value)
        assert "'tekkn'" in message and "odd.gguf" in message and "\n" not in message
        assert caught.value.field == "source"
    assert not (tmp_path / "hf").exists()


# -- rope scaling -------------------------------------------------------------------------


def _tensor_factors(path: Path) -> np.ndarray:
    reader = gguf.GGUFReader(str(path))
    return np.array(next(t for t in reader.tensors if t.name == "rope_freqs.weight").data, dtype=np.float32)


def test_llama3_gguf_exports_with_llama_3_2_rope_scaling(families: dict[str, tuple[Path, Path]]) -> None:
    import torch
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    path, folder = families["tiny-llama3"]
    config = json.loads((folder / "config.json").read_text())
    assert config["rope_scaling"] == {
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    loaded = AutoConfig.from_pretrained(str(folder))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](loaded, "cpu")
    plain, _ = ROPE_INIT_FUNCTIONS["default"](loaded, "cpu")
    factors = torch.from_numpy(_tensor_factors(path))
    torch.testing.assert_close(scaled, plain / factors, rtol=1e-5, atol=0.0)
    assert not torch.allclose(scaled, plain)  # the scaling is really there


def test_qwen2_gguf_without_rope_freqs_gets_no_rope_scaling(families: dict[str, tuple[Path, Path]]) -> None:
    assert json.loads((families["tiny"][1] / "config.json").read_text()).get("rope_scaling") is None


def test_rope_scaling_outside_the_presets_is_solved_from_the_factors() -> None:
    scaling = shapes.Llama3RopeScaling(factor=16.0, low_freq_factor=2.0, high_freq_factor=8.0, original_context=16384)
    shape = dataclasses.replace(shapes.SHAPES["tiny-llama3"], head_dim=128, rope_scaling=scaling)
    factors = shapes.rope_factors(shape)
    solved = llama3_rope_scaling(factors, shape.rope_theta, 128, "x.gguf")
    assert solved is not None and solved["rope_type"] == "llama3" and solved["factor"] == 16.0
    np.testing.assert_allclose(llama3_factors(solved, default_inv_freq(shape.rope_theta, 128)), factors, rtol=1e-4)


def test_rope_freqs_that_no_llama3_scaling_reproduces_are_refused_by_name() -> None:
    factors = np.random.default_rng(0).uniform(1.0, 8.0, 32).astype(np.float32)
    with pytest.raises(ExportError, match=r"^source: odd\.gguf: rope_freqs\.weight .* matches no Llama 3 rope scaling") as caught:
        llama3_rope_scaling(factors, 500_000.0, 64, "odd.gguf")
    assert "\n" not in str(caught.value)
    assert llama3_rope_scaling(np.ones(32, dtype=np.float32), 500_000.0, 64, "plain.gguf") is None
