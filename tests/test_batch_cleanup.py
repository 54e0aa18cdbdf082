"""The store's rules for deleting batch text (shared by the Batch API and the admin UI) and the
price of a batch, on a real SQLite database and real files: a finished batch goes with its
input, output and error files but never an input an unfinished batch reads; "delete every
batch file" keeps exactly those inputs and counts files and bytes; an unfinished batch is not
deleted; a batch is priced by its completion tokens (or its embedding inputs) at the version
served now, and a model without a figure says why it has no batch cost."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest

from appliance.config import CostSettings
from appliance.errors import InvalidInput, NotFound
from appliance.store.batch_cleanup import delete_all_files, delete_batch, delete_file
from appliance.store.batch_files import FileInfo, FileStore
from appliance.store.batch_pricing import NOTHING_RAN_BASIS, batch_cost
from appliance.store.batch_store import BatchInfo, BatchStore
from appliance.store.db import Database
from appliance.store.migrate import upgrade
from appliance.store.usage_pricing import MeasuredRate, PriceList

OWNER = "host:1:test"
#: 3.6 per hour: a model measured at 1 unit/s costs 1.0 per 1k units.
ROUND_COST = CostSettings(hardware_price=0.0, power_watts=1000.0, electricity_price_kwh=3.6, currency="EUR")


@pytest.fixture
def stores(tmp_path: Path) -> tuple[BatchStore, FileStore]:
    database = Database(f"sqlite:///{tmp_path / 'appliance.db'}")
    upgrade(database)
    yield BatchStore(database), FileStore(database, tmp_path / "batch-files")
    database.close()


def _file(files: FileStore, tmp_path: Path, text: str, *, purpose: str = "batch", file_id: str | None = None) -> FileInfo:
    source = tmp_path / f"src-{len(list(tmp_path.iterdir()))}.jsonl"
    source.write_text(text)
    return files.publish(
        source, key_id="k1", purpose=purpose, filename="in.jsonl", lines=text.count("\n"), retention_days=7, file_id=file_id
    )


def _batch(batches: BatchStore, input_id: str) -> BatchInfo:
    return batches.create(
        key_id="k1", endpoint="/v1/embeddings", model="emb", input_file_id=input_id, completion_window="24h",
        window=timedelta(hours=24), total=1, metadata=None,
    )


def _finish(batches: BatchStore, batch_id: str, **files: str) -> None:
    claimed = batches.claim(OWNER)
    assert claimed is not None and claimed.id == batch_id
    batches.set_status(batch_id, OWNER, "completed", **files)


def test_deleting_a_finished_batch_deletes_its_files_but_not_an_input_an_unfinished_batch_reads(
    stores: tuple[BatchStore, FileStore], tmp_path: Path
) -> None:
    batches, files = stores
    shared = _file(files, tmp_path, '{"a": 1}\n')
    done = _batch(batches, shared.id)
    output = _file(files, tmp_path, '{"answer": 1}\n{"answer": 2}\n', purpose="batch_output")
    _finish(batches, done.id, output_file_id=output.id)
    running = _batch(batches, shared.id)  # a second batch on the same input, not finished
    with pytest.raises(InvalidInput, match="cancel the batch first"):
        delete_batch(batches, files, running.id)
    info, deleted = delete_batch(batches, files, done.id)
    assert info.id == done.id and (deleted.files, deleted.bytes, deleted.kept) == (1, output.bytes, 1)
    assert not files.path(output.id).exists() and files.path(shared.id).exists()
    with pytest.raises(NotFound):
        batches.get(done.id, None)
    with pytest.raises(NotFound):
        delete_batch(batches, files, done.id)
    with pytest.raises(InvalidInput, match="input of a batch that has not finished"):
        delete_file(batches, files, shared.id, "k1")
    with pytest.raises(NotFound):
        delete_file(batches, files, shared.id, "someone-else")


def test_deleting_every_batch_file_keeps_the_inputs_of_unfinished_batches_and_counts_the_rest(
    stores: tuple[BatchStore, FileStore], tmp_path: Path
) -> None:
    batches, files = stores
    loose = _file(files, tmp_path, '{"a": 1}\n')
    finished_input = _file(files, tmp_path, '{"b": 2}\n{"c": 3}\n')
    _finish(batches, _batch(batches, finished_input.id).id)
    busy_input = _file(files, tmp_path, '{"d": 4}\n')
    running = _batch(batches, busy_input.id)
    assert files.totals() == (3, loose.bytes + finished_input.bytes + busy_input.bytes)
    deleted = delete_all_files(batches, files)
    assert (deleted.files, deleted.bytes, deleted.kept) == (2, loose.bytes + finished_input.bytes, 1)
    assert [info.id for info in files.list(None)] == [busy_input.id]
    assert sorted(path.name for path in files.folder.glob("*.jsonl")) == [f"{busy_input.id}.jsonl"]
    assert batches.get(running.id, None).status == "in_progress"


def _info(**counts: int) -> BatchInfo:
    base = BatchInfo(
        id="batch_1", key_id="k1", endpoint="/v1/chat/completions", model="llm", input_file_id="file-1", completion_window="24h",
        status="completed", created_at=None, expires_at=None, times={}, total=10, completed=0, failed=0, prompt_tokens=0,  # type: ignore[arg-type]
        completion_tokens=0, inputs=0, output_file_id=None, error_file_id=None, errors=None, metadata=None,
    )
    return replace(base, **counts)


def test_a_batch_is_priced_by_its_completion_tokens_at_the_version_served_now() -> None:
    rates = [
        MeasuredRate("llm", 2, "int4", "completion_tokens", 2.0, "2026-01-01T00:00:00Z"),
        MeasuredRate("llm", None, None, "completion_tokens", 1.0, "2026-01-01T00:00:00Z"),
        MeasuredRate("emb", None, None, "embedding_inputs", 100.0, "2026-01-01T00:00:00Z"),
    ]
    prices = PriceList(rates, ROUND_COST)
    batch = _info(completed=8, failed=2, prompt_tokens=500, completion_tokens=3000)
    at_v2 = batch_cost(batch, prices, 2)
    assert at_v2.cost == pytest.approx(3000 / 1000 * 0.5) and at_v2.currency == "EUR"
    assert "3000 completion tokens" in at_v2.basis and "v2 int4" in at_v2.basis and "version served now" in at_v2.basis
    plain = batch_cost(batch, prices, None)  # the model serves no version now: the plain-run figure
    assert plain.cost == pytest.approx(3.0) and "no version of the model is served now" in plain.basis
    assert batch_cost(replace(batch, completed=0), prices, 2) == type(at_v2)(0.0, "EUR", NOTHING_RAN_BASIS)
    embeddings = batch_cost(replace(batch, model="emb", endpoint="/v1/embeddings", inputs=4000), prices, None)
    assert embeddings.cost == pytest.approx(4000 / 1000 * (1000 / 100 / 3600 * ROUND_COST.per_hour))
    assert "4000 embedding inputs" in embeddings.basis
    unmeasured = batch_cost(replace(batch, model="other"), prices, 1)
    assert unmeasured.cost is None and "appliance bench --model other" in unmeasured.basis
