"""Running batches: each line is sent through the server's own routes at the batch priority,
its answer appended to the batch's progress files, and the batch finished with OpenAI's output
and error files.

One runner per server process. It claims the oldest open batch nobody runs (batch_store.py),
keeps up to `batch_api.lines_in_flight` of its lines in the engines at once — continuous
batching fills idle slots with them while interactive requests, admitted first, keep their
latency — and refreshes its claim every HEARTBEAT_S, which is also when it notices a cancel
made by another process (one made here wakes it at once).

What survives a stop or a kill -9: a line is done when its answer is fsynced in the progress
files, and a resumed batch skips the custom ids found there. A line answered 429 or 503 (the
engines full, a model loading, the key's daily token budget spent, the server draining) was
not run: it is retried after Retry-After, or left for the next start when the server stops.
Every other answer, 2xx or error, is the line's result (errors go to the error file).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
from starlette.types import ASGIApp

from appliance.api.batch_input import BatchLine, count_inputs, read_lines
from appliance.api.local_call import LocalResponse, call_local
from appliance.config import BatchApiSettings
from appliance.errors import NotFound
from appliance.store.batch_files import FileStore
from appliance.store.batch_progress import BatchProgress
from appliance.store.batch_store import HEARTBEAT_S, BatchInfo, BatchStore, Progress, process_owner_id
from appliance.store.privacy import PrivacyPolicy

log = logging.getLogger("appliance.batch")

#: Answers that mean "not run, try later" rather than a result.
RETRY_STATUSES = frozenset({429, 503})
#: Bounds of the wait before a line answered 429/503 is sent again, in seconds.
RETRY_MIN_S = 0.2
RETRY_MAX_S = 30.0
#: How often an idle runner looks for batches created by other processes, and purges files.
IDLE_POLL_S = 2.0
PURGE_EVERY_S = 600.0
#: Lines read from the input file per trip to a worker thread.
READ_CHUNK_LINES = 256
REQUEST_ID_PREFIX = "batch_req_"
#: A batch whose run fails this many times in a row (e.g. its input file vanished) is failed.
RUN_ATTEMPTS_MAX = 3
#: Why unfinished lines of an expired batch are in its error file (OpenAI's code).
EXPIRED_CODE = "batch_expired"
OUTPUT_SUFFIX = "out"
ERROR_SUFFIX = "err"


class _TextForbidden(Exception):
    """The privacy mode became `off` while the batch ran."""


def _line_result(line: BatchLine, response: LocalResponse) -> dict[str, Any]:
    return {
        "id": REQUEST_ID_PREFIX + secrets.token_hex(12),
        "custom_id": line.custom_id,
        "response": {
            "status_code": response.status,
            "request_id": response.headers.get("x-request-id") or secrets.token_hex(12),
            "body": response.json(),
        },
        "error": None,
    }


def _retry_after(response: LocalResponse) -> float:
    try:
        wait = float(response.headers.get("retry-after", RETRY_MIN_S))
    except ValueError:
        wait = RETRY_MIN_S
    return min(max(wait, RETRY_MIN_S), RETRY_MAX_S)


def _chunks(lines: Iterator[BatchLine]) -> list[BatchLine]:
    chunk: list[BatchLine] = []
    for line in lines:
        chunk.append(line)
        if len(chunk) >= READ_CHUNK_LINES:
            break
    return chunk


class _Run:
    """One claimed batch being run by this process."""

    def __init__(self, runner: BatchRunner, batch: BatchInfo) -> None:
        self.runner = runner
        self.batch = batch
        self.progress = BatchProgress(runner.work_dir / batch.id)
        self.cancelled = batch.status == "cancelling"
        self.lost = False
        self.disconnect = anyio.Event()

    @property
    def expired(self) -> bool:
        return datetime.now(UTC) >= self.batch.expires_at

    async def heartbeat(self) -> None:
        store, owner = self.runner.batches, self.runner.owner
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            now = await anyio.to_thread.run_sync(store.heartbeat, self.batch.id, owner)
            if now is None:
                log.warning("batch %s: another process took it over; stopping here", self.batch.id)
                self.lost = True
                self.disconnect.set()
                return
            self.batch = now
            if now.status == "cancelling":
                self.cancelled = True

    def should_stop_sending(self) -> bool:
        return self.cancelled or self.lost or self.expired or self.runner.stopping

    async def send(self, line: BatchLine) -> None:
        runner = self.runner
        while True:
            if runner.privacy.mode == "off":
                raise _TextForbidden("privacy mode off")
            response = await call_local(
                runner.app, self.batch.endpoint, line.body, key_id=self.batch.key_id, disconnect=self.disconnect
            )
            if runner.stopping or self.lost:
                if response.status in RETRY_STATUSES or self.disconnect.is_set():
                    return  # not run: the next start (or the new owner) runs it
            if response.status not in RETRY_STATUSES:
                break
            if self.should_stop_sending():
                return
            await runner.sleep(_retry_after(response))
        result = _line_result(line, response)
        error = response.status >= 400
        await anyio.to_thread.run_sync(lambda: self.progress.append(result, error=error))
        body = result["response"]["body"]
        usage = body.get("usage") if isinstance(body, dict) else None
        usage = usage if isinstance(usage, dict) else {}
        delta = Progress(
            completed=0 if error else 1, failed=1 if error else 0,
            prompt_tokens=int(usage.get("prompt_tokens") or 0), completion_tokens=int(usage.get("completion_tokens") or 0),
            inputs=0 if error else line.inputs,
        )
        await anyio.to_thread.run_sync(runner.batches.add_progress, self.batch.id, runner.owner, delta)

    async def run(self) -> None:
        runner = self.runner
        recovered = await anyio.to_thread.run_sync(self.progress.recover)
        source = runner.files.path(self.batch.input_file_id)
        inputs = await anyio.to_thread.run_sync(count_inputs, source, self.batch.endpoint, recovered.succeeded)
        progress = replace(recovered.progress, inputs=inputs)
        await anyio.to_thread.run_sync(runner.batches.start, self.batch.id, runner.owner, progress)
        if recovered.done:
            log.info("batch %s: resuming, %d lines already done", self.batch.id, len(recovered.done))
        heartbeat = asyncio.get_running_loop().create_task(self.heartbeat(), name=f"batch-heartbeat-{self.batch.id}")
        limit = asyncio.Semaphore(runner.settings.lines_in_flight)
        in_flight: set[asyncio.Task[None]] = set()
        failure: BaseException | None = None

        def finished(task: asyncio.Task[None]) -> None:
            nonlocal failure
            in_flight.discard(task)
            limit.release()
            if not task.cancelled() and task.exception() is not None and failure is None:
                failure = task.exception()

        try:
            if self.batch.status != "finalizing":
                lines = read_lines(source, self.batch.endpoint, recovered.done)
                while not self.should_stop_sending() and failure is None:
                    chunk = await anyio.to_thread.run_sync(_chunks, lines)
                    if not chunk:
                        break
                    for line in chunk:
                        await limit.acquire()
                        if self.should_stop_sending() or failure is not None:
                            limit.release()
                            break
                        task = asyncio.get_running_loop().create_task(self.send(line))
                        in_flight.add(task)
                        task.add_done_callback(finished)
                if in_flight:
                    await asyncio.wait(set(in_flight))
            if isinstance(failure, _TextForbidden):
                await self.drop_text()
                return
            if failure is not None:
                raise failure
            if runner.stopping or self.lost:
                return
            await self.finish()
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
            self.disconnect.set()
            self.progress.close()

    async def finish(self) -> None:
        """Write the outcome: output and error files, the final status, and the work folder gone."""
        runner, batch = self.runner, self.batch
        status = "cancelled" if self.cancelled else "expired" if self.expired else "completed"
        await anyio.to_thread.run_sync(lambda: runner.batches.set_status(batch.id, runner.owner, "finalizing"))
        if status == "expired":
            await anyio.to_thread.run_sync(self.write_expired_lines)
        output_id = await anyio.to_thread.run_sync(self.publish, False)
        error_id = await anyio.to_thread.run_sync(self.publish, True)
        await anyio.to_thread.run_sync(
            lambda: runner.batches.set_status(batch.id, runner.owner, status, output_file_id=output_id, error_file_id=error_id)
        )
        await anyio.to_thread.run_sync(self.progress.remove)
        log.info("batch %s: %s", batch.id, status)

    def write_expired_lines(self) -> None:
        recovered = self.progress.recover()
        for line in read_lines(self.runner.files.path(self.batch.input_file_id), self.batch.endpoint, recovered.done):
            self.progress.append(
                {
                    "id": REQUEST_ID_PREFIX + secrets.token_hex(12),
                    "custom_id": line.custom_id,
                    "response": None,
                    "error": {"code": EXPIRED_CODE, "message": "the batch's completion window ended before this line ran"},
                },
                error=True,
            )

    def publish(self, error: bool) -> str | None:
        """The batch's output (or error) file, made from its progress file under an id derived
        from the batch's (so a finish interrupted by a crash and run again finds it)."""
        files, batch = self.runner.files, self.batch
        file_id = files.derived_id(batch.id, ERROR_SUFFIX if error else OUTPUT_SUFFIX)
        with contextlib.suppress(NotFound):
            return files.get(file_id, None).id
        self.progress.close()
        source = self.progress.error_path if error else self.progress.output_path
        if not source.exists() or source.stat().st_size == 0:
            return None
        incoming = files.incoming()
        incoming.handle.close()
        shutil.copyfile(source, incoming.path)
        kind = "errors" if error else "output"
        return files.publish(
            incoming, key_id=batch.key_id, purpose="batch_output", filename=f"{batch.id}_{kind}.jsonl",
            lines=self.progress.line_count(error=error), retention_days=self.runner.privacy.retention_days, file_id=file_id,
        ).id

    async def drop_text(self) -> None:
        """The privacy mode turned `off` mid-batch: no more text may be stored, so the batch
        fails and its partial answers are deleted."""
        runner, batch = self.runner, self.batch
        await anyio.to_thread.run_sync(self.progress.remove)
        errors = [{"code": "privacy_mode_off", "message": "the privacy mode became 'off'; the batch's partial answers were deleted", "param": None, "line": None}]
        await anyio.to_thread.run_sync(lambda: runner.batches.set_status(batch.id, runner.owner, "failed", errors=errors))
        log.warning("batch %s: failed, privacy mode is off", batch.id)


