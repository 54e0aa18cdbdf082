"""Workload definitions: what each benchmark request asks of the server.

Four kinds: `chat` (streamed `/v1/chat/completions`; prompts and their output lengths come
from the shipped prompt set or a user JSONL file, or an output-length range overrides them),
`embeddings` (`/v1/embeddings` with N sentences per request), `rerank` (`/v1/rerank`, one
prompt as the query and N others as documents) and `infer` (raw KServe V2 `/infer` with
tensors built from the model's declared inputs). A workload only builds request
bodies and reads the response's accounting; it never sends anything itself.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Protocol

from appliance.errors import InvalidInput

WorkloadKind = Literal["chat", "embeddings", "rerank", "infer"]
#: The unit a workload's cost is quoted in: generated tokens, or inputs (sentences, reranked
#: documents, rows).
CostUnit = Literal["output_tokens", "inputs"]

#: The prompt set shipped with the appliance (40 varied prompts with output lengths).
SHIPPED_PROMPTS = "prompts.jsonl"
#: Largest workload file read, in bytes (a benchmark needs prompts, not a corpus).
MAX_WORKLOAD_FILE_BYTES = 64 << 20
#: Output length when neither the prompt entry nor the options give one.
DEFAULT_MAX_TOKENS = 128
#: Most documents one rerank request may carry (the server's own limit).
MAX_RERANK_DOCUMENTS = 10_000
#: Length given to dynamic non-batch dimensions of generated V2 tensors.
DEFAULT_INFER_SEQUENCE = 16

#: Per-request sampling seeds are drawn below 2**31: every OpenAI-compatible server we compare
#: against accepts a seed of that size.
REQUEST_SEED_RANGE = 2**31


@dataclass(frozen=True)
class PromptEntry:
    """One line of a workload file: chat messages and the output length it asks for."""

    messages: list[dict[str, str]]
    max_tokens: int | None
    text: str


@dataclass(frozen=True)
class HttpCall:
    """One request to send: path under the base URL, JSON body, and whether it streams."""

    path: str
    body: dict[str, Any]
    stream: bool
    inputs: int


@dataclass(frozen=True)
class Accounting:
    """What a finished non-streamed response says it did."""

    prompt_tokens: int
    inputs: int


class Workload(Protocol):
    kind: WorkloadKind
    cost_unit: CostUnit

    def next_call(self, rng: random.Random) -> HttpCall: ...

    def account(self, call: HttpCall, payload: Any) -> Accounting: ...

    def describe(self) -> dict[str, Any]: ...


def _entry_from(line_no: int, raw: Any, source: str) -> PromptEntry:
    where = f"{source}:{line_no}"
    if not isinstance(raw, dict):
        raise InvalidInput(f"workload file {where}: each line must be a JSON object", field="prompts")
    max_tokens = raw.get("max_tokens")
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1):
        raise InvalidInput(f"workload file {where}: max_tokens must be a positive integer", field="prompts")
    if "messages" in raw:
        messages = raw["messages"]
        if (
            not isinstance(messages, list)
            or not messages
            or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages
            )
        ):
            raise InvalidInput(
                f"workload file {where}: messages must be a non-empty list of {{role, content}} strings",
                field="prompts",
            )
        text = " ".join(m["content"] for m in messages if m["role"] == "user") or messages[-1]["content"]
        return PromptEntry(messages=messages, max_tokens=max_tokens, text=text)
    for key in ("prompt", "text"):
        value = raw.get(key)
        if isinstance(value, str) and value.strip():
            return PromptEntry(messages=[{"role": "user", "content": value}], max_tokens=max_tokens, text=value)
    raise InvalidInput(
        f"workload file {where}: needs a non-empty 'prompt' (or 'text') string or a 'messages' list",
        field="prompts",
    )


def parse_prompts(text: str, source: str) -> list[PromptEntry]:
    """Entries of a JSONL workload; blank lines are skipped, anything else must be valid."""
    entries: list[PromptEntry] = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidInput(f"workload file {source}:{line_no}: not JSON ({exc.msg})", field="prompts") from None
        entries.append(_entry_from(line_no, raw, source))
    if not entries:
        raise InvalidInput(f"workload file {source}: no prompts in it", field="prompts")
    return entries


def load_prompts(path: Path | None) -> tuple[list[PromptEntry], str]:
    """The user's JSONL file, or the shipped prompt set when `path` is None; and its label."""
    if path is None:
        text = resources.files("appliance.benchmark").joinpath("data", SHIPPED_PROMPTS).read_text("utf-8")
        return parse_prompts(text, SHIPPED_PROMPTS), f"shipped:{SHIPPED_PROMPTS}"
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise InvalidInput(f"prompts: cannot read {path}: {exc.strerror}", field="prompts") from None
    if not path.is_file():
        raise InvalidInput(f"prompts: {path} is not a file", field="prompts")
    if size > MAX_WORKLOAD_FILE_BYTES:
        raise InvalidInput(f"prompts: {path} is larger than {MAX_WORKLOAD_FILE_BYTES >> 20} MiB", field="prompts")
    try:
        text = path.read_text("utf-8")
    except UnicodeDecodeError:
        raise InvalidInput(f"prompts: {path} is not UTF-8 text", field="prompts") from None
    return parse_prompts(text, path.name), str(path.name)


