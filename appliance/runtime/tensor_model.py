"""One loaded tensor model (encoders, classifiers, plain ONNX graphs): its sessions, runner,
dynamic batcher and tokenizer, from opening the files to closing the batcher.

Opening (`open_tensor_model`) checks the version's files, creates one session per execution
instance and runs a tiny warm-up batch; it is slow and runs in a worker thread. Starting the
batcher happens on the event loop. Which models are loaded, when and why is the serving
layer's business, not this module's. Never imports the API layer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from appliance.errors import ModelRejected
from appliance.ops.memory import give_back_memory
from appliance.repository.store import ModelVersion
from appliance.repository.tensors import NUMPY_DTYPES
from appliance.runtime.batcher import BatchObserver, BatchPolicy, DynamicBatcher, JobResult
from appliance.runtime.loading import check_signature, check_version_files
from appliance.runtime.providers import ProviderConfig, ProviderReport, create_session
from appliance.runtime.runner import TensorRunner
from appliance.runtime.tokenizer import TextTokenizer

#: Inputs the warm-up run knows how to fill (text models).
WARM_UP_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass
class OpenedSessions:
    """What a worker thread hands back after opening a version."""

    version: ModelVersion
    sessions: list[Any]
    provider: ProviderReport
    tokenizer: TextTokenizer | None


def open_tensor_model(version: ModelVersion, config: ProviderConfig) -> OpenedSessions:
    """Check the files, create one session per instance and the tokenizer (worker thread)."""
    check_version_files(version)
    give_back_memory()  # the check parsed the whole file: return it before ONNX Runtime reads it again
    sessions: list[Any] = []
    report: ProviderReport | None = None
    for _ in range(max(1, config.instances)):
        session, created = create_session(version.model_path, version.manifest, config)
        sessions.append(session)
        report = report or created
    assert report is not None
    check_signature(version, sessions[0].get_inputs(), sessions[0].get_outputs())
    tokenizer = None
    spec = version.manifest.tokenizer
    if spec is not None:
        if "/" in spec.file or "\\" in spec.file or spec.file.startswith("."):
            raise ModelRejected(f"tokenizer.file {spec.file!r} must be a plain file name in the version folder")
        tokenizer = TextTokenizer(version.path / spec.file, max_length=spec.max_length, truncation_side=spec.truncation_side)
        _warm_up(version, sessions)
    return OpenedSessions(version, sessions, report, tokenizer)


def _warm_up(version: ModelVersion, sessions: list[Any]) -> None:
    """Run one tiny text batch per session so the first client does not pay for ORT's
    first-run allocations (only for text models, whose inputs we know how to fill)."""
    feed = {}
    for spec in version.manifest.inputs:
        if spec.name not in WARM_UP_INPUTS or len(spec.shape) != 2:
            return
        value = 1 if spec.name == "attention_mask" else 0
        feed[spec.name] = np.full((1, 2), value, dtype=NUMPY_DTYPES[spec.datatype])
    for session in sessions:
        session.run(None, feed)


def batch_policy_for(version: ModelVersion, server: BatchPolicy) -> BatchPolicy:
    """The server's batching policy within what the model's manifest allows."""
    model_max = version.manifest.max_batch_size
    size = 1 if model_max == 0 else min(server.max_batch_size, model_max)
    return BatchPolicy(
        max_batch_size=size,
        max_queue_delay_us=server.max_queue_delay_us,
        max_queue_size=server.max_queue_size,
        instances=server.instances,
        preferred_batch_sizes=tuple(s for s in server.preferred_batch_sizes if s <= size),
        enabled=server.enabled and model_max > 0,
    )


class TensorModel:
    """A version with its sessions behind a running dynamic batcher (event-loop side)."""

    def __init__(
        self,
        opened: OpenedSessions,
        policy: BatchPolicy,
        *,
        on_poisoned: Callable[[str], None] | None = None,
        observer: BatchObserver | None = None,
        load_s: float = 0.0,
    ) -> None:
        self.version = opened.version
        self.provider = opened.provider
        self.tokenizer = opened.tokenizer
        self.load_s = load_s
        self.runner = TensorRunner(opened.version.manifest, opened.sessions)
        self.batcher = DynamicBatcher(
            opened.version.name, self.runner.execute, batch_policy_for(opened.version, policy), on_poisoned=on_poisoned, observer=observer
        )
        self.batcher.start()

    @property
    def manifest(self) -> Any:
        return self.version.manifest

    async def infer(
        self, inputs: dict[str, np.ndarray], outputs: list[str] | None, timeout_s: float, *, priority: int = 0
    ) -> JobResult:
        job = self.runner.make_job(inputs, outputs)
        return await self.batcher.submit(job, timeout_s, priority=priority)

    async def infer_text(
        self,
        rows: Sequence[Sequence[int]],
        outputs: list[str],
        timeout_s: float,
        *,
        types: Sequence[Sequence[int]] | None = None,
        priority: int = 0,
    ) -> list[tuple[list[int], JobResult]]:
        """Run token-id rows (with token types for sentence pairs) as text jobs, one per
        length bucket and batch; the rows' indices with each job's result."""
        jobs = self.runner.text_jobs(rows, self.batcher.policy.max_batch_size, types)
        for _indices, job in jobs:
            job.outputs = outputs
        results = await asyncio.gather(*(self.batcher.submit(job, timeout_s, priority=priority) for _indices, job in jobs))
        return [(indices, result) for (indices, _job), result in zip(jobs, results, strict=True)]

    async def close(self, grace_s: float) -> None:
        await self.batcher.close(grace_s=grace_s)
