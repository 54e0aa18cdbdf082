"""The tokenizer wrapper: truncation keeps the special tokens, is reported, never silent."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.errors import InvalidInput, ModelRejected
from appliance.runtime.tokenizer import TextTokenizer
from tests.helpers.tiny_models import EMBED_SPECIALS, EMBED_WORDS, write_tokenizer

VOCAB = {token: i for i, token in enumerate(EMBED_SPECIALS + EMBED_WORDS)}


@pytest.fixture
def tokenizer_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokenizer.json"
    write_tokenizer(path)
    return path


def test_short_text_is_untouched_and_not_marked_truncated(tokenizer_file: Path) -> None:
    (encoded,) = TextTokenizer(tokenizer_file, max_length=8).encode_batch(["the cat"])
    assert encoded.ids == [VOCAB["[CLS]"], VOCAB["the"], VOCAB["cat"], VOCAB["[SEP]"]]
    assert not encoded.truncated and encoded.original_length == 4


@pytest.mark.parametrize(("side", "kept"), [("right", ["the", "cat", "sat"]), ("left", ["on", "the", "mat"])])
def test_truncation_cuts_content_keeps_special_tokens_and_reports_it(tokenizer_file: Path, side: str, kept: list[str]) -> None:
    tokenizer = TextTokenizer(tokenizer_file, max_length=5, truncation_side=side)  # type: ignore[arg-type]
    (encoded,) = tokenizer.encode_batch(["the cat sat on the mat"])
    assert encoded.ids == [VOCAB["[CLS]"], *(VOCAB[w] for w in kept), VOCAB["[SEP]"]]
    assert encoded.truncated and encoded.original_length == 8


def test_decode_round_trips_and_out_of_vocabulary_ids_are_refused(tokenizer_file: Path) -> None:
    tokenizer = TextTokenizer(tokenizer_file, max_length=None)
    (encoded,) = tokenizer.encode_batch(["blue sky"])
    assert tokenizer.decode(encoded.ids) == "blue sky"
    with pytest.raises(InvalidInput, match=r"input\[1\]: token id 999"):
        tokenizer.check_ids([2, 999], field="input")


def test_missing_or_symlinked_tokenizer_file_is_rejected(tokenizer_file: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelRejected):
        TextTokenizer(tmp_path / "absent.json", max_length=4)
    link = tmp_path / "link.json"
    link.symlink_to(tokenizer_file)
    with pytest.raises(ModelRejected):
        TextTokenizer(link, max_length=4)