def parse_range(text: str, field_name: str) -> tuple[int, int]:
    """'64' or '32:128' as an inclusive (low, high) range of positive integers."""
    low_text, _, high_text = text.partition(":")
    try:
        low = int(low_text)
        high = int(high_text) if high_text else low
    except ValueError:
        raise InvalidInput(f"{field_name}: expected N or LOW:HIGH, got {text!r}", field=field_name) from None
    if low < 1 or high < low:
        raise InvalidInput(f"{field_name}: need 1 <= LOW <= HIGH, got {text!r}", field=field_name)
    return low, high


def _positive_int(value: Any, default: int = 0) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else default


@dataclass
class ChatWorkload:
    """Streamed chat completions; output length from the entry, or a uniform range."""

    model: str
    prompts: list[PromptEntry]
    source: str
    output_tokens: tuple[int, int] | None = None
    temperature: float | None = None
    #: Ask the server to generate exactly max_tokens (the `ignore_eos` extension the appliance
    #: and vLLM accept), so output lengths follow the distribution instead of the model's EOS.
    ignore_eos: bool = False
    kind: WorkloadKind = "chat"
    cost_unit: CostUnit = "output_tokens"

    def next_call(self, rng: random.Random) -> HttpCall:
        entry = rng.choice(self.prompts)
        if self.output_tokens is not None:
            max_tokens = rng.randint(*self.output_tokens)
        else:
            max_tokens = entry.max_tokens or DEFAULT_MAX_TOKENS
        body: dict[str, Any] = {
            "model": self.model,
            "messages": entry.messages,
            "max_tokens": max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.temperature is not None:
            body["temperature"] = self.temperature
            if self.temperature > 0:
                # Sampled output then repeats from run to run: the same seed replays the same
                # prompts, lengths and tokens, so two servers (or two variants) see one workload.
                body["seed"] = rng.randrange(REQUEST_SEED_RANGE)
        if self.ignore_eos:
            body["ignore_eos"] = True
        return HttpCall(path="/v1/chat/completions", body=body, stream=True, inputs=1)

    def account(self, call: HttpCall, payload: Any) -> Accounting:
        return Accounting(prompt_tokens=0, inputs=call.inputs)

    def describe(self) -> dict[str, Any]:
        lengths = [e.max_tokens or DEFAULT_MAX_TOKENS for e in self.prompts]
        return {
            "kind": self.kind,
            "model": self.model,
            "prompts": self.source,
            "prompt_count": len(self.prompts),
            "prompt_chars_mean": sum(len(e.text) for e in self.prompts) / len(self.prompts),
            "max_tokens": list(self.output_tokens) if self.output_tokens else {"from": "prompt set", "mean": sum(lengths) / len(lengths)},
            "temperature": self.temperature,
            "ignore_eos": self.ignore_eos,
        }


def _one_per_input(call: HttpCall, payload: Any, key: str, what: str) -> Accounting:
    """A response that must list one item under `key` per input sent, with usage."""
    items = payload.get(key) if isinstance(payload, dict) else None
    if not isinstance(items, list) or len(items) != call.inputs:
        got = len(items) if isinstance(items, list) else "no"
        raise ValueError(f"expected {call.inputs} {what}, got {got}")
    usage = payload.get("usage") or {}
    return Accounting(prompt_tokens=_positive_int(usage.get("prompt_tokens")), inputs=len(items))


@dataclass
class EmbeddingsWorkload:
    """`/v1/embeddings` requests of `sentences_per_request` texts drawn from the prompt set."""

    model: str
    prompts: list[PromptEntry]
    source: str
    sentences_per_request: int = 8
    kind: WorkloadKind = "embeddings"
    cost_unit: CostUnit = "inputs"

    def __post_init__(self) -> None:
        if not 1 <= self.sentences_per_request <= 2048:
            raise InvalidInput(
                f"sentences: must be within 1..2048, got {self.sentences_per_request}", field="sentences"
            )

    def next_call(self, rng: random.Random) -> HttpCall:
        texts = [rng.choice(self.prompts).text for _ in range(self.sentences_per_request)]
        body = {"model": self.model, "input": texts}
        return HttpCall(path="/v1/embeddings", body=body, stream=False, inputs=len(texts))

    def account(self, call: HttpCall, payload: Any) -> Accounting:
        return _one_per_input(call, payload, "data", "embeddings")

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "model": self.model,
            "prompts": self.source,
            "prompt_count": len(self.prompts),
            "sentences_per_request": self.sentences_per_request,
        }


