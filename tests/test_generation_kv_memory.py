"""KV-cache memory: resident only where positions are written, returned when a slot is vacated."""

from __future__ import annotations

import asyncio

import numpy as np
import psutil

from appliance.generation.model_runner import KvGeometry, KvStore
from tests.helpers.generation import TinyDecoders, generate, greedy, make_engine, tiny_decoders  # noqa: F401 - fixture

MIB = 1 << 20


def test_resident_memory_follows_written_positions_not_slots_times_context() -> None:
    geometry = KvGeometry(num_layers=4, num_kv_heads=2, head_dim=64, dtype=np.dtype(np.float32))
    store = KvStore(geometry, max_slots=8, max_len=16384)  # 512 MiB of address space
    process = psutil.Process()
    before = process.memory_info().rss
    for buffer in (*store.keys, *store.values):
        buffer[:, :, :10] = 1.0  # ten positions in every slot, as the attention kernel writes them
    grown = process.memory_info().rss - before
    # On 2 MiB pages each head's first write would make 2 MiB resident: 256 MiB here.
    assert grown < 16 * MIB, f"{grown / MIB:.0f} MiB resident for 10 positions per slot"


def test_forgetting_a_slot_zeroes_it_and_leaves_its_neighbours_alone() -> None:
    # 3,200 bytes per slot: slots share pages, and only whole pages of the slot may go.
    geometry = KvGeometry(num_layers=2, num_kv_heads=1, head_dim=8, dtype=np.dtype(np.float32))
    for max_len in (100, 8192):
        store = KvStore(geometry, max_slots=6, max_len=max_len)
        for buffer in (*store.keys, *store.values):
            buffer[:] = np.arange(6, dtype=np.float32)[:, None, None, None] + 1
        store.forget(2)
        for buffer in (*store.keys, *store.values):
            assert (buffer[1] == 2).all() and (buffer[3] == 4).all()
            # Slot 2 keeps what shares a page with its neighbours and reads zeros elsewhere.
            assert set(np.unique(buffer[2])) <= {0.0, 3.0}
        if max_len == 8192:
            assert all((buffer[2] == 0).all() for buffer in store.keys)


def test_a_finished_sequence_gives_its_slot_memory_back(tiny_decoders: TinyDecoders) -> None:
    # The tiny Llama's slots are 32 KiB (2 KV heads x 256 positions x 16 x 4 bytes): whole pages.
    engine = make_engine(tiny_decoders.llama_fp32)
    try:
        asyncio.run(generate(engine, [5, 17, 42, 99, 150, 7], greedy(12)))
        assert engine.kv.reserved_tokens == 0
        assert all(not buffer.any() for buffer in (*engine.kv_store.keys, *engine.kv_store.values))
    finally:
        engine.stop()