class BatchRunner:
    """Claims and runs batches in this process, one at a time, until `stop`."""

    def __init__(
        self, app: ASGIApp, *, settings: BatchApiSettings, files: FileStore, batches: BatchStore, privacy: PrivacyPolicy,
        work_dir: Path,
    ) -> None:
        self.app = app
        self.settings = settings
        self.files = files
        self.batches = batches
        self.privacy = privacy
        self.work_dir = work_dir
        self.owner = process_owner_id()
        self.stopping = False
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._current: _Run | None = None
        self._failures: dict[str, int] = {}

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="batch-runner")

    def wake(self) -> None:
        """A batch was created here: look now instead of at the next poll."""
        self._wake.set()

    def cancel(self, batch_id: str) -> None:
        """A batch was cancelled here: if this process runs it, send no more of its lines now
        (a cancel made elsewhere is seen at the next heartbeat)."""
        current = self._current
        if current is not None and current.batch.id == batch_id:
            current.cancelled = True
        self._wake.set()

    async def sleep(self, seconds: float) -> None:
        """Wait, but not past a stop."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)

    async def stop(self, grace_s: float) -> None:
        """Send no new line; lines in flight get `grace_s` to finish, then see their client go."""
        self.stopping = True
        self._stop.set()
        self._wake.set()
        if self._task is None:
            return
        done, _ = await asyncio.wait({self._task}, timeout=grace_s)
        if not done:
            if self._current is not None:
                self._current.disconnect.set()
            done, _ = await asyncio.wait({self._task}, timeout=RETRY_MAX_S)
        if not done:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        await anyio.to_thread.run_sync(self.files.sweep_orphans)
        last_purge = 0.0
        loop = asyncio.get_running_loop()
        while not self.stopping:
            try:
                if loop.time() - last_purge >= PURGE_EVERY_S:
                    last_purge = loop.time()
                    await anyio.to_thread.run_sync(self.purge)
                batch = await anyio.to_thread.run_sync(self.batches.claim, self.owner)
                if batch is None:
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), timeout=IDLE_POLL_S)
                    continue
                self._current = _Run(self, batch)
                await self._current.run()
                self._failures.pop(batch.id, None)
            except Exception as exc:  # noqa: BLE001 - one bad batch must not stop the runner
                reason = f"{exc.__class__.__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
                log.error("batch runner: %s", reason)
                if self._current is not None:
                    await anyio.to_thread.run_sync(self._count_failure, self._current.batch.id, reason)
                await self.sleep(IDLE_POLL_S)
            finally:
                self._current = None

    def _count_failure(self, batch_id: str, reason: str) -> None:
        """Retry a batch whose run failed; fail it for good after RUN_ATTEMPTS_MAX tries."""
        self._failures[batch_id] = self._failures.get(batch_id, 0) + 1
        if self._failures[batch_id] < RUN_ATTEMPTS_MAX:
            return
        self._failures.pop(batch_id)
        errors = [{"code": "internal_error", "message": f"the batch could not run: {reason}", "param": None, "line": None}]
        self.batches.set_status(batch_id, self.owner, "failed", errors=errors)

    def purge(self) -> int:
        """Delete files past the retention period (not those an unfinished batch reads)."""
        removed = self.files.purge_expired(datetime.now(UTC), in_use=self.batches.open_input_files())
        if removed:
            log.info("batch files: %d past the retention period deleted", removed)
        return removed