@dataclass
class RerankWorkload:
    """`/v1/rerank` requests: one text of the prompt set as the query, `documents_per_request`
    others as the documents (priced per document)."""

    model: str
    prompts: list[PromptEntry]
    source: str
    documents_per_request: int = 8
    kind: WorkloadKind = "rerank"
    cost_unit: CostUnit = "inputs"

    def __post_init__(self) -> None:
        if not 1 <= self.documents_per_request <= MAX_RERANK_DOCUMENTS:
            raise InvalidInput(
                f"sentences: documents per rerank request must be within 1..{MAX_RERANK_DOCUMENTS}, got {self.documents_per_request}",
                field="sentences",
            )

    def next_call(self, rng: random.Random) -> HttpCall:
        documents = [rng.choice(self.prompts).text for _ in range(self.documents_per_request)]
        body = {"model": self.model, "query": rng.choice(self.prompts).text, "documents": documents, "return_documents": False}
        return HttpCall(path="/v1/rerank", body=body, stream=False, inputs=len(documents))

    def account(self, call: HttpCall, payload: Any) -> Accounting:
        return _one_per_input(call, payload, "results", "ranked documents")

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "model": self.model,
            "prompts": self.source,
            "prompt_count": len(self.prompts),
            "documents_per_request": self.documents_per_request,
        }


@dataclass
class InferWorkload:
    """Raw KServe V2 inference with tensors shaped from the model's metadata.

    Dynamic dimensions become `rows` (the batch dimension, when the model has one) and
    `sequence` (every other); integer inputs named like masks are ones, other integers small
    ids, floats uniform in [0, 1), so any model that declares its inputs can be loaded.
    """

    model: str
    version: int | None
    metadata: dict[str, Any]
    rows: int = 1
    sequence: int = DEFAULT_INFER_SEQUENCE
    kind: WorkloadKind = "infer"
    cost_unit: CostUnit = "inputs"
    _inputs: list[dict[str, Any]] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        if not 1 <= self.rows <= 4096:
            raise InvalidInput(f"sentences: rows per request must be within 1..4096, got {self.rows}", field="sentences")
        declared = self.metadata.get("inputs")
        if not isinstance(declared, list) or not declared:
            raise InvalidInput(f"model: {self.model!r} declares no inputs in its V2 metadata", field="model")
        batched = int(self.metadata.get("max_batch_size") or 0) > 0
        for spec in declared:
            shape = []
            for position, dim in enumerate(spec.get("shape") or []):
                if dim == -1:
                    dim = self.rows if (position == 0 and batched) else self.sequence
                shape.append(int(dim))
            self._inputs.append({"name": spec["name"], "datatype": spec["datatype"], "shape": shape})

    @property
    def path(self) -> str:
        version = f"/versions/{self.version}" if self.version is not None else ""
        return f"/v2/models/{self.model}{version}/infer"

    def next_call(self, rng: random.Random) -> HttpCall:
        tensors = []
        for spec in self._inputs:
            count = 1
            for dim in spec["shape"]:
                count *= dim
            tensors.append({**spec, "data": _tensor_data(spec["name"], spec["datatype"], count, rng)})
        return HttpCall(path=self.path, body={"inputs": tensors}, stream=False, inputs=self.rows)

    def account(self, call: HttpCall, payload: Any) -> Accounting:
        outputs = payload.get("outputs") if isinstance(payload, dict) else None
        if not isinstance(outputs, list) or not outputs:
            raise ValueError("V2 response has no outputs")
        return Accounting(prompt_tokens=0, inputs=call.inputs)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "model": self.model,
            "version": self.version,
            "rows_per_request": self.rows,
            "sequence": self.sequence,
            "inputs": [{k: v for k, v in spec.items()} for spec in self._inputs],
        }


def _tensor_data(name: str, datatype: str, count: int, rng: random.Random) -> list[Any]:
    if datatype == "BOOL":
        return [True] * count
    if datatype == "BYTES":
        return ["benchmark"] * count
    if datatype.startswith(("INT", "UINT")):
        if "mask" in name.lower():
            return [1] * count
        if "type" in name.lower():
            return [0] * count
        return [rng.randint(1, 99) for _ in range(count)]
    return [rng.random() for _ in range(count)]
