"""Dynamic batching: batches form by size and delay, the queue is bounded, deadlines and
cancellations drop work, a bad request fails alone, text is bucketed by length.

The batcher tests hand it a plain `execute(jobs)` function (its whole contract with the
runner); the runner tests run real onnxruntime sessions on tiny models.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
import pytest

from appliance.errors import CapacityExceeded, DeadlineExceeded, InvalidInput, ModelNotReady
from appliance.repository.store import ModelRepository
from appliance.runtime.batcher import BatchPolicy, DynamicBatcher, InferenceJob, SessionPoisoned
from appliance.runtime.providers import ProviderConfig, create_session
from appliance.runtime.runner import TensorRunner, length_bucket
from tests.helpers.tiny_models import EMBED_SPECIALS, EMBED_WORDS, embed_reference, embedder_table, publish_embedder


def _job(value: float, rows: int = 1, bucket: object = "b") -> InferenceJob:
    return InferenceJob(inputs={"x": np.full((rows, 1), value, np.float32)}, rows=rows, bucket=bucket)


class Recorder:
    """An execute function that records batch sizes and can be held until released."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.release = threading.Event()
        self.release.set()
        self.entered = threading.Event()

    def __call__(self, jobs: list[InferenceJob]) -> list:
        self.entered.set()
        self.release.wait(10)
        self.batches.append(len(jobs))
        return [{"y": job.inputs["x"] * 2} for job in jobs]


def test_concurrent_requests_share_one_batch() -> None:
    async def scenario() -> None:
        recorder = Recorder()
        batcher = DynamicBatcher("m", recorder, BatchPolicy(max_batch_size=8, max_queue_delay_us=200_000))
        batcher.start()
        results = await asyncio.gather(*(batcher.submit(_job(i), 5) for i in range(8)))
        assert [float(r.outputs["y"][0, 0]) for r in results] == [2.0 * i for i in range(8)]
        assert recorder.batches == [8] and all(r.batch_rows == 8 for r in results)
        await batcher.close()

    asyncio.run(scenario())


def test_batching_off_runs_one_request_per_execution() -> None:
    async def scenario() -> None:
        recorder = Recorder()
        batcher = DynamicBatcher("m", recorder, BatchPolicy(enabled=False))
        batcher.start()
        await asyncio.gather(*(batcher.submit(_job(i), 5) for i in range(4)))
        assert recorder.batches == [1, 1, 1, 1]
        await batcher.close()

    asyncio.run(scenario())


def test_full_queue_raises_capacity_exceeded_with_retry_after() -> None:
    async def scenario() -> None:
        recorder = Recorder()
        recorder.release.clear()
        batcher = DynamicBatcher("m", recorder, BatchPolicy(max_batch_size=1, max_queue_size=2, max_queue_delay_us=0))
        batcher.start()
        running = asyncio.ensure_future(batcher.submit(_job(0), 5))
        await asyncio.to_thread(recorder.entered.wait, 5)  # first job is executing
        queued = [asyncio.ensure_future(batcher.submit(_job(i), 5)) for i in (1, 2)]
        await asyncio.sleep(0)
        with pytest.raises(CapacityExceeded) as caught:
            await batcher.submit(_job(3), 5)
        assert caught.value.retry_after_s >= 1
        recorder.release.set()
        await asyncio.gather(running, *queued)
        await batcher.close()

    asyncio.run(scenario())


def test_deadline_drops_queued_work_and_it_never_runs() -> None:
    async def scenario() -> None:
        recorder = Recorder()
        recorder.release.clear()
        batcher = DynamicBatcher("m", recorder, BatchPolicy(max_batch_size=1, max_queue_delay_us=0))
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(_job(0), 5))
        await asyncio.to_thread(recorder.entered.wait, 5)
        with pytest.raises(DeadlineExceeded):
            await batcher.submit(_job(1), 0.05)
        recorder.release.set()
        await first
        await asyncio.sleep(0.05)
        assert recorder.batches == [1]  # the expired job was dropped, not executed
        assert batcher.queued == 0
        await batcher.close()

    asyncio.run(scenario())


def test_cancelled_request_is_dropped_before_it_runs() -> None:
    async def scenario() -> None:
        recorder = Recorder()
        recorder.release.clear()
        batcher = DynamicBatcher("m", recorder, BatchPolicy(max_batch_size=4, max_queue_delay_us=0))
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(_job(0), 5))
        await asyncio.to_thread(recorder.entered.wait, 5)
        gone = asyncio.ensure_future(batcher.submit(_job(1), 5))
        kept = asyncio.ensure_future(batcher.submit(_job(2), 5))
        await asyncio.sleep(0.01)
        gone.cancel()  # the client disconnected
        recorder.release.set()
        await first
        assert float((await kept).outputs["y"][0, 0]) == 4.0
        assert recorder.batches == [1, 1]
        await batcher.close()

    asyncio.run(scenario())


def test_jobs_of_different_buckets_never_share_a_batch() -> None:
    async def scenario() -> None:
        recorder = Recorder()
        batcher = DynamicBatcher("m", recorder, BatchPolicy(max_batch_size=8, max_queue_delay_us=100_000))
        batcher.start()
        await asyncio.gather(*(batcher.submit(_job(i, bucket=i % 2), 5) for i in range(6)))
        assert sorted(recorder.batches) == [3, 3]
        await batcher.close()

    asyncio.run(scenario())


