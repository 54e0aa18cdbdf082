"""The generation engine: one model, one thread, continuous batching over a shared KV buffer.

The API layer sees only `EngineClient` (vLLM's EngineClient idea): `generate()` is an async
iterator of `TokenEvent`s for one sequence, `abort()` frees it, `stats()` reports. Closing the
iterator early (client disconnect, deadline) aborts the sequence, so its slot and KV are freed
at the start of the next engine step.

The engine thread loops: take new sequences and aborts from the inbox, ask the scheduler for a
step, run at most one prefill chunk and one batched decode run (ONNX Runtime releases the GIL
while it computes), sample all rows at once, turn tokens into text, and hand every sequence its
event with one thread-safe call. With a single running sequence, speculative decoding replaces
the decode run (prompt lookup or a draft model; one verification run of the target).

Never imports torch or transformers; never copies the KV cache per step.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence as Seq
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import psutil

from appliance.config import GenerationSettings, ProviderChoice
from appliance.errors import ApplianceError, CapacityExceeded, DeadlineExceeded, InvalidInput, ModelRejected, ShuttingDown
from appliance.generation.metrics import GenerationMetrics
from appliance.generation.kv_cache import KvCacheManager
from appliance.generation.model_runner import DecoderRunner, KvBuffers, KvGeometry
from appliance.generation.placement import Placement, place_decoder
from appliance.generation.params import TOP_LOGPROBS_MAX, SamplingParams
from appliance.generation.prefix_cache import PrefixCache
from appliance.generation.scheduler import PrefillChunk, Scheduler, Sequence, Status
from appliance.generation.speculative import (
    MAX_DRAFT_TOKENS,
    PromptLookupDrafter,
    VerificationCost,
    accept_greedy,
    accept_sampled,
)
from appliance.generation.text import ChatTemplate, PromptTokenizer, StopStringFilter
from appliance.kernels.sampling import SamplingArrays, filtered_probs, sample
from appliance.kernels.sampling_onnx import GreedyLogprobsKernel
from appliance.repository.manifest import Manifest
from appliance.repository.store import ModelVersion

log = logging.getLogger(__name__)

#: Speculate only while at most this many sequences run: a batched decode run already
#: amortises the per-step cost, and verification runs one sequence at a time.
SPECULATE_MAX_RUNNING = 1
#: Timing runs before serving when speculation is on: what a plain step, a full-width
#: verification and a draft step cost here (also warms the sessions up).
CALIBRATION_PAST_TOKENS = 32
CALIBRATION_RUNS = 3
#: Share of the KV budget the prefix cache may hold in copies.
PREFIX_CACHE_SHARE = 0.25
#: Share of available memory the KV budget takes by default.
DEFAULT_KV_SHARE_OF_FREE = 0.25
#: Share of the request deadline a sequence may spend waiting for a slot, unless
#: `generation.max_queue_wait_s` says otherwise. Refused then, the client hears 429 before any
#: of its answer was sent; admitted later, it would likely run into the deadline with part of
#: its answer already streamed (measured: docs/RELIABILITY.md).
DEFAULT_QUEUE_WAIT_SHARE = 0.25
#: Retry-After of a sequence refused after waiting: about when a busy engine frees a slot.
QUEUE_REFUSAL_RETRY_AFTER_S = 1.0


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class TokenEvent:
    """New output of one sequence since its previous event."""

    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    error: ApplianceError | None = None


class EngineClient(Protocol):
    """What the HTTP layer may do with a generation engine."""

    name: str
    tokenizer: PromptTokenizer
    chat_template: ChatTemplate | None
    context_length: int

    def generate(
        self, prompt_ids: list[int], params: SamplingParams, *, timeout_s: float | None = None, queue_limit: bool = True
    ) -> SequenceStream: ...

    def stats(self) -> dict[str, float]: ...


@dataclass
class _Draft:
    runner: DecoderRunner
    store: KvBuffers


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
        self.draft: _Draft | None = None
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
                self.draft = _Draft(drafter.runner, drafter.store)
                stores.append(drafter.store)
        # Host KV pages follow use, so the default budget is a share of free memory; GPU memory
        # is reserved up front for every slot's context, so all of it is the budget.
        on_host = self.placement.device == "cpu" and not self.placement.device_store
        budget = settings.kv_budget_bytes or (
            int(psutil.virtual_memory().available * DEFAULT_KV_SHARE_OF_FREE) if on_host else sum(store.nbytes for store in stores)
        )
        self.kv = KvCacheManager(stores, budget_bytes=budget, bytes_per_token=geometry.bytes_per_token * len(stores))
        prefix = PrefixCache(int(budget * PREFIX_CACHE_SHARE)) if settings.prefix_cache else None
        self.scheduler = Scheduler(
            self.kv,
            max_waiting=settings.max_waiting_sequences,
            prefill_chunk_tokens=settings.prefill_chunk_tokens,
            prefix_cache=prefix,
            on_prefix_lookup=self._count_prefix_lookup,
        )
        self.speculative = settings.speculative if (settings.speculative != "draft" or self.draft) else "prompt-lookup"
        self.prompt_lookup = PromptLookupDrafter()
        self.cost = VerificationCost()
        self._logprob_kernel = GreedyLogprobsKernel(TOP_LOGPROBS_MAX)
        self._inbox: list[Sequence] = []
        self._aborts: list[str] = []
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._ids = itertools.count()
        self._labels = {"model": name}
        self._m = _LabelledMetrics(self.metrics, name)
        self.counters = {"prefix_queries": 0, "prefix_hits": 0, "draft_tokens": 0, "accepted_tokens": 0, "steps": 0}

    # -- lifecycle -----------------------------------------------------------------------
    @classmethod
    def from_version(cls, version: ModelVersion, settings: GenerationSettings, **kwargs: object) -> GenerationEngine:
        return cls(version.name, version.manifest, version.path, settings, **kwargs)  # type: ignore[arg-type]

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=f"generation-{self.name}", daemon=True)
            self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Abort everything still queued or running and stop the thread."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    # -- submission (any thread) ---------------------------------------------------------
    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        sink: Callable[[TokenEvent], None],
        *,
        timeout_s: float | None = None,
        on_admitted: Callable[[], None] | None = None,
        queue_limit: bool = True,
    ) -> str:
        """Queue one sequence; raises InvalidInput / CapacityExceeded / ShuttingDown at once.

        `on_admitted` is called (on the engine thread) when the sequence gets its slot; a
        sequence refused before that gets one final event carrying CapacityExceeded.
        `queue_limit=False`: wait for a slot as long as the deadline allows (the later choices
        of a request, queued behind its first one, wait for their siblings, not for a busy
        engine)."""
        if self._stopping:
            raise ShuttingDown("the generation engine is stopping")
        if not prompt_ids:
            raise InvalidInput("prompt: must contain at least one token", field="prompt")
        vocab = self.spec.vocab_size
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise InvalidInput(f"prompt: token ids must be between 0 and {vocab - 1}", field="prompt")
        if len(prompt_ids) >= self.context_length:
            raise InvalidInput(
                f"messages: the prompt is {len(prompt_ids)} tokens; this model's context is {self.context_length}",
                field="messages",
            )
        params.validate(max_tokens_limit=self.settings.max_tokens_limit, vocab_size=vocab)
        self.scheduler.check(len(prompt_ids), params.max_tokens)
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
            detokenizer=self.tokenizer.stream(),
            deadline=(now + timeout_s) if timeout_s else None,
            queue_deadline=(now + queue_wait) if queue_wait else None,
            submitted_at=now,
            rng=np.random.default_rng(params.seed),
            stops=StopStringFilter(params.stop),
        )
        with self._cv:
            if len(self._inbox) + len(self.scheduler.waiting) >= self.settings.max_waiting_sequences:
                raise CapacityExceeded("the generation queue is full", retry_after_s=1.0)
            self._inbox.append(seq)
            self._cv.notify()
        return seq.seq_id

    def abort(self, seq_id: str) -> None:
        with self._cv:
            self._aborts.append(seq_id)
            self._cv.notify()

    def generate(
        self, prompt_ids: list[int], params: SamplingParams, *, timeout_s: float | None = None, queue_limit: bool = True
    ) -> SequenceStream:
        """Submit now (errors raise here, before any response is sent) and return the events.

        Must be called from the event loop that will consume the stream."""
        return SequenceStream(self, prompt_ids, params, timeout_s, queue_limit=queue_limit)

    def stats(self) -> dict[str, float]:
        queries = self.counters["prefix_queries"]
        drafted = self.counters["draft_tokens"]
        return {
            "running": float(len(self.scheduler.running) + len(self.scheduler.prefilling)),
            "waiting": float(len(self.scheduler.waiting)),
            "kv_cache_usage": self.kv.usage,
            "prefix_cache_hit_rate": self.counters["prefix_hits"] / queries if queries else 0.0,
            "spec_acceptance_rate": self.counters["accepted_tokens"] / drafted if drafted else 0.0,
            "steps": float(self.counters["steps"]),
        }

    # -- engine thread -------------------------------------------------------------------
    def _loop(self) -> None:
        if self.speculative != "off" and self.context_length > CALIBRATION_PAST_TOKENS + MAX_DRAFT_TOKENS + 1:
            try:
                self._calibrate_speculation()
            except Exception:  # noqa: BLE001 - serving without timings beats not serving
                log.warning("%s: could not time speculation; using the default cost figures", self.name, exc_info=True)
        while True:
            with self._cv:
                while not self._inbox and not self._aborts and not self.scheduler.has_work and not self._stopping:
                    self._cv.wait()
                if self._stopping:
                    self._drain_on_stop()
                    return
                inbox, self._inbox = self._inbox, []
                aborts, self._aborts = self._aborts, []
            for seq in inbox:
                try:
                    self.scheduler.add(seq)
                except ApplianceError as exc:
                    seq.sink(TokenEvent([], "", finish_reason="error", error=exc))
            for seq_id in aborts:
                self.scheduler.abort(seq_id)
            try:
                self._step()
            except Exception as exc:  # noqa: BLE001 - one failed step must not kill the engine
                log.exception("generation step failed")
                self._fail_all(ApplianceError(f"generation failed: {exc}"))

    def _calibrate_speculation(self) -> None:
        """Seed the cost model from this box's own timings (slot 0, overwritten by the next
        prefill) so the first sequences do not pay for optimistic priors."""

        def timed(runner: DecoderRunner, width: int) -> float:
            ids = np.ones((1, width), np.int64)
            times = []
            for _ in range(CALIBRATION_RUNS):
                started = time.perf_counter()
                runner.forward(0, ids, np.asarray([CALIBRATION_PAST_TOKENS]), np.asarray([width]), all_logits=True)
                times.append(time.perf_counter() - started)
            return float(np.median(times))

        runners = [self.runner] + ([self.draft.runner] if self.draft is not None else [])
        for runner in runners:
            past = np.ones((1, CALIBRATION_PAST_TOKENS), np.int64)
            runner.forward(0, past, np.zeros(1, np.int64), np.asarray([CALIBRATION_PAST_TOKENS]), all_logits=False)
        step = timed(self.runner, 1)
        verification = timed(self.runner, MAX_DRAFT_TOKENS + 1)
        draft_step = timed(self.draft.runner, 1) if self.draft is not None else None
        self.cost.seed(step, MAX_DRAFT_TOKENS + 1, verification, draft_step)
        log.info(
            "%s: speculation costs here: verifying %d tokens %.2fx a step%s",
            self.name,
            MAX_DRAFT_TOKENS + 1,
            verification / step,
            f", a draft step {draft_step / step:.2f}x" if draft_step is not None else "",
        )

    def _step(self) -> None:
        plan = self.scheduler.schedule()
        now = time.monotonic()
        for seq in plan.retired:
            if seq.finish_reason == "rejected":
                self._refuse(seq, now)
            else:
                self._finished(seq, emit_text="")
        for seq in plan.admitted:
            self._m.request_queue_time.observe(now - seq.submitted_at)
            if seq.on_admitted is not None:
                seq.on_admitted()
        if plan.prefill is not None:
            self._run_prefill(plan.prefill)
        decode = [seq for seq in plan.decode if seq.status is Status.RUNNING]
        if decode:
            if len(decode) <= SPECULATE_MAX_RUNNING and self._speculate(decode[0]):
                pass
            else:
                self._run_decode(decode)
        self.counters["steps"] += 1
        self._m.requests_running.set(len(self.scheduler.running) + len(self.scheduler.prefilling))
        self._m.requests_waiting.set(len(self.scheduler.waiting))
        self._m.kv_cache_usage.set(self.kv.usage)

    def _run_prefill(self, chunk: PrefillChunk) -> None:
        seq = chunk.seq
        ids = np.asarray([seq.prompt[chunk.start : chunk.end]], np.int64)
        logits = self.runner.forward(
            seq.slot, ids, np.asarray([chunk.start]), np.asarray([chunk.end - chunk.start]), all_logits=False
        )
        seq.num_cached = chunk.end
        if not chunk.completes_prompt:
            return
        self._m.prompt_tokens.inc(len(seq.prompt))
        self.scheduler.prefill_done(seq)
        self._sample_and_emit([seq], logits)

    def _run_decode(self, seqs: list[Sequence]) -> None:
        seqs.sort(key=lambda seq: seq.slot)
        ids = np.asarray([[seq.output[-1]] for seq in seqs], np.int64)
        past = np.asarray([seq.num_cached for seq in seqs], np.int64)
        started = time.perf_counter()
        logits = self.runner.forward(0, ids, past, np.ones(len(seqs), np.int64), all_logits=False)
        if len(seqs) == 1:
            self.cost.observe_step(time.perf_counter() - started)
        for seq in seqs:
            seq.num_cached += 1
        self._sample_and_emit(seqs, logits)

    def _sample_and_emit(self, seqs: list[Sequence], logits: np.ndarray) -> None:
        params = [seq.params for seq in seqs]
        plain = all(p.greedy and p.logprobs < 0 and p.repetition_penalty == 1.0 and p.presence_penalty == 0.0 and p.frequency_penalty == 0.0 for p in params)
        if plain:
            tokens = logits.argmax(axis=1)
            for seq, token in zip(seqs, tokens, strict=True):
                self._emit(seq, [int(token)], None)
            return
        arrays = _sampling_arrays(seqs)
        top_n = max(p.logprobs for p in params)
        result = sample(
            logits, arrays, [seq.prompt for seq in seqs], [seq.output for seq in seqs], top_logprobs=top_n, logprob_kernel=self._logprob_kernel
        )
        for row, seq in enumerate(seqs):
            logprob = None
            if seq.params.logprobs >= 0 and result.logprobs is not None:
                top: list[tuple[int, float]] = []
                if seq.params.logprobs > 0 and result.top_ids is not None and result.top_logprobs is not None:
                    top = [
                        (int(t), float(v))
                        for t, v in zip(result.top_ids[row, : seq.params.logprobs], result.top_logprobs[row, : seq.params.logprobs], strict=True)
                    ]
                logprob = [TokenLogprob(int(result.tokens[row]), float(result.logprobs[row]), top)]
            self._emit(seq, [int(result.tokens[row])], logprob)

    # -- speculation ---------------------------------------------------------------------
    def _speculate(self, seq: Sequence) -> bool:
        """One speculative step for a lone sequence; False when no draft was worth verifying."""
        p = seq.params
        if (
            self.speculative == "off"
            or not p.speculate
            or p.logprobs >= 0
            or p.repetition_penalty != 1.0
            or p.presence_penalty != 0.0
            or p.frequency_penalty != 0.0
        ):
            return False
        room = min(p.max_tokens - len(seq.output), self.context_length - seq.total_tokens) - 1
        k = min(MAX_DRAFT_TOKENS, room)
        if k <= 0:
            return False
        if self.speculative == "draft" and self.draft is not None:
            length = seq.gate.choose_length(k, self.cost, model_drafted=True)
            draft = self._draft_model_propose(seq, length) if length else []
        else:
            proposal = self.prompt_lookup.propose(seq.tokens, k)
            draft = proposal[: seq.gate.choose_length(len(proposal), self.cost, model_drafted=False)]
        if not draft:
            return False
        ids = np.asarray([[seq.output[-1], *draft]], np.int64)
        started = time.perf_counter()
        logits = self.runner.forward(seq.slot, ids, np.asarray([seq.num_cached]), np.asarray([len(draft) + 1]), all_logits=True)[0]
        self.cost.observe_verification(len(draft) + 1, time.perf_counter() - started)
        if p.greedy:
            emitted = accept_greedy(logits.argmax(axis=1), draft)
        else:
            rows = len(draft) + 1
            arrays = _sampling_arrays([seq] * rows)
            emitted = accept_sampled(filtered_probs(logits, arrays), draft, None, seq.rng)
        accepted = len(emitted) - 1
        seq.gate.record(len(draft), accepted)
        self.counters["draft_tokens"] += len(draft)
        self.counters["accepted_tokens"] += accepted
        self._m.spec_draft_tokens.inc(len(draft))
        self._m.spec_accepted_tokens.inc(accepted)
        self._m.spec_emitted_tokens.inc(len(emitted))
        old_total = seq.total_tokens
        seq.num_cached += len(emitted)
        seq.draft_cached = min(seq.draft_cached, old_total + accepted)
        self._emit(seq, emitted, None)
        return True

    def _draft_model_propose(self, seq: Sequence, k: int) -> list[int]:
        """Greedy draft of `k` tokens. What the draft model has not seen yet (the prompt at
        first, then the target's correction or bonus token) goes in with the first draft run,
        so catching up costs no run of its own."""
        assert self.draft is not None
        runner = self.draft.runner
        tokens = seq.tokens
        chunk = self.settings.prefill_chunk_tokens
        while len(tokens) - seq.draft_cached > chunk:
            runner.forward(
                seq.slot,
                np.asarray([tokens[seq.draft_cached : seq.draft_cached + chunk]], np.int64),
                np.asarray([seq.draft_cached]),
                np.asarray([chunk]),
                all_logits=False,
            )
            seq.draft_cached += chunk
        pending = tokens[seq.draft_cached :]
        draft: list[int] = []
        for _ in range(k):
            started = time.perf_counter()
            logits = runner.forward(
                seq.slot, np.asarray([pending], np.int64), np.asarray([seq.draft_cached]), np.asarray([len(pending)]), all_logits=False
            )
            if len(pending) == 1:
                self.cost.observe_draft_step(time.perf_counter() - started)
            seq.draft_cached += len(pending)
            pending = [int(logits[0].argmax())]
            draft.append(pending[0])
        return draft

    # -- output --------------------------------------------------------------------------
    def _emit(self, seq: Sequence, tokens: list[int], logprobs: list[TokenLogprob] | None) -> None:
        """Append tokens, apply stop conditions, and send one event."""
        now = time.monotonic()
        if seq.first_token_at is None:
            seq.first_token_at = now
            self._m.time_to_first_token.observe(now - seq.submitted_at)
        elif seq.last_token_at is not None:
            gap = (now - seq.last_token_at) / len(tokens)
            for _ in tokens:
                self._m.time_per_output_token.observe(gap)
        seq.last_token_at = now
        text_parts: list[str] = []
        kept: list[int] = []
        reason: str | None = None
        p = seq.params
        for token in tokens:
            if (token in self.eos_ids and not p.ignore_eos) or token in p.stop_token_ids:
                seq.output.append(token)
                reason = "stop"
                break
            seq.output.append(token)
            kept.append(token)
            text, hit = seq.stops.push(seq.detokenizer.step(token))
            text_parts.append(text)
            if hit:
                reason = "stop"
                break
            if len(seq.output) >= p.max_tokens or seq.total_tokens >= self.context_length:
                reason = "length"
                break
        self._m.generation_tokens.inc(len(kept) + (1 if reason == "stop" and len(kept) < len(tokens) else 0))
        if reason is None:
            seq.sink(TokenEvent(kept, "".join(text_parts), logprobs=logprobs))
            return
        if reason == "length":
            text_parts.append(seq.stops.flush())
        seq.finish_reason = reason
        self.scheduler.finish(seq, reason)
        self._finished(seq, emit_text="".join(text_parts), tokens=kept, logprobs=logprobs)

    def _finished(self, seq: Sequence, *, emit_text: str, tokens: list[int] | None = None, logprobs: list[TokenLogprob] | None = None) -> None:
        reason = seq.finish_reason or "abort"
        self._m.e2e_request_latency.observe(time.monotonic() - seq.submitted_at)
        self.metrics.request_success.labels(model=self.name, finished_reason=reason).inc()
        completion = len(seq.output)
        seq.sink(
            TokenEvent(
                tokens or [],
                emit_text,
                finish_reason=reason,
                logprobs=logprobs,
                prompt_tokens=len(seq.prompt),
                completion_tokens=completion,
                cached_prompt_tokens=seq.cached_prompt_tokens,
            )
        )

    def _refuse(self, seq: Sequence, now: float) -> None:
        """A sequence that waited too long for a slot: 429, nothing of it was generated."""
        waited = now - seq.submitted_at
        self._m.request_queue_time.observe(waited)
        self.metrics.request_success.labels(model=self.name, finished_reason="rejected").inc()
        error = CapacityExceeded(
            f"model {self.name!r} is at capacity: the request waited {waited:.1f} s for a free sequence slot",
            retry_after_s=QUEUE_REFUSAL_RETRY_AFTER_S,
        )
        seq.sink(TokenEvent([], "", finish_reason="rejected", prompt_tokens=len(seq.prompt), error=error))

    def _fail_all(self, error: ApplianceError) -> None:
        for group in (self.scheduler.running, self.scheduler.prefilling):
            for seq in list(group):
                self.scheduler.finish(seq, "error")
                seq.sink(TokenEvent([], "", finish_reason="error", error=error))

    def _drain_on_stop(self) -> None:
        error = ShuttingDown("the generation engine stopped")
        for seq in [*self._inbox, *self.scheduler.waiting, *self.scheduler.prefilling, *self.scheduler.running]:
            self.scheduler.finish(seq, "abort")
            seq.sink(TokenEvent([], "", finish_reason="abort", error=error))
        self._inbox = []

    def _count_prefix_lookup(self, queried: int, hit: int) -> None:
        self.counters["prefix_queries"] += queried
        self.counters["prefix_hits"] += hit
        self._m.prefix_cache_queries.inc(queried)
        self._m.prefix_cache_hits.inc(hit)


class _LabelledMetrics:
    """The engine's children of each metric, looked up once (labels() costs per call)."""

    def __init__(self, metrics: GenerationMetrics, model: str) -> None:
        for name in (
            "time_to_first_token", "time_per_output_token", "e2e_request_latency", "prompt_tokens", "generation_tokens",
            "requests_running", "requests_waiting", "kv_cache_usage", "prefix_cache_queries", "prefix_cache_hits", "request_queue_time",
            "spec_draft_tokens", "spec_accepted_tokens", "spec_emitted_tokens",
        ):
            setattr(self, name, getattr(metrics, name).labels(model=model))


class SequenceStream:
    """The events of one submitted sequence, as an async iterator.

    Closing it before the final event (client disconnect, cancelled task) aborts the sequence,
    which frees its slot and KV at the engine's next step.
    """

    def __init__(
        self, engine: GenerationEngine, prompt_ids: list[int], params: SamplingParams, timeout_s: float | None, *, queue_limit: bool = True
    ) -> None:
        loop = asyncio.get_running_loop()
        self._engine = engine
        self._queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self._done = False
        #: Set once the engine gave the sequence a slot or sent its first event.
        self._started = asyncio.Event()
        #: The error that ended the sequence before it got a slot (refused, deadline, engine
        #: stopping).
        self._refused: ApplianceError | None = None
        self.seq_id = engine.submit(
            prompt_ids,
            params,
            lambda event: loop.call_soon_threadsafe(self._deliver, event),
            timeout_s=timeout_s,
            on_admitted=lambda: loop.call_soon_threadsafe(self._started.set),
            queue_limit=queue_limit,
        )

    def _deliver(self, event: TokenEvent) -> None:
        if not self._started.is_set() and event.finish_reason is not None:
            self._refused = event.error or DeadlineExceeded(
                "the request's deadline passed while it waited for a free sequence slot"
            )
        self._queue.put_nowait(event)
        self._started.set()

    async def started(self) -> None:
        """Wait until the sequence has a slot. A sequence refused or failed before that raises
        its error here, so a streaming response can still answer with the right status."""
        try:
            await self._started.wait()
        except BaseException:
            self.close()
            raise
        if self._refused is not None:
            self._done = True
            raise self._refused

    def __aiter__(self) -> SequenceStream:
        return self

    async def __anext__(self) -> TokenEvent:
        if self._done:
            raise StopAsyncIteration
        try:
            event = await self._queue.get()
        except BaseException:
            self.close()
            raise
        if event.finish_reason is not None:
            self._done = True
        if event.error is not None:
            raise event.error
        return event

    def close(self) -> None:
        if not self._done:
            self._done = True
            self._engine.abort(self.seq_id)

    async def aclose(self) -> None:
        self.close()


def _sampling_arrays(seqs: Seq[Sequence]) -> SamplingArrays:
    """Gather per-row parameters (a loop over rows, never over the vocabulary)."""
    params = [seq.params for seq in seqs]
    return SamplingArrays(
        temperature=np.asarray([p.temperature for p in params], np.float64),
        top_k=np.asarray([p.top_k for p in params], np.int64),
        top_p=np.asarray([p.top_p for p in params], np.float64),
        min_p=np.asarray([p.min_p for p in params], np.float64),
        repetition_penalty=np.asarray([p.repetition_penalty for p in params], np.float32),
        presence_penalty=np.asarray([p.presence_penalty for p in params], np.float32),
        frequency_penalty=np.asarray([p.frequency_penalty for p in params], np.float32),
        uniform=np.asarray([seq.rng.random() if not seq.params.greedy else 0.0 for seq in seqs], np.float64),
    )
