"""Reading a batch's input file: checking an upload is JSONL, checking every line of a batch
before it starts, and handing the runner its lines one at a time.

A line reads `{"custom_id": "...", "method": "POST", "url": "/v1/chat/completions", "body":
{...}}` (OpenAI's format). Everything that can be known before running is checked up front,
so a batch fails at creation with the line numbers of its problems instead of half-way through:
the url must be the batch's endpoint, custom ids unique, one model for the whole batch (as
OpenAI requires), no streaming. What only the route can judge (an unknown parameter, a prompt
too long for the model) becomes that line's entry in the error file. Blocking file I/O: call
from a worker thread.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.api.usage_counting import embedding_inputs, rerank_documents
from appliance.errors import InvalidInput

#: Longest custom_id (OpenAI's limit is not published; 512 covers every id scheme seen).
CUSTOM_ID_MAX_CHARS = 512
#: Most problems listed on a batch that failed validation (the rest are counted).
ERRORS_LISTED_MAX = 100
MODEL_MAX_CHARS = 128


@dataclass(frozen=True)
class BatchLine:
    """One request of a batch: its 1-based line number, custom id, JSON body, and the
    embedding inputs or rerank documents it carries (what such lines are priced per)."""

    number: int
    custom_id: str
    body: bytes
    inputs: int = 0


@dataclass
class BatchPlan:
    model: str = ""
    total: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)
    problems: int = 0

    def problem(self, line: int, code: str, message: str, param: str | None = None) -> None:
        self.problems += 1
        if len(self.errors) < ERRORS_LISTED_MAX:
            self.errors.append({"code": code, "message": message, "param": param, "line": line})


def _json_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if raw.strip():
                yield number, raw


def check_upload(path: Path, *, max_lines: int, max_line_bytes: int) -> int:
    """The number of request lines in an uploaded batch file; InvalidInput naming the first
    line that is not a JSON object (the upload is then refused and nothing kept)."""
    count = 0
    for number, raw in _json_lines(path):
        count += 1
        if count > max_lines:
            raise InvalidInput(f"file: more than {max_lines} request lines (batch_api.max_lines)", field="file")
        if len(raw) > max_line_bytes:
            raise InvalidInput(f"file: line {number} is over {max_line_bytes} bytes", field="file")
        try:
            value = json.loads(raw)
        except UnicodeDecodeError:
            raise InvalidInput(f"file: line {number} is not UTF-8 text", field="file") from None
        except (ValueError, RecursionError):
            raise InvalidInput(f"file: line {number} is not valid JSON", field="file") from None
        if not isinstance(value, dict):
            raise InvalidInput(f"file: line {number} is not a JSON object", field="file")
    if count == 0:
        raise InvalidInput("file: holds no request lines", field="file")
    return count


def _check_line(plan: BatchPlan, number: int, value: dict[str, Any], endpoint: str, seen: set[str]) -> None:
    custom_id = value.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id or len(custom_id) > CUSTOM_ID_MAX_CHARS:
        plan.problem(number, "invalid_custom_id", f"custom_id must be a string of 1 to {CUSTOM_ID_MAX_CHARS} characters", "custom_id")
    elif custom_id in seen:
        plan.problem(number, "duplicate_custom_id", f"custom_id {custom_id[:64]!r} appears more than once", "custom_id")
    else:
        seen.add(custom_id)
    if value.get("method") != "POST":
        plan.problem(number, "invalid_method", "method must be 'POST'", "method")
    if value.get("url") != endpoint:
        plan.problem(number, "mismatched_url", f"url must be the batch's endpoint {endpoint}", "url")
    body = value.get("body")
    if not isinstance(body, dict):
        plan.problem(number, "invalid_body", "body must be a JSON object", "body")
        return
    model = body.get("model")
    if not isinstance(model, str) or not model or len(model) > MODEL_MAX_CHARS:
        plan.problem(number, "missing_model", "body.model must name a model", "body.model")
    elif not plan.model:
        plan.model = model
    elif model != plan.model:
        plan.problem(number, "mismatched_model", f"every line must use the same model ({plan.model!r}), got {model[:64]!r}", "body.model")
    if body.get("stream"):
        plan.problem(number, "invalid_stream", "streaming is not available in a batch; leave body.stream unset", "body.stream")


def plan_batch(path: Path, endpoint: str) -> BatchPlan:
    """Check every line of an input file for `endpoint` (the upload already checked it is JSONL)."""
    plan = BatchPlan()
    seen: set[str] = set()
    for number, raw in _json_lines(path):
        plan.total += 1
        try:
            value = json.loads(raw)
        except (ValueError, RecursionError):
            plan.problem(number, "invalid_json_line", "the line is not valid JSON")
            continue
        if not isinstance(value, dict):
            plan.problem(number, "invalid_json_line", "the line is not a JSON object")
            continue
        _check_line(plan, number, value, endpoint, seen)
    if plan.total == 0:
        plan.problem(0, "empty_file", "the input file holds no request lines")
    if plan.problems > len(plan.errors):
        plan.errors.append({"code": "more_errors", "message": f"{plan.problems - len(plan.errors)} more problems not listed", "param": None, "line": None})
    return plan


def inputs_of(endpoint: str, body: dict[str, Any]) -> int:
    """Embedding inputs or rerank documents in a line's body (what such lines are priced per)."""
    if endpoint == "/v1/embeddings":
        return embedding_inputs(body)
    if endpoint == "/v1/rerank":
        return rerank_documents(body)
    return 0


def count_inputs(path: Path, endpoint: str, custom_ids: set[str]) -> int:
    """The inputs of the lines with these custom ids (a resumed batch's succeeded lines)."""
    if endpoint not in ("/v1/embeddings", "/v1/rerank") or not custom_ids:
        return 0
    total = 0
    for _number, raw in _json_lines(path):
        value = json.loads(raw)
        if value.get("custom_id") in custom_ids:
            total += inputs_of(endpoint, value["body"])
    return total


def read_lines(path: Path, endpoint: str, skip: set[str]) -> Iterator[BatchLine]:
    """The checked lines of an input file for `endpoint`, except the custom ids in `skip`
    (done already); each parsed once, here."""
    for number, raw in _json_lines(path):
        value = json.loads(raw)
        custom_id = value["custom_id"]
        if custom_id in skip:
            continue
        body = value["body"]
        yield BatchLine(number, custom_id, json.dumps(body, separators=(",", ":")).encode("utf-8"), inputs_of(endpoint, body))
