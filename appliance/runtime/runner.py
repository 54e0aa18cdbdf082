"""Batch-aware execution of one model version on its ONNX Runtime sessions.

`execute(jobs)` concatenates the jobs' inputs along the batch axis (padding text inputs to
the longest job of the batch), runs one session, and splits the outputs back, one entry per
job. A failing batch is retried job by job, so only the bad request fails; an allocation
failure raises SessionPoisoned so the model is reloaded. Text (token ids of any length) comes
in as text jobs (`text_jobs`): grouped by length bucket, padded once per batch, in the dtypes the
manifest declares. Runs in worker threads; never touches the event loop.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np

from appliance.errors import ApplianceError, InvalidInput
from appliance.repository.manifest import Manifest, TensorSpec
from appliance.repository.tensors import coerce
from appliance.runtime.batcher import InferenceJob, SessionPoisoned

log = logging.getLogger("appliance.runtime")

#: Inputs of tokenised text models and the value that pads them (input_ids use the pad token).
TEXT_PAD_INPUTS = {"input_ids": 0, "attention_mask": 0, "token_type_ids": 0, "position_ids": 0}
#: Text lengths are bucketed to powers of two from this size, so a batch pads at most ~2x.
MIN_LENGTH_BUCKET = 8
#: Fragments of onnxruntime / CUDA messages that mean "out of memory" at run time.
ALLOCATION_FAILURE_MARKERS = (
    "failed to allocate",
    "bad_alloc",
    "out of memory",
    "cudaerrormemoryallocation",
    "cudnn_status_alloc_failed",
    "cublas_status_alloc_failed",
)


def length_bucket(length: int) -> int:
    bucket = MIN_LENGTH_BUCKET
    while bucket < length:
        bucket *= 2
    return bucket


def is_allocation_failure(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    text = str(exc).lower()
    return any(marker in text for marker in ALLOCATION_FAILURE_MARKERS)


class TensorRunner:
    """Runs batches for one loaded model version; one session per execution instance."""

    def __init__(self, manifest: Manifest, sessions: Sequence[Any]) -> None:
        self.manifest = manifest
        self.batched = manifest.max_batch_size > 0
        self._sessions: queue.SimpleQueue[Any] = queue.SimpleQueue()
        for session in sessions:
            self._sessions.put(session)
        self.inputs: dict[str, TensorSpec] = {spec.name: spec for spec in manifest.inputs}
        self.outputs: dict[str, TensorSpec] = {spec.name: spec for spec in manifest.outputs}
        self.pad_values = self._pad_plan(manifest)
        tokenizer = manifest.tokenizer
        self.text_pad_id = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0

    @staticmethod
    def _pad_plan(manifest: Manifest) -> dict[str, int]:
        """Which inputs are padded along axis 1 and with what (text models only)."""
        if manifest.tokenizer is None or manifest.max_batch_size == 0:
            return {}
        plan: dict[str, int] = {}
        for spec in manifest.inputs:
            if spec.name in TEXT_PAD_INPUTS and len(spec.shape) == 2 and spec.shape[1] == -1:
                pad = TEXT_PAD_INPUTS[spec.name]
                if spec.name == "input_ids" and manifest.tokenizer.pad_token_id is not None:
                    pad = manifest.tokenizer.pad_token_id
                plan[spec.name] = pad
        return plan

    # -- job construction (event loop side, cheap) -----------------------------------------
    def bucket_of(self, inputs: dict[str, np.ndarray]) -> tuple[Hashable, int | None]:
        """The batching bucket of a request and its text length (None for plain tensors)."""
        if not self.batched:
            return object(), None  # never shares a batch
        length: int | None = None
        shapes: list[tuple[str, tuple[int, ...]]] = []
        for name in sorted(inputs):
            array = inputs[name]
            if name in self.pad_values:
                length = int(array.shape[1])
            else:
                shapes.append((name, tuple(array.shape[1:])))
        key: tuple[Any, ...] = tuple(shapes)
        if length is not None:
            key = key + (("length", length_bucket(length)),)
        return key, length

    def make_job(self, inputs: dict[str, np.ndarray], outputs: Sequence[str] | None = None) -> InferenceJob:
        rows = int(next(iter(inputs.values())).shape[0]) if self.batched and inputs else 1
        if self.batched and rows > self.manifest.max_batch_size:
            raise InvalidInput(
                f"batch of {rows} is over this model's max_batch_size {self.manifest.max_batch_size}",
                field=next(iter(inputs)),
            )
        for name, array in inputs.items():
            if self.batched and array.shape[0] != rows:
                raise InvalidInput(
                    f"input '{name}': batch dimension {array.shape[0]} differs from the other inputs' {rows}",
                    field=name,
                )
        lengths = {int(inputs[name].shape[1]) for name in self.pad_values if name in inputs}
        if len(lengths) > 1:
            raise InvalidInput(f"text inputs have different lengths {sorted(lengths)}", field=next(iter(self.pad_values)))
        bucket, length = self.bucket_of(inputs)
        return InferenceJob(inputs=inputs, rows=rows, bucket=bucket, length=length, outputs=outputs)

    def text_jobs(
        self, rows: Sequence[Sequence[int]], max_rows: int, types: Sequence[Sequence[int]] | None = None
    ) -> list[tuple[list[int], InferenceJob]]:
        """Token-id rows (with their token types, for sentence pairs) as jobs of one length
        bucket each, at most `max_rows` rows a job: (the rows' original indices, job). Short
        and long texts never pad each other."""
        missing = [name for name in self.inputs if name not in TEXT_PAD_INPUTS or name == "position_ids"]
        if missing:
            raise InvalidInput(
                f"model {self.manifest.name!r} needs input '{missing[0]}', which text cannot provide", field="model"
            )
        order = sorted(range(len(rows)), key=lambda index: len(rows[index]))
        groups: list[list[int]] = []
        for index in order:
            bucket = length_bucket(len(rows[index]))
            if groups and length_bucket(len(rows[groups[-1][0]])) == bucket and len(groups[-1]) < max(1, max_rows):
                groups[-1].append(index)
            else:
                groups.append([index])
        jobs = []
        for group in groups:
            token_rows = [list(rows[index]) for index in group]
            type_rows = [list(types[index]) for index in group] if types is not None else None
            length = max(len(row) for row in token_rows)
            job = InferenceJob(
                inputs={}, rows=len(group), bucket=("text", length_bucket(length)), length=length,
                token_rows=token_rows, type_rows=type_rows,
            )
            jobs.append((group, job))
        return jobs

    # -- execution (worker thread) ----------------------------------------------------------
    def execute(self, jobs: list[InferenceJob]) -> list[dict[str, np.ndarray] | ApplianceError]:
        session = self._sessions.get()
        try:
            try:
                return self._run_batch(session, jobs)
            except SessionPoisoned:
                raise
            except Exception as exc:  # noqa: BLE001 - isolate the failing request below
                if len(jobs) == 1:
                    return [self._as_error(exc)]
                log.info("model %s: batch of %d failed (%s); retrying one by one", self.manifest.name, len(jobs), _first_line(exc))
            results: list[dict[str, np.ndarray] | ApplianceError] = []
            for job in jobs:
                try:
                    results.extend(self._run_batch(session, [job]))
                except SessionPoisoned:
                    raise
                except Exception as exc:  # noqa: BLE001
                    results.append(self._as_error(exc))
            return results
        finally:
            self._sessions.put(session)

    def _as_error(self, exc: BaseException) -> ApplianceError:
        if isinstance(exc, ApplianceError):
            return exc
        return InvalidInput(f"model {self.manifest.name!r} could not run this request: {_first_line(exc)}")

    def _text_feed(self, jobs: list[InferenceJob]) -> tuple[dict[str, np.ndarray], int]:
        """input_ids / attention_mask / token_type_ids for every row of every text job, padded
        once to the longest row of the batch."""
        rows = [row for job in jobs for row in job.token_rows or ()]
        types = [row for job in jobs for row in (job.type_rows or [[]] * job.rows)]
        width = max(len(row) for row in rows)
        input_ids = np.full((len(rows), width), self.text_pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        type_ids = np.zeros((len(rows), width), dtype=np.int64)
        for position, (row, type_row) in enumerate(zip(rows, types, strict=True)):
            input_ids[position, : len(row)] = row
            mask[position, : len(row)] = 1
            type_ids[position, : len(type_row)] = type_row
        values = {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": type_ids}
        return {name: coerce(values[name], spec.datatype, name) for name, spec in self.inputs.items()}, width

    def _feed(self, jobs: list[InferenceJob]) -> tuple[dict[str, np.ndarray], int | None]:
        if jobs[0].token_rows is not None:
            return self._text_feed(jobs)
        if not self.batched:
            return {name: _ort_ready(array) for name, array in jobs[0].inputs.items()}, None
        padded_to = max((job.length for job in jobs if job.length is not None), default=None)
        feed: dict[str, np.ndarray] = {}
        for name in jobs[0].inputs:
            parts = [job.inputs[name] for job in jobs]
            if name in self.pad_values and padded_to is not None:
                parts = [_pad_axis1(part, padded_to, self.pad_values[name]) for part in parts]
            feed[name] = _ort_ready(parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0))
        return feed, padded_to

    def _run_batch(self, session: Any, jobs: list[InferenceJob]) -> list[dict[str, np.ndarray] | ApplianceError]:
        feed, padded_to = self._feed(jobs)
        wanted: list[str] = []
        for job in jobs:
            for name in job.outputs or self.outputs:
                if name not in wanted:
                    wanted.append(name)
        try:
            arrays = session.run(wanted, feed)
        except Exception as exc:
            if is_allocation_failure(exc):
                raise SessionPoisoned(_first_line(exc)) from exc
            raise
        results: list[dict[str, np.ndarray] | ApplianceError] = []
        offset = 0
        for job in jobs:
            out: dict[str, np.ndarray] = {}
            for name, array in zip(wanted, arrays, strict=True):
                if job.outputs is not None and name not in job.outputs:
                    continue
                part = array[offset : offset + job.rows] if self.batched else array
                spec = self.outputs.get(name)
                if (
                    padded_to is not None
                    and job.length is not None
                    and spec is not None
                    and len(spec.shape) >= 2
                    and spec.shape[1] == -1
                    and part.ndim >= 2
                    and part.shape[1] == padded_to
                ):
                    part = part[:, : job.length]
                out[name] = part
            results.append(out)
            offset += job.rows
        return results


def _pad_axis1(array: np.ndarray, length: int, value: int) -> np.ndarray:
    missing = length - array.shape[1]
    if missing <= 0:
        return array
    pad = np.full((array.shape[0], missing, *array.shape[2:]), value, dtype=array.dtype)
    return np.concatenate([array, pad], axis=1)


def _ort_ready(array: np.ndarray) -> np.ndarray:
    """onnxruntime takes string tensors as str objects, the protocol carries bytes."""
    if array.dtype == object:
        flat = [item.decode("utf-8", errors="replace") if isinstance(item, bytes) else str(item) for item in array.reshape(-1)]
        converted = np.empty(len(flat), dtype=object)
        converted[:] = flat
        return converted.reshape(array.shape)
    return array


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines() or [exc.__class__.__name__])[0][:300]
