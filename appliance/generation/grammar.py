"""Constrained decoding: what a sequence may say next, as a token mask, from a grammar.

A door asks for a shape (`Constraint`: a JSON schema, "any JSON object", a regex, a list of
choices, or a grammar the engine side built itself for tool calls). `GrammarCompiler`, one
per engine, turns it into llguidance's matcher over the model's own tokenizer.json: the
tokenizer index (~0.3 s for a 49k vocabulary) is built once per model, on the first
constrained request; compiled grammars are cached by (kind, text, strictness), so a schema
an application sends with every request compiles once. Compilation runs off the event loop,
bounded by llguidance's parser limits and by `COMPILE_TIMEOUT_S`; a grammar that cannot
compile, or a schema keyword that strict mode cannot honour, is an InvalidInput naming the
field the client used.

Each constrained sequence owns a `GrammarState` (a copy of the compiled prototype). On the
engine thread, `constrain_rows` computes the masks of every constrained row of a step (in one
parallel llguidance call when there are many and cores to spare, inline otherwise) and
applies them to the logits with one vectorised unpack, so the sampling kernels only ever see
allowed tokens; unconstrained rows of the same batch are not touched. `constrain_draft` does the same for the
rows of a speculative verification (the state after each draft token), so speculation stays
on for constrained sequences. Tokens the grammar forces (`GrammarState.forced`) can be
appended without sampling.

Never imports onnxruntime.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import llguidance
import llguidance.numpy as llnp
import numpy as np

from appliance.errors import InvalidInput

log = logging.getLogger(__name__)

ConstraintKind = Literal["json_object", "json_schema", "regex", "choice", "grammar"]

#: Longest grammar source (schema JSON, regex, choices, grammar) accepted, in bytes: anything
#: longer is a client mistake or an attack on the compiler, refused before compiling.
MAX_SOURCE_BYTES = 64 * 1024
#: Most choices in one `choice` constraint.
MAX_CHOICES = 1024
#: A compile that has not finished by then is refused (llguidance's limits end it soon after).
COMPILE_TIMEOUT_S = 5.0
#: Compiled grammars kept per model.
CACHE_ENTRIES = 256
#: llguidance's own bounds on a grammar's size and the work one mask may take; tighter than
#: its defaults where a hostile schema could otherwise hold a core for long.
PARSER_LIMITS = llguidance.LLParserLimits(
    max_grammar_size=200_000,
    initial_lexer_fuel=1_000_000,
    step_lexer_fuel=200_000,
    max_lexer_states=100_000,
    verbose_errors=False,
)
#: JSON as `json.dumps` writes it. Free whitespace lets a model (a small one especially) pad
#: its answer with blank lines until max_tokens cuts it; one fixed spacing costs no quality.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
#: Masks go to llguidance's thread pool only for this many constrained rows or more, and only
#: on a box with more than PARALLEL_MASK_MIN_CPUS cores; otherwise the engine thread computes
#: them (a few to tens of microseconds each). On 2 cores the pool's workers spin beside ONNX
#: Runtime's: 8 constrained streams cost 5-11% of decode speed with the pool, 3-7% without
#: (docs/BENCHMARKS.md).
PARALLEL_MASK_MIN_ROWS = 4
PARALLEL_MASK_MIN_CPUS = 4
#: Bits per word of llguidance's token bitmask.
MASK_WORD_BITS = 32


@dataclass(frozen=True)
class Constraint:
    """What the output must match, as the client described it."""

    kind: ConstraintKind
    #: JSON-schema text, a regex, a JSON list of choices, or an llguidance grammar ("grammar").
    source: str
    #: JSON schema only: refuse keywords the matcher cannot enforce instead of ignoring them.
    strict: bool = False
    #: The request field an error names ("response_format", "tool_choice", ...).
    field: str = "response_format"


class GrammarState:
    """One sequence's position in its grammar (engine thread only)."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self.matcher = matcher

    def consume(self, token: int) -> bool:
        """Advance over a sampled token; False if the grammar did not allow it."""
        return bool(self.matcher.consume_token(token))

    @property
    def stopped(self) -> bool:
        """The grammar is complete: nothing but end-of-sequence may follow."""
        return bool(self.matcher.is_stopped())

    def forced(self, limit: int) -> list[int]:
        """Up to `limit` tokens the grammar allows as the only continuation."""
        if limit <= 0 or self.matcher.is_stopped():
            return []
        return [int(token) for token in self.matcher.compute_ff_tokens()[:limit]]

    def valid_prefix(self, tokens: Sequence[int]) -> int:
        """How many of `tokens` (a draft) the grammar accepts from here."""
        return int(self.matcher.validate_tokens(list(tokens))) if tokens else 0


