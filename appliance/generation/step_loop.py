"""The engine thread: one model's steps, one after another, until the engine stops.

Other threads hand the thread new sequences and aborts (`put`, `abort`, under one lock). Each
step takes them in, asks the scheduler for a plan, runs at most one prefill chunk and one batched
decode run (ONNX Runtime releases the GIL while it computes), samples all rows at once and emits
every sequence its event (a constrained sequence's logits row gets its grammar's mask first:
grammar.py). With a single running sequence, a speculative step replaces the decode
run. Before the first step the speculator times this box's runs.

The runners, sampling and the scheduler's steps run on this thread only; a failed step fails its
sequences, never the thread. Never waits on a client: sinks only schedule delivery on their
stream's event loop. Never copies the KV cache per step.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import onnxruntime as ort

from appliance.errors import ApplianceError, CapacityExceeded
from appliance.generation.emission import Emitter
from appliance.generation.events import TokenLogprob
from appliance.generation.grammar import constrain_rows
from appliance.generation.kv_cache import KvCacheManager
from appliance.generation.metrics import LabelledMetrics
from appliance.generation.model_runner import DecoderRunner, StepPreempted
from appliance.generation.params import TOP_LOGPROBS_MAX
from appliance.generation.sampling import sampling_arrays
from appliance.generation.scheduler import PrefillChunk, Scheduler, Sequence, Status
from appliance.generation.speculative import Speculator
from appliance.generation.stall_limit import StallLimit
from appliance.kernels.sampling import sample
from appliance.kernels.sampling_onnx import GreedyLogprobsKernel

log = logging.getLogger(__name__)

#: Speculate only while at most this many sequences run: a batched decode run already
#: amortises the per-step cost, and verification runs one sequence at a time.
SPECULATE_MAX_RUNNING = 1
#: Retry-After of a sequence refused because the queue is full.
QUEUE_FULL_RETRY_AFTER_S = 1.0


class StepLoop:
    """The thread that runs one engine's steps, and the inbox through which it gets its work."""

    def __init__(
        self,
        *,
        name: str,
        runner: DecoderRunner,
        scheduler: Scheduler,
        kv: KvCacheManager,
        emitter: Emitter,
        speculator: Speculator,
        stall_limit: StallLimit,
        metrics: LabelledMetrics,
        counters: dict[str, int],
    ) -> None:
        """`counters` is the engine's own dict, where the steps add up; `stall_limit` gets
        the timings of the plain runs (the scheduler asks it for chunk sizes)."""
        self._name = name
        self._runner = runner
        self._scheduler = scheduler
        self._kv = kv
        self._emitter = emitter
        self._speculator = speculator
        self._stall_limit = stall_limit
        self._m = metrics
        self._counters = counters
        self._logprob_kernel = GreedyLogprobsKernel(TOP_LOGPROBS_MAX)
        self._inbox: list[Sequence] = []
        self._aborts: list[str] = []
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        #: The RunOptions of a decode run that has only batch-priority rows, while it runs
        #: (guarded by _cv): an interactive arrival stops it (put).
        self._preemptible: ort.RunOptions | None = None

    # -- any thread ----------------------------------------------------------------------
    @property
    def stopping(self) -> bool:
        return self._stopping

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"generation-{self._name}", daemon=True)
            self._thread.start()

    def stop(self, timeout_s: float) -> None:
        """Abort everything still queued or running and stop the thread."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def put(self, seq: Sequence) -> None:
        """Hand a new sequence to the thread; CapacityExceeded when the queue is already full
        (the sequences handed in but not yet taken count as waiting)."""
        with self._cv:
            full = len(self._inbox) + len(self._scheduler.waiting) >= self._scheduler.max_waiting
            # A full queue still takes work that can displace a waiting lower-priority sequence.
            lower = self._scheduler.low_priority_waiting + sum(1 for other in self._inbox if other.params.priority > 0)
            if full and not (seq.params.priority == 0 and lower > 0):
                raise CapacityExceeded("the generation queue is full", retry_after_s=QUEUE_FULL_RETRY_AFTER_S)
            self._inbox.append(seq)
            if seq.params.priority == 0 and self._preemptible is not None:
                # The run in progress only advances batch work: stop it, so this prompt's
                # prefill starts now instead of after it (the run is repeated next step).
                self._preemptible.terminate = True
            self._cv.notify()

    def abort(self, seq_id: str) -> None:
        with self._cv:
            self._aborts.append(seq_id)
            self._cv.notify()

    # -- the engine thread ---------------------------------------------------------------
    def _run(self) -> None:
        self._speculator.calibrate()
        while True:
            with self._cv:
                while not self._inbox and not self._aborts and not self._scheduler.has_work and not self._stopping:
                    self._cv.wait()
                if self._stopping:
                    self._emitter.drain_on_stop(self._inbox)
                    self._inbox = []
                    return
                inbox, self._inbox = self._inbox, []
                aborts, self._aborts = self._aborts, []
            for seq in inbox:
                try:
                    displaced = self._scheduler.add(seq)
                except ApplianceError as exc:
                    self._emitter.fail(seq, exc)
                    continue
                if displaced is not None:
                    self._emitter.refuse(displaced, time.monotonic())
            for seq_id in aborts:
                self._scheduler.abort(seq_id)
            try:
                self._step()
            except Exception as exc:  # noqa: BLE001 - one failed step must not kill the engine
                log.exception("generation step failed")
                self._emitter.fail_all(ApplianceError(f"generation failed: {exc}"))

    def _step(self) -> None:
        plan = self._scheduler.schedule()
        now = time.monotonic()
        for seq in plan.retired:
            if seq.finish_reason == "rejected":
                self._emitter.refuse(seq, now)
            else:
                self._emitter.finished(seq, emit_text="")
        for seq in plan.admitted:
            self._m.request_queue_time.observe(now - seq.submitted_at)
            if seq.on_admitted is not None:
                seq.on_admitted()
        if plan.prefill is not None:
            self._run_prefill(plan.prefill)
        decode = [seq for seq in plan.decode if seq.status is Status.RUNNING]
        if decode and not (len(decode) <= SPECULATE_MAX_RUNNING and self._speculator.speculate(decode[0])):
            self._run_decode(decode)
        self._counters["steps"] += 1
        self._m.requests_running.set(len(self._scheduler.running) + len(self._scheduler.prefilling))
        self._m.requests_waiting.set(len(self._scheduler.waiting))
        self._m.kv_cache_usage.set(self._kv.usage)

    def _run_prefill(self, chunk: PrefillChunk) -> None:
        seq = chunk.seq
        ids = np.asarray([seq.prompt[chunk.start : chunk.end]], np.int64)
        started = time.perf_counter()
        logits = self._runner.forward(
            seq.slot, ids, np.asarray([chunk.start]), np.asarray([chunk.end - chunk.start]), all_logits=False, prompt=True
        )
        self._stall_limit.observe_prefill(chunk.end - chunk.start, time.perf_counter() - started)
        self._m.prefill_chunk_tokens.observe(chunk.end - chunk.start)
        seq.num_cached = chunk.end
        if not chunk.completes_prompt:
            return
        self._m.prompt_tokens.inc(len(seq.prompt))
        self._scheduler.prefill_done(seq)
        self._sample_and_emit([seq], logits)

    def _run_decode(self, seqs: list[Sequence]) -> None:
        seqs.sort(key=lambda seq: seq.slot)
        ids = np.asarray([[seq.output[-1]] for seq in seqs], np.int64)
        past = np.asarray([seq.num_cached for seq in seqs], np.int64)
        options = self._preemptible_options(seqs)
        if options is not None and options.terminate:
            return  # an interactive prompt is already in the inbox: it goes first
        started = time.perf_counter()
        try:
            logits = self._runner.forward(0, ids, past, np.ones(len(seqs), np.int64), all_logits=False, run_options=options)
        except StepPreempted:
            self._counters["preempted_steps"] += 1
            self._m.preempted_steps.inc()
            return
        finally:
            if options is not None:
                with self._cv:
                    self._preemptible = None
        elapsed = time.perf_counter() - started
        self._stall_limit.observe_decode(len(seqs), elapsed)
        if len(seqs) == 1:
            self._speculator.observe_plain_step(elapsed)
        for seq in seqs:
            seq.num_cached += 1
        self._sample_and_emit(seqs, logits)

    def _preemptible_options(self, seqs: list[Sequence]) -> ort.RunOptions | None:
        """RunOptions that an interactive arrival may stop, for a run of batch-priority rows
        only (terminate already set when one is waiting in the inbox); None otherwise.

        Why stop a run rather than let it finish: a decode step of 16 batch rows takes as long
        as a short interactive prefill, so waiting for it doubled interactive time to first
        token (docs/BENCHMARKS.md). Stopping wastes at most the stopped run, once per
        interactive arrival, and batch rows lose no token."""
        if any(seq.params.priority == 0 for seq in seqs):
            return None
        options = ort.RunOptions()
        with self._cv:
            options.terminate = any(seq.params.priority == 0 for seq in self._inbox)
            self._preemptible = options
        return options

    def _sample_and_emit(self, seqs: list[Sequence], logits: np.ndarray) -> None:
        constrain_rows(logits, [(row, seq.grammar) for row, seq in enumerate(seqs) if seq.grammar is not None])
        params = [seq.params for seq in seqs]
        plain = all(p.greedy and p.logprobs < 0 and p.repetition_penalty == 1.0 and p.presence_penalty == 0.0 and p.frequency_penalty == 0.0 for p in params)
        if plain:
            tokens = logits.argmax(axis=1)
            for seq, token in zip(seqs, tokens, strict=True):
                self._emitter.emit(seq, [int(token)], None)
            return
        arrays = sampling_arrays(seqs)
        top_n = max(p.logprobs for p in params)
        result = sample(
            logits, arrays, [seq.prompt for seq in seqs], [seq.output for seq in seqs], top_logprobs=top_n, logprob_kernel=self._logprob_kernel
        )
        for row, seq in enumerate(seqs):
            logprob: list[TokenLogprob] | None = None
            if seq.params.logprobs >= 0 and result.logprobs is not None:
                top: list[tuple[int, float]] = []
                if seq.params.logprobs > 0 and result.top_ids is not None and result.top_logprobs is not None:
                    top = [
                        (int(t), float(v))
                        for t, v in zip(result.top_ids[row, : seq.params.logprobs], result.top_logprobs[row, : seq.params.logprobs], strict=True)
                    ]
                logprob = [TokenLogprob(int(result.tokens[row]), float(result.logprobs[row]), top)]
            self._emitter.emit(seq, [int(result.tokens[row])], logprob)
