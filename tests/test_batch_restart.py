"""A batch survives its server: SIGTERM and then kill -9 in the middle of a 200-line chat batch,
each followed by a restart, and the batch completes with every line exactly once — the lines
finished before each stop are not run again (their result ids are unchanged) and none is lost."""

from __future__ import annotations

import io
import json
import signal
import time
from pathlib import Path
from typing import Any

import openai

from appliance.config import load_settings
from appliance.export.pipeline import ExportRequest, run_export
from tests.helpers.decoders import make_tiny_llama
from tests.helpers.server import create_key, free_port, serving_process

CHAT = "tiny-llama"
LINES = 200
BATCH_TIMEOUT_S = 240.0
#: Slow enough to stop the server mid-batch: few lines at once, long answers.
SLOW = {"APPLIANCE_BATCH_API__LINES_IN_FLIGHT": "2", "APPLIANCE_GENERATION__KV_BUDGET_BYTES": str(64 << 20)}


def _done_so_far(work: Path) -> dict[str, str]:
    """custom_id -> result id of the lines the progress files hold now."""
    done: dict[str, str] = {}
    for path in work.glob("*/*.jsonl"):
        for raw in path.read_bytes().splitlines():
            try:
                line = json.loads(raw)
            except ValueError:
                continue  # the line being written right now
            done[line["custom_id"]] = line["id"]
    return done


def _wait(api: openai.OpenAI, batch_id: str, predicate: Any, what: str) -> Any:
    deadline = time.monotonic() + BATCH_TIMEOUT_S
    while True:
        batch = api.batches.retrieve(batch_id)
        if predicate(batch):
            return batch
        assert batch.status not in ("failed", "expired", "cancelled"), batch
        assert time.monotonic() < deadline, f"waited for {what}: {batch.status} {batch.request_counts}"
        time.sleep(0.05)


def test_a_batch_resumes_after_sigterm_and_kill_9_without_losing_or_redoing_lines(tmp_path: Path) -> None:
    state = tmp_path / "state"
    settings = load_settings(state_dir=state)
    run_export(ExportRequest(source=str(make_tiny_llama(tmp_path / "llama")), name=CHAT, task="text-generation", quant="fp32"), settings)
    key = create_key(state, "bulk", ["infer"])
    lines = [
        {
            "custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": CHAT, "messages": [{"role": "user", "content": f"line {i}"}], "max_tokens": 24, "ignore_eos": True},
        }
        for i in range(LINES)
    ]
    content = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    port = free_port()
    api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=30)
    log = tmp_path / "server.log"
    finished_before: dict[str, str] = {}

    with serving_process(state, port, output=log, **SLOW) as proc:
        upload = api.files.create(file=("bulk.jsonl", io.BytesIO(content)), purpose="batch")
        batch_id = api.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h").id
        _wait(api, batch_id, lambda b: b.request_counts.completed >= 20, "20 lines")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()
    finished_before.update(_done_so_far(settings.batch_work_dir))
    assert 20 <= len(finished_before) < LINES, "stopped mid-batch"

    with serving_process(state, port, output=log, **SLOW) as proc:
        _wait(api, batch_id, lambda b: b.request_counts.completed >= len(finished_before) + 20, "20 more lines")
        snapshot = _done_so_far(settings.batch_work_dir)
        proc.kill()
        proc.wait(timeout=30)
    assert len(snapshot) < LINES, "killed mid-batch"
    assert all(snapshot[custom_id] == result_id for custom_id, result_id in finished_before.items()), "not run again"
    finished_before.update(snapshot)

    with serving_process(state, port, output=log, **SLOW):
        batch = _wait(api, batch_id, lambda b: b.status == "completed", "completion")
        assert batch.request_counts.completed == LINES and batch.request_counts.failed == 0
        output = [json.loads(raw) for raw in api.files.content(batch.output_file_id).text.splitlines()]
    custom_ids = [line["custom_id"] for line in output]
    assert sorted(custom_ids) == sorted(f"req-{i}" for i in range(LINES)), "every line exactly once"
    results = {line["custom_id"]: line["id"] for line in output}
    assert all(results[custom_id] == result_id for custom_id, result_id in finished_before.items()), "none redone"
    assert all(line["response"]["status_code"] == 200 for line in output)
    assert not any(settings.batch_work_dir.iterdir()), "the work folder is gone once the batch completed"