class CompiledGrammar:
    """A compiled constraint for one model; each sequence starts its own copy."""

    def __init__(self, constraint: Constraint, matcher: llguidance.LLMatcher, compile_s: float) -> None:
        self.constraint = constraint
        self.compile_s = compile_s
        self._prototype = matcher

    def start(self) -> GrammarState:
        return GrammarState(self._prototype.deep_copy())


def grammar_text(constraint: Constraint) -> str:
    """llguidance's grammar for a constraint; InvalidInput names the field for bad input."""
    field = constraint.field
    if len(constraint.source.encode("utf-8")) > MAX_SOURCE_BYTES:
        raise InvalidInput(f"{field}: the {_noun(constraint)} is longer than {MAX_SOURCE_BYTES} bytes", field=field)
    try:
        if constraint.kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema('{"type": "object"}', defaults=JSON_LAYOUT)
        if constraint.kind == "json_schema":
            return llguidance.LLMatcher.grammar_from_json_schema(
                constraint.source, defaults=JSON_LAYOUT, overrides={"lenient": not constraint.strict}
            )
        if constraint.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(constraint.source)
        if constraint.kind == "choice":
            return llguidance.grammar_from("choice", constraint.source)
        return constraint.source
    except ValueError as exc:
        raise InvalidInput(f"{field}: the {_noun(constraint)} is not valid: {exc}", field=field) from None


def _noun(constraint: Constraint) -> str:
    return {"json_object": "schema", "json_schema": "schema", "regex": "regex", "choice": "choice list", "grammar": "grammar"}[constraint.kind]


class GrammarCompiler:
    """One model's constraint compiler and cache (any thread)."""

    def __init__(self, tokenizer_path: Path, *, vocab_size: int, eos_ids: Sequence[int]) -> None:
        """`vocab_size` is the width of the model's logits (it may exceed the tokenizer's)."""
        self._tokenizer_path = tokenizer_path
        self._vocab_size = vocab_size
        self._eos_ids = sorted(eos_ids)
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, str, bool], CompiledGrammar] = OrderedDict()
        self.cache_hits = 0
        self.compiles = 0

    def tokenizer(self) -> llguidance.LLTokenizer:
        """llguidance's index of the vocabulary, built on first use (hundreds of ms)."""
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = llguidance.LLTokenizer(
                    self._tokenizer_path.read_text(encoding="utf-8"), n_vocab=self._vocab_size, eos_token=self._eos_ids
                )
            return self._tokenizer

    def cached(self, constraint: Constraint) -> CompiledGrammar | None:
        key = (constraint.kind, constraint.source, constraint.strict)
        with self._lock:
            found = self._cache.get(key)
            if found is not None:
                self._cache.move_to_end(key)
                self.cache_hits += 1
            return found

    def compile_now(self, constraint: Constraint) -> CompiledGrammar:
        """Compile (or fetch) a constraint on this thread; InvalidInput when it cannot be enforced."""
        found = self.cached(constraint)
        if found is not None:
            return found
        grammar = grammar_text(constraint)
        tokenizer = self.tokenizer()
        started = time.perf_counter()
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0, limits=PARSER_LIMITS)
        if matcher.is_error():
            raise InvalidInput(f"{constraint.field}: cannot be enforced: {_short(matcher.get_error())}", field=constraint.field)
        compiled = CompiledGrammar(constraint, matcher, time.perf_counter() - started)
        key = (constraint.kind, constraint.source, constraint.strict)
        with self._lock:
            self.compiles += 1
            self._cache[key] = compiled
            while len(self._cache) > CACHE_ENTRIES:
                self._cache.popitem(last=False)
        return compiled

    async def compile(self, constraint: Constraint) -> CompiledGrammar:
        """`compile_now` off the event loop, refused past COMPILE_TIMEOUT_S (never a hang)."""
        found = self.cached(constraint)
        if found is not None:
            return found
        try:
            return await asyncio.wait_for(asyncio.to_thread(self.compile_now, constraint), COMPILE_TIMEOUT_S)
        except TimeoutError:
            raise InvalidInput(
                f"{constraint.field}: the {_noun(constraint)} did not compile within {COMPILE_TIMEOUT_S:.0f} s; simplify it",
                field=constraint.field,
            ) from None


