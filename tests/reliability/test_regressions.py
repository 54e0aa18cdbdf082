"""Bugs the load and fault tests found, pinned at the smallest scale that shows them.

- KV compaction with every slot taken: 64 clients filled all KV slots while some sequences
  were still prefilling; moving a running sequence down needed a free spare slot, found none
  (StopIteration) and failed every running chat with "generation failed". Now the two trade
  places, each keeping its cached rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from appliance.generation.kv_cache import KvCacheManager
from appliance.generation.model_runner import KvGeometry, KvStore

GEOMETRY = KvGeometry(num_layers=2, num_kv_heads=1, head_dim=2, dtype=np.dtype(np.float32))


@dataclass(eq=False)
class Sequence:
    slot: int = -1
    num_cached: int = 0
    reserved_tokens: int = 0


def _fill(store: KvStore, slot: int, value: float, length: int) -> None:
    for buffer in (*store.keys, *store.values):
        buffer[slot, :, :length] = value


def _value(store: KvStore, slot: int, length: int) -> set[float]:
    return {float(x) for buffer in (*store.keys, *store.values) for x in buffer[slot, :, :length].ravel()}


def test_compaction_with_every_slot_taken_swaps_a_running_sequence_down_keeping_both_caches() -> None:
    store = KvStore(GEOMETRY, max_slots=3, max_len=8)
    manager = KvCacheManager([store], budget_bytes=1 << 20, bytes_per_token=GEOMETRY.bytes_per_token)
    prefilling, running_a, running_b = Sequence(num_cached=3), Sequence(num_cached=5), Sequence(num_cached=4)
    for sequence in (prefilling, running_a, running_b):
        manager.admit(sequence, 8)
    assert (prefilling.slot, running_a.slot, running_b.slot) == (0, 1, 2)
    _fill(store, 0, 1.0, 3)
    _fill(store, 1, 2.0, 5)
    _fill(store, 2, 3.0, 4)

    manager.compact([running_a, running_b])  # every slot is owned: no spare to move through

    assert {running_a.slot, running_b.slot} == {0, 1} and prefilling.slot == 2
    assert _value(store, running_a.slot, 5) == {2.0}
    assert _value(store, running_b.slot, 4) == {3.0}
    assert _value(store, prefilling.slot, 3) == {1.0}
    assert manager.free_slots == 0
