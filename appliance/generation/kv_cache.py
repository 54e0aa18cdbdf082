"""KV-cache slots and the memory budget: who owns which row of the preallocated KV buffers.

Admission reserves a sequence's worst case (prompt + max_tokens positions) against the byte
budget up front, so a running sequence can never run out of cache mid-answer and nothing is
ever preempted; what does not fit waits. (A request that could not fit even into an empty
cache is refused before it gets here, by params.resolve, with a message that states the limit.) Running sequences are kept in
slots [0, n) (`compact`) because the decode batch binds that range as one numpy view; moving a
row happens only when a sequence leaves or starts decoding, never per step.

Never imports onnxruntime; never allocates per step (only the rare swap of two sequences when
every slot is taken copies one of them). A vacated slot's memory is returned to the system at
once (`KvStore.forget`), so resident KV memory follows the reservations, not slots x context.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from appliance.generation.model_runner import KvBuffers


class SlotOwner(Protocol):
    slot: int
    num_cached: int
    reserved_tokens: int


class KvCacheManager:
    """Slots and reservations over one KV store (and the draft model's, moved alongside)."""

    def __init__(self, stores: list[KvBuffers], *, budget_bytes: int, bytes_per_token: int) -> None:
        self.stores = stores
        self.max_slots = stores[0].max_slots
        self.max_len = stores[0].max_len
        self.bytes_per_token = bytes_per_token
        self.budget_tokens = max(budget_bytes // bytes_per_token, 1)
        self.reserved_tokens = 0
        self._owners: dict[int, SlotOwner] = {}

    @property
    def usage(self) -> float:
        return self.reserved_tokens / self.budget_tokens

    @property
    def free_slots(self) -> int:
        return self.max_slots - len(self._owners)

    def can_admit(self, tokens: int) -> bool:
        return self.free_slots > 0 and self.reserved_tokens + tokens <= self.budget_tokens

    def admit(self, owner: SlotOwner, tokens: int) -> None:
        # The lowest free slot: running rows fill [0, n), so a prompt admitted now usually sits
        # exactly where it will decode and never moves.
        slot = next(index for index in range(self.max_slots) if index not in self._owners)
        owner.slot = slot
        owner.reserved_tokens = tokens
        self._owners[slot] = owner
        self.reserved_tokens += tokens

    def release(self, owner: SlotOwner) -> None:
        if self._owners.get(owner.slot) is owner:
            del self._owners[owner.slot]
            self.reserved_tokens -= owner.reserved_tokens
            owner.reserved_tokens = 0
            self._vacate(owner.slot)
        owner.slot = -1

    def _vacate(self, slot: int) -> None:
        """A slot nobody owns any more: its memory goes back to the system at once."""
        for store in self.stores:
            store.forget(slot)

    def compact(self, running: Iterable[SlotOwner]) -> None:
        """Move running sequences into slots [0, n), displacing prefilling ones upward."""
        running = list(running)
        count = len(running)
        outside = [owner for owner in running if owner.slot >= count]
        for owner in outside:
            target = next(index for index in range(count) if self._owners.get(index) not in running)
            occupant = self._owners.get(target)
            if occupant is None:
                self._move(owner, target)
                continue
            spare = next((index for index in range(self.max_slots - 1, count - 1, -1) if index not in self._owners), None)
            if spare is None:
                # Every slot is taken (a full batch with some still prefilling): trade places.
                self._swap(owner, occupant)
            else:
                self._move(occupant, spare)
                self._move(owner, target)

    def _swap(self, owner: SlotOwner, occupant: SlotOwner) -> None:
        """Exchange two sequences' slots through a copy of the occupant's rows (only when no
        slot is free, so the usual move-into-a-spare cannot be used)."""
        saved = [store.read(occupant.slot, occupant.num_cached) for store in self.stores]
        here, there = owner.slot, occupant.slot
        for store in self.stores:
            store.move_slot(here, there, owner.num_cached)
        for store, rows in zip(self.stores, saved, strict=True):
            store.write(here, rows, occupant.num_cached)
        owner.slot, occupant.slot = there, here
        self._owners[there], self._owners[here] = owner, occupant

    def _move(self, owner: SlotOwner, target: int) -> None:
        source = owner.slot
        for store in self.stores:
            store.move_slot(source, target, owner.num_cached)
        del self._owners[source]
        owner.slot = target
        self._owners[target] = owner
        self._vacate(source)
