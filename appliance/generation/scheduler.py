"""The continuous-batching scheduler: which sequences run in the next engine step.

Contract (one call of each per engine step, on the engine thread only):

* `add(seq)` queues a new sequence. When the waiting queue is full it displaces the newest
  waiting sequence of a lower priority (returned, for the engine to refuse with 429), or raises
  CapacityExceeded when there is none: under overload batch work is refused first. (That prompt + max_tokens fits the context and the KV budget was checked once, when
  the request was resolved: params.resolve.)
* `abort(seq_id)` marks a sequence; the next `schedule()` frees its slot and KV reservation, so
  a client that goes away costs at most the step already running.
* `schedule()` returns a `StepPlan`:
  1. retires aborted and timed-out sequences (slots and reservations freed at once), and
     refuses waiting sequences that have waited longer than their queue deadline (reason
     "rejected": the engine answers them 429, before any of their response was sent);
  2. admits waiting sequences while a slot is free and the KV budget covers their worst case
     (prompt + max_tokens): interactive before batch (`params.priority`), in arrival order
     within a priority; a batch sequence that has waited `PRIORITY_AGING_S` ranks as
     interactive, so batch work is delayed but never starved; the last `reserved_slots` free
     slots are kept for interactive work, so it never waits for a batch sequence to finish.
     The next one that does not fit
     blocks the queue, so a large request is not starved by small ones. An admitted prompt
     first takes the longest matching prefix from the prefix cache;
  3. keeps running sequences in slots [0, n) (one contiguous decode batch);
  4. plans at most `prefill_chunk_tokens` prompt tokens of ONE prefilling sequence (the oldest
     of the best priority) plus one decode token for every running sequence. A long prompt is
     therefore cut into chunks that alternate with everybody else's decode steps (chunked
     prefill); while streams decode beside it, the stall limit (stall_limit.py) may cut the
     chunk shorter, so their inter-token gaps stay bounded. While batch-priority sequences
     run, a chunk of an interactive prompt runs
     alone: the decode batch sits that step out, so the interactive time to first token does
     not pay for a dozen batch rows — but never two steps in a row, so running batch streams
     always progress (at worst every other step).
* `finish(seq, reason)` (called by the engine when a stop condition is met) retires the
  sequence and frees its KV at once.

The scheduler never runs the model and never touches token text; the engine does both.
Never imports onnxruntime.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np

from appliance.errors import CapacityExceeded
from appliance.generation.grammar import GrammarState
from appliance.generation.kv_cache import KvCacheManager
from appliance.generation.params import SamplingParams
from appliance.generation.prefix_cache import PrefixCache
from appliance.generation.speculative import SpeculationGate
from appliance.generation.stall_limit import StallLimit
from appliance.generation.text import IncrementalDetokenizer, StopStringFilter

#: A sequence that has waited this long is admitted as if it were interactive (aging).
PRIORITY_AGING_S = 10.0


class Status(Enum):
    WAITING = "waiting"
    PREFILLING = "prefilling"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One sequence being generated (a request with n > 1 owns n of these)."""

    seq_id: str
    prompt: list[int]
    params: SamplingParams
    sink: Callable[[Any], None]
    detokenizer: IncrementalDetokenizer
    #: Called on the engine thread when the sequence gets its slot (before its prefill).
    on_admitted: Callable[[], None] | None = None
    deadline: float | None = None
    #: Past this, a sequence still waiting for a slot is refused rather than admitted late.
    queue_deadline: float | None = None
    submitted_at: float = field(default_factory=time.monotonic)
    output: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    slot: int = -1
    #: Token positions already in the KV cache (prompt first, then outputs).
    num_cached: int = 0
    reserved_tokens: int = 0
    cached_prompt_tokens: int = 0
    first_token_at: float | None = None
    last_token_at: float | None = None
    aborted: bool = False
    finish_reason: str | None = None
    #: Draft model's cached positions (draft-model speculation only).
    draft_cached: int = 0
    gate: SpeculationGate = field(default_factory=SpeculationGate)
    rng: np.random.Generator = field(default_factory=np.random.default_rng)
    stops: StopStringFilter = field(default_factory=lambda: StopStringFilter(()))
    #: Where a constrained sequence stands in its grammar (None: unconstrained).
    grammar: GrammarState | None = None

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def total_tokens(self) -> int:
        return len(self.prompt) + len(self.output)


@dataclass
class PrefillChunk:
    seq: Sequence
    start: int
    end: int

    @property
    def completes_prompt(self) -> bool:
        return self.end == len(self.seq.prompt)


@dataclass
class StepPlan:
    prefill: PrefillChunk | None
    decode: list[Sequence]
    retired: list[Sequence]
    #: Sequences given a slot by this plan (their prefill starts now or in a later step).
    admitted: list[Sequence] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return self.prefill is None and not self.decode