def test_poisoned_session_fails_the_batch_as_not_ready_and_reports_it() -> None:
    async def scenario() -> None:
        poisoned: list[str] = []

        def execute(jobs: list[InferenceJob]) -> list:
            raise SessionPoisoned("Failed to allocate memory for requested buffer of size 1234")

        batcher = DynamicBatcher("m", execute, BatchPolicy(), on_poisoned=poisoned.append)
        batcher.start()
        with pytest.raises(ModelNotReady):
            await batcher.submit(_job(1), 5)
        assert poisoned and "allocate" in poisoned[0]
        await batcher.close()

    asyncio.run(scenario())


# -- the real runner ------------------------------------------------------------------------
@pytest.fixture
def embed_runner(tmp_path: Path) -> TensorRunner:
    version = publish_embedder(ModelRepository(tmp_path))
    session, _ = create_session(version.model_path, version.manifest, ProviderConfig())
    return TensorRunner(version.manifest, [session])


def _ids(words: list[str]) -> list[int]:
    vocab = {token: i for i, token in enumerate(EMBED_SPECIALS + EMBED_WORDS)}
    return [vocab["[CLS]"], *(vocab[w] for w in words), vocab["[SEP]"]]


def _text_job(runner: TensorRunner, ids: list[int]) -> InferenceJob:
    array = np.array([ids], dtype=np.int64)
    return runner.make_job({"input_ids": array, "attention_mask": np.ones_like(array)}, None)


def test_padding_inside_a_batch_does_not_change_any_embedding(embed_runner: TensorRunner) -> None:
    table = embedder_table()
    texts = [["cat"], ["the", "cat", "sat", "on", "the", "mat"], ["blue", "sky"]]
    jobs = [_text_job(embed_runner, _ids(words)) for words in texts]
    results = embed_runner.execute(jobs)
    for words, result in zip(texts, results, strict=True):
        assert isinstance(result, dict)
        np.testing.assert_allclose(result["sentence_embedding"][0], embed_reference(table, _ids(words)), rtol=1e-5, atol=1e-6)
        assert result["token_embeddings"].shape == (1, len(_ids(words)), 8)  # un-padded


def test_bad_request_fails_alone_and_its_batch_mates_succeed(embed_runner: TensorRunner) -> None:
    good = _text_job(embed_runner, _ids(["red", "car"]))
    bad = _text_job(embed_runner, [2, 10_000, 3])  # token id past the embedding table
    other = _text_job(embed_runner, _ids(["dog"]))
    results = embed_runner.execute([good, bad, other])
    assert isinstance(results[0], dict) and isinstance(results[2], dict)
    assert isinstance(results[1], InvalidInput)


def test_text_lengths_are_bucketed_by_powers_of_two(embed_runner: TensorRunner) -> None:
    assert [length_bucket(n) for n in (1, 8, 9, 16, 17, 100)] == [8, 8, 16, 16, 32, 128]
    short = _text_job(embed_runner, _ids(["cat"]))
    long = _text_job(embed_runner, _ids(["the"] * 12))
    assert short.bucket != long.bucket and short.length == 3 and long.length == 14


def test_text_jobs_group_rows_by_length_and_pad_each_batch_once(embed_runner: TensorRunner) -> None:
    rows = [_ids(["cat"]), _ids(["the"] * 12), _ids(["blue", "sky"]), _ids(["red"] * 13)]
    jobs = embed_runner.text_jobs(rows, max_rows=8)
    assert sorted(len(indices) for indices, _job in jobs) == [2, 2], "short and long rows never share a job"
    table = embedder_table()
    results = embed_runner.execute([job for _indices, job in jobs])
    for (indices, _job), result in zip(jobs, results, strict=True):
        assert isinstance(result, dict)
        for row, index in enumerate(indices):
            np.testing.assert_allclose(result["sentence_embedding"][row], embed_reference(table, rows[index]), rtol=1e-5, atol=1e-6)
    assert [len(indices) for indices, _job in embed_runner.text_jobs(rows[:1] * 5, max_rows=2)] == [2, 2, 1]


class OrderRecorder(Recorder):
    """Also records which jobs each batch ran, by their input value."""

    def __init__(self) -> None:
        super().__init__()
        self.values: list[float] = []

    def __call__(self, jobs: list[InferenceJob]) -> list:
        self.values.extend(float(job.inputs["x"][0, 0]) for job in jobs)
        return super().__call__(jobs)


def _priority_order(aging_s: float, monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """A batch job holds the model; another batch job, then an interactive one queue behind it."""
    from appliance.runtime import batcher as batcher_module

    monkeypatch.setattr(batcher_module, "PRIORITY_AGING_S", aging_s)

    async def scenario() -> list[float]:
        recorder = OrderRecorder()
        recorder.release.clear()
        batcher = DynamicBatcher("m", recorder, BatchPolicy(max_batch_size=1, max_queue_delay_us=0))
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(_job(1.0), 5, priority=1))
        await asyncio.to_thread(recorder.entered.wait, 5)
        later = [asyncio.ensure_future(batcher.submit(_job(2.0), 5, priority=1))]
        await asyncio.sleep(0.01)
        later.append(asyncio.ensure_future(batcher.submit(_job(3.0), 5, priority=0)))
        await asyncio.sleep(0.01)
        recorder.release.set()
        await asyncio.gather(first, *later)
        await batcher.close()
        return recorder.values

    return asyncio.run(scenario())


def test_interactive_jobs_run_before_waiting_batch_jobs(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _priority_order(10.0, monkeypatch) == [1.0, 3.0, 2.0]


def test_aged_batch_jobs_run_in_arrival_order(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _priority_order(0.0, monkeypatch) == [1.0, 2.0, 3.0]
