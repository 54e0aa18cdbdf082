"""Text around the engine: prompt encoding, streaming detokenisation, stop strings.

Detokenising is incremental (`tokenizers`' DecodeStream), so a multi-byte character split over
tokens is sent only once it is complete. Stop strings are held back while the text might still
be turning into one, so the stop text never reaches the client. Chat templates, which turn
messages into the prompt text encoded here, are chat_template.py's. Never imports onnxruntime.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from appliance.errors import ModelRejected

#: A normalizer may shrink text before it is split (NFC composes, a cleaner drops control
#: characters), so with one the byte bound below allows this much more text per token.
NORMALIZER_SLACK = 4


class PromptTokenizer:
    """The model's tokenizer.json: encode prompts (no truncation: too long is refused), decode."""

    def __init__(self, path: Path, *, add_bos_token: bool = False, bos_token_id: int | None = None) -> None:
        if path.is_symlink() or not path.is_file():
            raise ModelRejected(f"tokenizer file {path.name} is missing or not a regular file", field="tokenizer")
        try:
            self._tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # noqa: BLE001 - the library raises bare Exceptions for bad files
            raise ModelRejected(f"tokenizer file {path.name} cannot be read: {exc}", field="tokenizer") from None
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self.add_bos_token = add_bos_token and bos_token_id is not None
        self.bos_token_id = bos_token_id
        longest = max((len(token.encode("utf-8")) for token in self._tokenizer.get_vocab(with_added_tokens=True)), default=1)
        slack = 1 if self._tokenizer.normalizer is None else NORMALIZER_SLACK
        #: No text of more UTF-8 bytes than this per token can encode to fewer tokens: a
        #: prompt longer than `context x max_bytes_per_token` is refused without tokenising it.
        self.max_bytes_per_token = max(1, longest) * slack

    @property
    def vocab_size(self) -> int:
        return int(self._tokenizer.get_vocab_size(with_added_tokens=True))

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tokenizer.id_to_token(token_id)

    def encode(self, text: str, *, special_text: bool) -> list[int]:
        """Token ids of `text`. `special_text`: the text came from a chat template, so its
        special-token strings (<|im_start|>) are meant as special tokens and a BOS the template
        wrote itself must not be doubled."""
        ids = list(self._tokenizer.encode(text, add_special_tokens=False).ids)
        if self.add_bos_token and self.bos_token_id is not None and (not ids or ids[0] != self.bos_token_id):
            ids.insert(0, self.bos_token_id)
        return ids

    def encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` for several texts in one call that releases the GIL while it works, so a
        large prompt tokenised in a worker thread does not stall the event loop."""
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        result = []
        for encoding in encodings:
            ids = list(encoding.ids)
            if self.add_bos_token and self.bos_token_id is not None and (not ids or ids[0] != self.bos_token_id):
                ids.insert(0, self.bos_token_id)
            result.append(ids)
        return result

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tokenizer.decode(list(ids), skip_special_tokens=True))

    def stream(self, *, skip_special_tokens: bool = True) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self._tokenizer, skip_special_tokens=skip_special_tokens)

    def json_text(self) -> str:
        """The tokenizer as tokenizer.json text (what llguidance and special-token lookups read)."""
        return str(self._tokenizer.to_str())

    def token_text(self, token_id: int) -> tuple[str, list[int]]:
        """One token on its own, for logprobs entries: its text and its exact bytes.

        A byte-level BPE token can hold part of a UTF-8 character; its text then shows U+FFFD
        but its bytes are exact, so a client can join the bytes of consecutive tokens."""
        text = str(self._tokenizer.decode([token_id], skip_special_tokens=False))
        piece = self._tokenizer.id_to_token(token_id) or ""
        if piece and all(char in _BYTE_LEVEL_DECODE for char in piece):
            return text, [_BYTE_LEVEL_DECODE[char] for char in piece]
        return text, list(text.encode("utf-8"))


def _byte_level_table() -> dict[str, int]:
    """GPT-2's printable stand-ins for the 256 byte values (byte-level BPE vocabularies)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1)) + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    table: dict[str, int] = {chr(value): value for value in printable}
    extra = 0
    for value in range(256):
        if value not in printable:
            table[chr(256 + extra)] = value
            extra += 1
    return table


_BYTE_LEVEL_DECODE = _byte_level_table()


class IncrementalDetokenizer:
    """Turns one sequence's new token ids into new text, holding incomplete characters back."""

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True) -> None:
        """`skip_special_tokens=False` keeps markers such as Mistral's [TOOL_CALLS] in the text,
        for an answer parsed for tool calls."""
        self._tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)

    def step(self, token_id: int) -> str:
        return self._stream.step(self._tokenizer, token_id) or ""


class StopStringFilter:
    """Streams text through while withholding anything that might still become a stop string.

    `push` returns (text safe to send now, True when a stop string completed). Text from the
    stop string on is dropped, as OpenAI does.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [stop for stop in stops if stop]
        self._pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        if not self._stops:
            return text, False
        self._pending += text
        hits = [index for index in (self._pending.find(stop) for stop in self._stops) if index >= 0]
        if hits:
            safe = self._pending[: min(hits)]
            self._pending = ""
            return safe, True
        keep = 0
        for stop in self._stops:
            for length in range(min(len(stop) - 1, len(self._pending)), 0, -1):
                if self._pending.endswith(stop[:length]):
                    keep = max(keep, length)
                    break
        safe = self._pending[: len(self._pending) - keep]
        self._pending = self._pending[len(self._pending) - keep :]
        return safe, False

    def flush(self) -> str:
        """What was held back, once the sequence ends for another reason."""
        text, self._pending = self._pending, ""
        return text