class Scheduler:
    """Iteration-level scheduling over one model's KV cache (see the module docstring)."""

    def __init__(
        self,
        kv: KvCacheManager,
        *,
        max_waiting: int,
        prefill_chunk_tokens: int,
        prefix_cache: PrefixCache | None,
        on_prefix_lookup: Callable[[int, int], None] | None = None,
        reserved_slots: int = 0,
        stall_limit: StallLimit | None = None,
    ) -> None:
        """`reserved_slots`: sequence slots only interactive (or aged) work may take, so an
        interactive request finds one free even when batch work could fill them all.
        `stall_limit`: cuts chunks that run beside decoding streams (None: never cut)."""
        self.kv = kv
        self.stall_limit = stall_limit
        self.reserved_slots = reserved_slots
        self.max_waiting = max_waiting
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.prefix_cache = prefix_cache
        self._on_prefix_lookup = on_prefix_lookup
        self.waiting: deque[Sequence] = deque()
        self.prefilling: list[Sequence] = []
        self.running: list[Sequence] = []
        self._by_id: dict[str, Sequence] = {}
        self._low_waiting = 0
        #: The last step ran an interactive prefill without the decode batch (see schedule 4).
        self._decode_sat_out = False

    # -- requests ------------------------------------------------------------------------
    def add(self, seq: Sequence) -> Sequence | None:
        """Queue `seq`; returns the lower-priority sequence it displaced from a full queue."""
        displaced = None
        if len(self.waiting) >= self.max_waiting:
            displaced = next((other for other in reversed(self.waiting) if other.params.priority > seq.params.priority), None)
            if displaced is None:
                raise CapacityExceeded(f"{len(self.waiting)} sequences are already waiting", retry_after_s=1.0)
            self.finish(displaced, "rejected")
        self.waiting.append(seq)
        if seq.params.priority > 0:
            self._low_waiting += 1
        self._by_id[seq.seq_id] = seq
        return displaced

    @property
    def low_priority_waiting(self) -> int:
        """Waiting sequences below the top priority (read by other threads: a plain int)."""
        return self._low_waiting

    def abort(self, seq_id: str) -> None:
        seq = self._by_id.get(seq_id)
        if seq is not None:
            seq.aborted = True

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    # -- one step ------------------------------------------------------------------------
    def schedule(self, now: float | None = None) -> StepPlan:
        now = time.monotonic() if now is None else now
        retired: list[Sequence] = []
        for group in (self.running, self.prefilling, self.waiting):
            for seq in list(group):
                if seq.aborted or (seq.deadline is not None and now > seq.deadline):
                    self.finish(seq, "abort" if seq.aborted else "timeout")
                    retired.append(seq)
                elif seq.status is Status.WAITING and seq.queue_deadline is not None and now > seq.queue_deadline:
                    self.finish(seq, "rejected")
                    retired.append(seq)
        admitted = self._admit(now)
        self.kv.compact(self.running)
        prefill = None
        decode = list(self.running)
        if self.prefilling:
            seq = min(self.prefilling, key=lambda candidate: candidate.params.priority)  # the oldest of the best
            if seq.params.priority == 0 and not self._decode_sat_out and any(other.params.priority > 0 for other in decode):
                decode = []
            chunk = self.prefill_chunk_tokens
            if decode and self.stall_limit is not None:
                chunk = self.stall_limit.chunk_tokens(chunk)
            prefill = PrefillChunk(seq, seq.num_cached, min(len(seq.prompt), seq.num_cached + chunk))
        self._decode_sat_out = prefill is not None and not decode and bool(self.running)
        return StepPlan(prefill=prefill, decode=decode, retired=retired, admitted=admitted)

    def _admit(self, now: float) -> list[Sequence]:
        admitted: list[Sequence] = []
        while self.waiting:
            seq = self._next_waiting(now, low_may_start=self.kv.free_slots > self.reserved_slots)
            if seq is None:
                break
            need = len(seq.prompt) + seq.params.max_tokens
            if not self.kv.can_admit(need):
                break
            self._remove_waiting(seq)
            admitted.append(seq)
            self.kv.admit(seq, need)
            seq.status = Status.PREFILLING
            if self.prefix_cache is not None:
                length, entry = self.prefix_cache.lookup(seq.prompt)
                if entry is not None:
                    for store in self.kv.stores[:1]:
                        self.prefix_cache.restore(store, seq.slot, entry, length)
                    seq.num_cached = length
                    seq.cached_prompt_tokens = length
                if self._on_prefix_lookup is not None:
                    self._on_prefix_lookup(len(seq.prompt), length)
            self.prefilling.append(seq)
        return admitted

    def _next_waiting(self, now: float, *, low_may_start: bool) -> Sequence | None:
        """The oldest waiting sequence of the best rank (priority, or 0 once it has aged); a
        lower-priority one only while more slots are free than are reserved for interactive work."""
        if not self._low_waiting:
            return self.waiting[0]
        best, best_rank = None, None
        for seq in self.waiting:
            rank = 0 if now - seq.submitted_at >= PRIORITY_AGING_S else seq.params.priority
            if rank > 0 and not low_may_start:
                continue
            if best_rank is None or rank < best_rank:
                best, best_rank = seq, rank
                if rank == 0:
                    break
        return best

    def _remove_waiting(self, seq: Sequence) -> None:
        self.waiting.remove(seq)
        if seq.params.priority > 0:
            self._low_waiting -= 1

    # -- results -------------------------------------------------------------------------
    def prefill_done(self, seq: Sequence) -> None:
        """The prompt is fully cached: remember its prefix, then decode it with the others."""
        if self.prefix_cache is not None:
            self.prefix_cache.insert(self.kv.stores[0], seq.slot, seq.prompt)
        self.prefilling.remove(seq)
        seq.status = Status.RUNNING
        self.running.append(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Retire a sequence and free its slot and KV reservation now."""
        if seq.status is Status.FINISHED:
            return
        for group in (self.running, self.prefilling):
            if seq in group:
                group.remove(seq)
        if seq in self.waiting:
            self._remove_waiting(seq)
        self.kv.release(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = seq.finish_reason or reason
        self._by_id.pop(seq.seq_id, None)
