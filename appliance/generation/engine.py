"""The generation engine: one model, one thread, continuous batching over a shared KV buffer.

This module builds an engine and is its public face. Building opens the tokenizer and chat
template, puts the target (and draft) decoder where placement.py decides, sizes the KV budget,
and wires the parts that run it: the scheduler (who runs in the next step), `StepLoop` (the
engine thread), `Speculator` (a lone sequence's speculative steps) and `Emitter` (tokens to
events). `generate()` returns a `SequenceStream`, the async iterator of one sequence's
`TokenEvent`s; closing it early (client disconnect, deadline) aborts the sequence, so its slot
and KV are freed at the start of the next engine step.

Never runs the model or touches a submitted sequence (the engine thread does); never imports
torch or transformers.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil

from appliance.config import GenerationSettings, ProviderChoice
from appliance.errors import ModelRejected, ShuttingDown
from appliance.generation.chat_template import ChatTemplate
from appliance.generation.emission import Emitter
from appliance.generation.events import TokenEvent
from appliance.generation.grammar import CompiledGrammar, Constraint, GrammarCompiler
from appliance.generation.kv_cache import KvCacheManager
from appliance.generation.metrics import GenerationMetrics, LabelledMetrics
from appliance.generation.model_runner import KvGeometry
from appliance.generation.params import GenerationRequest, ModelLimits, resolve
from appliance.generation.placement import Placement, place_decoder
from appliance.generation.prefix_cache import PrefixCache
from appliance.generation.scheduler import Scheduler, Sequence
from appliance.generation.speculative import MAX_DRAFT_TOKENS, DraftModel, PromptLookupDrafter, Speculator, VerificationCost
from appliance.generation.stall_limit import StallLimit
from appliance.generation.step_loop import StepLoop
from appliance.generation.stream import SequenceStream
from appliance.generation.text import PromptTokenizer, StopStringFilter
from appliance.repository.manifest import Manifest
from appliance.repository.store import ModelVersion

log = logging.getLogger(__name__)

#: One sequence slot in this many is kept for interactive work (none below this many slots):
#: with batch work holding every other slot, an interactive request still starts at once.
INTERACTIVE_SLOT_SHARE_DIVISOR = 8
#: Share of the KV budget the prefix cache may hold in copies.
PREFIX_CACHE_SHARE = 0.25
#: Share of available memory the KV budget takes by default.
DEFAULT_KV_SHARE_OF_FREE = 0.25
#: Share of the request deadline a sequence may spend waiting for a slot, unless
#: `generation.max_queue_wait_s` says otherwise. Refused then, the client hears 429 before any
#: of its answer was sent; admitted later, it would likely run into the deadline with part of
#: its answer already streamed (measured: docs/RELIABILITY.md).
DEFAULT_QUEUE_WAIT_SHARE = 0.25


class GenerationEngine:
    """One decoder model served with continuous batching (see the module docstring)."""

    def __init__(
        self,
        name: str,
        manifest: Manifest,
        version_path: Path,
        settings: GenerationSettings,
        *,
        threads: int | None = None,
        draft_version: ModelVersion | None = None,
        max_len: int | None = None,
        metrics: GenerationMetrics | None = None,
        providers: ProviderChoice = "auto",
        cuda_device_id: int = 0,
        placement: Placement | None = None,
    ) -> None:
        """`providers` / `cuda_device_id`: the server's provider settings (placement.py decides
        CPU or GPU from them and the graph); `placement` forces the decision (tests)."""
        spec = manifest.generation
        if spec is None or manifest.task != "text-generation":
            raise ModelRejected(f"{name} is not a text-generation model", field="model")
        self.name = name
        self.metrics = metrics or GenerationMetrics()
        self.manifest = manifest
        self.spec = spec
        self.settings = settings
        tokenizer_spec = manifest.tokenizer
        self.tokenizer = PromptTokenizer(
            version_path / (tokenizer_spec.file if tokenizer_spec else "tokenizer.json"),
            add_bos_token=bool(tokenizer_spec and tokenizer_spec.add_bos_token),
            bos_token_id=spec.bos_token_id,
        )
        self.chat_template = (
            ChatTemplate(
                manifest.chat_template,
                bos_token=tokenizer_spec.bos_token if tokenizer_spec else None,
                eos_token=tokenizer_spec.eos_token if tokenizer_spec else None,
            )
            if manifest.chat_template
            else None
        )
        self.eos_ids = frozenset(spec.eos_token_ids)
        self.grammars = GrammarCompiler(
            version_path / (tokenizer_spec.file if tokenizer_spec else "tokenizer.json"), vocab_size=spec.vocab_size, eos_ids=self.eos_ids
        )
        self.context_length = min(spec.context_length, max_len or spec.context_length)
        geometry = KvGeometry.from_spec(spec)
        max_slots = settings.max_running_sequences
        width = max(max_slots, settings.prefill_chunk_tokens, MAX_DRAFT_TOKENS + 1)
        # With a draft model the two sessions take turns on the same cores; each parks its pool
        # when its run returns. Measured on the 2-core box (fp32 target, int4 draft): a
        # one-thread draft beside a spinning target could not pay for itself (speculation
        # switched off, 49-55 tok/s); both on two threads that park: 61-64 tok/s against
        # 46-51 plain (docs/BENCHMARKS.md).
        takes_turns = draft_version is not None
        target = place_decoder(
            version_path / manifest.model_file, spec, max_slots=max_slots, context=self.context_length, width=width,
            choice=providers, device_id=cuda_device_id, threads=threads, takes_turns=takes_turns, forced=placement,
        )
        self.placement, self.context_length = target.placement, target.context
        self.kv_store, self.runner = target.store, target.runner
        stores = [self.kv_store]
        self.draft: DraftModel | None = None
        if draft_version is not None and draft_version.manifest.generation is not None:
            draft_spec = draft_version.manifest.generation
            if draft_spec.vocab_size != spec.vocab_size:
                raise ModelRejected(f"draft model {draft_version.name} has another vocabulary", field="draft")
            drafter = place_decoder(
                draft_version.model_path, draft_spec, max_slots=max_slots, context=self.context_length, width=width,
                choice=providers, device_id=cuda_device_id, threads=threads, takes_turns=True, forced=placement,
            )
            if drafter.context < self.context_length:
                # The target serves without speculation rather than not at all.
                log.warning("%s: the draft model's KV cache does not fit beside the target's; serving without it", name)
            else:
                self.draft = DraftModel(drafter.runner, drafter.store)
                stores.append(drafter.store)
        # Host KV pages follow use, so the default budget is a share of free memory; GPU memory
        # is reserved up front for every slot's context, so all of it is the budget.
        on_host = self.placement.device == "cpu" and not self.placement.device_store
        budget = settings.kv_budget_bytes or (
            int(psutil.virtual_memory().available * DEFAULT_KV_SHARE_OF_FREE) if on_host else sum(store.nbytes for store in stores)
        )
        self.kv = KvCacheManager(stores, budget_bytes=budget, bytes_per_token=geometry.bytes_per_token * len(stores))
        prefix = PrefixCache(int(budget * PREFIX_CACHE_SHARE)) if settings.prefix_cache else None
        stall_limit = StallLimit(settings.decode_stall_factor)
        self.scheduler = Scheduler(
            self.kv,
            max_waiting=settings.max_waiting_sequences,
            prefill_chunk_tokens=settings.prefill_chunk_tokens,
            prefix_cache=prefix,
            on_prefix_lookup=self._count_prefix_lookup,
            reserved_slots=max_slots // INTERACTIVE_SLOT_SHARE_DIVISOR,
            stall_limit=stall_limit,
        )
        self._ids = itertools.count()
        self._m = LabelledMetrics(self.metrics, name)
        self.counters = {"prefix_queries": 0, "prefix_hits": 0, "draft_tokens": 0, "accepted_tokens": 0, "forced_tokens": 0, "steps": 0, "preempted_steps": 0}
        self.prompt_lookup = PromptLookupDrafter()
        emitter = Emitter(
            name=name, eos_ids=self.eos_ids, context_length=self.context_length, scheduler=self.scheduler, metrics=self._m
        )
        self._speculator = Speculator(
            name=name,
            mode=settings.speculative if (settings.speculative != "draft" or self.draft) else "prompt-lookup",
            runner=self.runner,
            draft=self.draft,
            context_length=self.context_length,
            prefill_chunk_tokens=settings.prefill_chunk_tokens,
            prompt_lookup=self.prompt_lookup,
            cost=VerificationCost(),
            emitter=emitter,
            metrics=self._m,
            counters=self.counters,
            skip_forced_tokens=settings.skip_forced_tokens,
        )
        self._steps = StepLoop(
            name=name,
            runner=self.runner,
            scheduler=self.scheduler,
            kv=self.kv,
            emitter=emitter,
            speculator=self._speculator,
            stall_limit=stall_limit,
            metrics=self._m,
            counters=self.counters,
        )

    # -- speculation settings, read by the engine thread at every step -------------------
    @property
    def speculative(self) -> str:
        """The speculation method in use: "off", "prompt-lookup" or "draft" ("draft" only
        with a draft model; asked for without one, prompt lookup stands in)."""
        return self._speculator.mode

    @speculative.setter
    def speculative(self, mode: str) -> None:
        self._speculator.mode = mode

    @property
    def cost(self) -> VerificationCost:
        """What speculation costs on this box; replaceable on a live engine (tests hold it fixed)."""
        return self._speculator.cost

    @cost.setter
    def cost(self, cost: VerificationCost) -> None:
        self._speculator.cost = cost

    # -- lifecycle -----------------------------------------------------------------------
    @classmethod
    def from_version(cls, version: ModelVersion, settings: GenerationSettings, **kwargs: object) -> GenerationEngine:
        return cls(version.name, version.manifest, version.path, settings, **kwargs)  # type: ignore[arg-type]

    def start(self) -> None:
        self._steps.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Abort everything still queued or running and stop the thread."""
        self._steps.stop(timeout_s)

    # -- submission (any thread) ---------------------------------------------------------
    @property
    def limits(self) -> ModelLimits:
        """What one request may ask of this engine (the one check, params.resolve, reads it)."""
        kv = self.kv
        limit = min(kv.max_len, kv.budget_tokens)
        return ModelLimits(
            context_length=self.context_length,
            vocab_size=self.spec.vocab_size,
            max_tokens_limit=self.settings.max_tokens_limit,
            kv_limit_tokens=limit,
            kv_detail=f"(context {kv.max_len}, KV budget {kv.budget_tokens} tokens)",
            defaults=self.spec.defaults,
        )

    def submit(
        self,
        prompt_ids: list[int],
        request: GenerationRequest,
        sink: Callable[[TokenEvent], None],
        *,
        timeout_s: float | None = None,
        on_admitted: Callable[[], None] | None = None,
        queue_limit: bool = True,
    ) -> str:
        """Check the request (once: params.resolve) and queue one sequence; raises
        InvalidInput / CapacityExceeded / ShuttingDown at once.

        `on_admitted` is called (on the engine thread) when the sequence gets its slot; a
        sequence refused before that gets one final event carrying CapacityExceeded.
        `queue_limit=False`: wait for a slot as long as the deadline allows (the later choices
        of a request, queued behind its first one, wait for their siblings, not for a busy
        engine)."""
        if self._steps.stopping:
            raise ShuttingDown("the generation engine is stopping")
        params = resolve(request, prompt_ids, self.limits)
        now = time.monotonic()
        queue_wait = self.settings.max_queue_wait_s if queue_limit else None
        if queue_wait is None and timeout_s and queue_limit:
            queue_wait = timeout_s * DEFAULT_QUEUE_WAIT_SHARE
        seq = Sequence(
            seq_id=f"{self.name}-{next(self._ids)}",
            prompt=list(prompt_ids),
            params=params,
            sink=sink,
            on_admitted=on_admitted,
            detokenizer=self.tokenizer.stream(skip_special_tokens=params.skip_special_tokens),
            deadline=(now + timeout_s) if timeout_s else None,
            queue_deadline=(now + queue_wait) if queue_wait else None,
            submitted_at=now,
            rng=np.random.default_rng(params.seed),
            stops=StopStringFilter(params.stop),
            grammar=params.grammar.start() if params.grammar is not None else None,
        )
        self._steps.put(seq)
        return seq.seq_id

    def abort(self, seq_id: str) -> None:
        self._steps.abort(seq_id)

    async def compile(self, constraint: Constraint) -> CompiledGrammar:
        """A constraint compiled for this model (cached; off the event loop; bounded in time)."""
        return await self.grammars.compile(constraint)

    def generate(
        self, prompt_ids: list[int], request: GenerationRequest, *, timeout_s: float | None = None, queue_limit: bool = True
    ) -> SequenceStream:
        """Submit now (errors raise here, before any response is sent) and return the events.

        Must be called from the event loop that will consume the stream."""
        return SequenceStream(self, prompt_ids, request, timeout_s, queue_limit=queue_limit)

    def stats(self) -> dict[str, float]:
        queries = self.counters["prefix_queries"]
        drafted = self.counters["draft_tokens"]
        return {
            "running": float(len(self.scheduler.running) + len(self.scheduler.prefilling)),
            "waiting": float(len(self.scheduler.waiting)),
            "kv_cache_usage": self.kv.usage,
            "prefix_cache_hit_rate": self.counters["prefix_hits"] / queries if queries else 0.0,
            "spec_acceptance_rate": self.counters["accepted_tokens"] / drafted if drafted else 0.0,
            "forced_tokens": float(self.counters["forced_tokens"]),
            "steps": float(self.counters["steps"]),
            "preempted_steps": float(self.counters["preempted_steps"]),
        }

    def _count_prefix_lookup(self, queried: int, hit: int) -> None:
        """The scheduler's report of one prefix-cache lookup, in prompt tokens."""
        self.counters["prefix_queries"] += queried
        self.counters["prefix_hits"] += hit
        self._m.prefix_cache_queries.inc(queried)
        self._m.prefix_cache_hits.inc(hit)
