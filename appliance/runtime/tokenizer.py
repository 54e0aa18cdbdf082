"""Text to token ids and back with a model version's `tokenizer.json` (the `tokenizers` library).

Generic (encode a batch with truncation and its report, decode) so any engine can use it.
Truncation is never silent: every
encoding says whether it was cut and how long it was before. Never imports onnxruntime,
torch or transformers, and never downloads anything (the file must be in the version folder).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tokenizers import Tokenizer

from appliance.errors import InvalidInput, ModelRejected

#: Pair length when the model declares no max_length (the position table bounds it anyway).
PAIR_LENGTH_UNLIMITED = 1 << 20


@dataclass(frozen=True)
class Encoded:
    """One text's token ids after truncation, with what truncation did to it."""

    ids: list[int]
    #: Tokens the text had before truncation (special tokens included).
    original_length: int

    @property
    def truncated(self) -> bool:
        return self.original_length > len(self.ids)


@dataclass(frozen=True)
class EncodedPair:
    """A query-document pair as the model's template joins them, with token types."""

    ids: list[int]
    type_ids: list[int]
    #: Document tokens before and after truncation.
    document_tokens: int
    kept_document_tokens: int

    @property
    def truncated(self) -> bool:
        return self.kept_document_tokens < self.document_tokens


class TextTokenizer:
    """A loaded `tokenizer.json` with the model's truncation rule applied on purpose.

    Thread-safe for encoding and decoding (the `tokenizers` object is not mutated after
    construction), so batches of requests can be encoded from worker threads.
    """

    def __init__(
        self,
        path: Path,
        *,
        max_length: int | None,
        truncation_side: Literal["left", "right"] = "right",
    ) -> None:
        if path.is_symlink() or not path.is_file():
            raise ModelRejected(f"tokenizer file {path.name} is missing or not a regular file", field="tokenizer")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # noqa: BLE001 - the library raises bare Exceptions for bad files
            raise ModelRejected(f"tokenizer file {path.name} cannot be read: {exc}", field="tokenizer") from None
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self._tokenizer = tokenizer
        self.max_length = max_length
        self.truncation_side = truncation_side

    @property
    def vocab_size(self) -> int:
        return int(self._tokenizer.get_vocab_size(with_added_tokens=True))

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def encode_batch(self, texts: Sequence[str], *, add_special_tokens: bool = True) -> list[Encoded]:
        """Encode texts and truncate each to `max_length`, keeping special tokens at the ends.

        Truncation happens here rather than inside `tokenizers` so that the original length
        is known exactly and can be reported to the client.
        """
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        extra = self._tokenizer.num_special_tokens_to_add(False) if add_special_tokens else 0
        result: list[Encoded] = []
        for encoding in encodings:
            ids = list(encoding.ids)
            result.append(Encoded(ids=self._truncate(ids, encoding.special_tokens_mask, extra), original_length=len(ids)))
        return result

    def _truncate(self, ids: list[int], special_mask: Sequence[int], special_count: int) -> list[int]:
        limit = self.max_length
        if limit is None or len(ids) <= limit:
            return ids
        if special_count == 0 or special_count >= limit:
            return ids[:limit] if self.truncation_side == "right" else ids[-limit:]
        # Keep the special tokens the post-processor added ([CLS] ... [SEP]) and cut content.
        head = 0
        while head < len(ids) and special_mask[head]:
            head += 1
        tail = 0
        while tail < len(ids) - head and special_mask[len(ids) - 1 - tail]:
            tail += 1
        content = ids[head : len(ids) - tail]
        keep = max(limit - head - tail, 0)
        content = content[:keep] if self.truncation_side == "right" else content[len(content) - keep :]
        return ids[:head] + content + ids[len(ids) - tail :]

    def encode_pairs(self, query: str, documents: Sequence[str], *, max_document_tokens: int | None = None) -> list[EncodedPair]:
        """(query, document) pairs joined by the model's own template (`[CLS] q [SEP] d [SEP]`
        for BERT, `<s> q </s></s> d </s>` for RoBERTa, with token types), each document cut,
        never the query, so that the pair fits `max_length` (and `max_document_tokens`). A
        query that leaves no room for a document is refused naming `query`."""
        query_encoding = self._tokenizer.encode(query, add_special_tokens=False)
        limit = self.max_length or PAIR_LENGTH_UNLIMITED
        room = limit - self._tokenizer.num_special_tokens_to_add(True) - len(query_encoding.ids)
        if room < 1:
            raise InvalidInput(
                f"query: {len(query_encoding.ids)} tokens leave no room for a document in this model's {limit}", field="query"
            )
        if max_document_tokens is not None:
            room = min(room, max_document_tokens)
        pairs: list[EncodedPair] = []
        for document in self._tokenizer.encode_batch(list(documents), add_special_tokens=False):
            length = len(document.ids)
            if length > room:
                document.truncate(room)
            joined = self._tokenizer.post_process(query_encoding, document, add_special_tokens=True)
            pairs.append(EncodedPair(list(joined.ids), list(joined.type_ids), length, min(length, room)))
        return pairs

    def check_ids(self, ids: Sequence[int], *, field: str, label: str | None = None) -> None:
        """Refuse token ids outside the vocabulary (they would index past the embedding table)."""
        vocab = self.vocab_size
        for position, token in enumerate(ids):
            if not 0 <= token < vocab:
                raise InvalidInput(
                    f"{label or field}[{position}]: token id {token} is outside the vocabulary (0..{vocab - 1})",
                    field=field,
                )

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return str(self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def decode_batch(self, batch: Sequence[Sequence[int]], *, skip_special_tokens: bool = True) -> list[str]:
        return [str(text) for text in self._tokenizer.decode_batch([list(ids) for ids in batch], skip_special_tokens=skip_special_tokens)]
