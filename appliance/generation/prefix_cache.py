"""Reuse of the KV of repeated prompt prefixes (a long system prompt sent with every request).

A prompt is cut into blocks of BLOCK_TOKENS tokens; block i's key is a hash chained over blocks
0..i, so equal keys mean equal prefixes. After a prefill, the KV of the prompt's whole blocks is
copied out once and every block key of that prompt points at the copy. A later prompt looks up
its own block keys from the longest down, copies the KV of the longest match into its slot and
prefills only the rest. Copies are bounded by a byte budget (least recently used entries go).

Hit rate = cached prompt tokens / prompt tokens looked up (metrics). Never imports onnxruntime.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from appliance.generation.model_runner import KvBuffers

BLOCK_TOKENS = 32


@dataclass
class _Entry:
    tokens: tuple[int, ...]
    kv: list[np.ndarray]
    nbytes: int


def block_keys(tokens: Sequence[int]) -> list[int]:
    """One chained hash per whole block of `tokens`."""
    keys: list[int] = []
    previous = 0
    for start in range(0, len(tokens) - BLOCK_TOKENS + 1, BLOCK_TOKENS):
        previous = hash((previous, tuple(tokens[start : start + BLOCK_TOKENS])))
        keys.append(previous)
    return keys


class PrefixCache:
    """LRU of prefix KV copies, looked up by chained block hashes."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.nbytes = 0
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._index: dict[int, tuple[int, int]] = {}  # block key -> (entry key, blocks)

    def lookup(self, tokens: Sequence[int]) -> tuple[int, _Entry | None]:
        """Longest cached prefix of `tokens` (a whole number of blocks), leaving at least one
        token to prefill so the last position's logits are computed."""
        keys = block_keys(tokens[: max(len(tokens) - 1, 0)])
        for blocks in range(len(keys), 0, -1):
            found = self._index.get(keys[blocks - 1])
            if found is None:
                continue
            entry = self._entries.get(found[0])
            if entry is None:
                continue
            length = blocks * BLOCK_TOKENS
            if tuple(tokens[:length]) != entry.tokens[:length]:
                continue  # hash collision: never trust a hash alone
            self._entries.move_to_end(found[0])
            return length, entry
        return 0, None

    def restore(self, store: KvBuffers, slot: int, entry: _Entry, length: int) -> None:
        store.write(slot, entry.kv, length)

    def insert(self, store: KvBuffers, slot: int, tokens: Sequence[int]) -> None:
        """Remember the whole-block prefix of a just-prefilled prompt (if not already known)."""
        keys = block_keys(tokens[: max(len(tokens) - 1, 0)])
        if not keys:
            return
        last = keys[-1]
        if last in self._index:
            return
        length = len(keys) * BLOCK_TOKENS
        kv = store.read(slot, length)
        nbytes = sum(part.nbytes for part in kv)
        if nbytes > self.budget_bytes:
            return
        while self.nbytes + nbytes > self.budget_bytes and self._entries:
            self._evict()
        self._entries[last] = _Entry(tuple(tokens[:length]), kv, nbytes)
        self.nbytes += nbytes
        for blocks, key in enumerate(keys, start=1):
            self._index[key] = (last, blocks)

    def _evict(self) -> None:
        key, entry = self._entries.popitem(last=False)
        self.nbytes -= entry.nbytes
        for index_key in [k for k, (owner, _) in self._index.items() if owner == key]:
            del self._index[index_key]