def _short(error: str, limit: int = 300) -> str:
    """llguidance's message without its trailing detail, short enough for a 400 body."""
    text = " ".join(error.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


_executor: llguidance.LLExecutor | None = None
_executor_lock = threading.Lock()


def _shared_executor() -> llguidance.LLExecutor:
    """One llguidance thread pool for every engine of the process (masks are short jobs)."""
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = llguidance.LLExecutor()
        return _executor


def _apply(logits: np.ndarray, rows: np.ndarray, mask: np.ndarray) -> None:
    """Set the logits of disallowed tokens of `rows` to -inf: one unpack of the bit words
    (little-endian bits, as llguidance writes them) for all rows at once, then one boolean
    write. Real masks come in long runs (a JSON key allows a few tokens, a string nearly
    all), which this write streams through: 15-30 us per 49k-token row, against ~150 us for
    llguidance's numpy helper (docs/BENCHMARKS.md)."""
    vocab = logits.shape[1]
    disallowed = np.unpackbits(mask.view(np.uint8), axis=1, bitorder="little")[:, :vocab] == 0
    if len(rows) == logits.shape[0] and np.array_equal(rows, np.arange(len(rows))):
        logits[disallowed] = -np.inf
        return
    block = logits[rows]
    block[disallowed] = -np.inf
    logits[rows] = block


def constrain_rows(logits: np.ndarray, states: Sequence[tuple[int, GrammarState]]) -> None:
    """Mask the logits rows of constrained sequences in place; `states` pairs a row with its state."""
    if not states:
        return
    words = (logits.shape[1] + MASK_WORD_BITS - 1) // MASK_WORD_BITS
    mask = np.zeros((len(states), words), np.int32)
    if len(states) < PARALLEL_MASK_MIN_ROWS or (os.cpu_count() or 1) <= PARALLEL_MASK_MIN_CPUS:
        for index, (_, state) in enumerate(states):
            llnp.fill_next_token_bitmask(state.matcher, mask, index)
    else:
        llnp.fill_next_token_bitmask_par(_shared_executor(), [(state.matcher, index) for index, (_, state) in enumerate(states)], mask)
    _apply(logits, np.asarray([row for row, _ in states], np.int64), mask)


def constrain_draft(logits: np.ndarray, state: GrammarState, draft: Sequence[int]) -> None:
    """Mask a verification run's rows in place: row j gets the mask after draft[:j] (the
    grammar state is left where it was)."""
    words = (logits.shape[1] + MASK_WORD_BITS - 1) // MASK_WORD_BITS
    mask = np.full((len(draft) + 1, words), -1, np.int32)  # rows past a refused token stay open
    matcher = state.matcher
    consumed = 0
    for position in range(len(draft) + 1):
        llnp.fill_next_token_bitmask(matcher, mask, position)
        if position == len(draft) or matcher.validate_tokens([draft[position]]) != 1:
            break  # (a refused token would leave the matcher in its error state for good)
        matcher.consume_token(draft[position])
        consumed += 1
    matcher.rollback(consumed)
    _apply(logits, np.arange(len(draft) + 1), mask)
