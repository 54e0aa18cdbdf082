"""Exports started from the Models page: one `appliance export` child process at a time.

The export stage needs torch and transformers, which the server must never import, so the UI
runs the same command a person would type, as a separate process, with its output in
`<state_dir>/exports/job-<id>.log`. The page polls the job for status and the log's tail. When
the process publishes a new version and exits 0, the model is (re)loaded unless an admin
holds it back. Arguments are checked and passed as a list, the source after `--`. Never runs
a shell and never imports the export stage: where the form must refuse what `appliance export`
refuses (an int8 KV cache), both ask appliance/repository/kv_cache.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.errors import InvalidInput
from appliance.repository.manifest import check_model_name
from appliance.repository.kv_cache import DEFAULT_KV_CACHE, INT8_KV_VARIANTS, KV_CACHE_CHOICES, kv_cache_mismatch
from appliance.store.deployments import DeploymentStore
from appliance.store.export_jobs import ExportJobStore, JobInfo

log = logging.getLogger("appliance.admin")

#: `--quant auto`: the export picks the variant per task and provider.
AUTO_QUANT = "auto"
QUANT_CHOICES = (AUTO_QUANT, "fp32", "fp16", "int8", "int8-static", "int4")
#: The one task whose export has a KV cache; "" lets the export detect the task.
GENERATION_TASK = "text-generation"
TASK_CHOICES = ("", GENERATION_TASK, "feature-extraction", "text-classification")
PACKAGE_SOURCE = re.compile(r"^package:[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
#: Lines of the log the page shows.
LOG_TAIL_LINES = 40
LOG_TAIL_BYTES = 64 * 1024
#: Seconds a cancelled export gets to stop before it is killed.
CANCEL_GRACE_S = 5.0


@dataclass(frozen=True)
class ExportForm:
    """An export asked for on the Models page, validated: what the child process is told."""

    source: str
    name: str
    quant: str
    #: None: the export detects the task from the source.
    task: str | None
    kv_cache: str


def check_kv_cache(kv_cache: str, quant: str, task: str) -> None:
    """Refuse a KV cache `appliance export` would refuse, in its words, so the admin reads it
    under the form instead of in a failed job's log. `auto` and a detected task pass when they
    may resolve to an int8-capable variant: the export decides them (on a GPU box auto means
    fp16, which it refuses there). `quant` and `task` are valid choices already."""
    generation = task in ("", GENERATION_TASK)
    variant = INT8_KV_VARIANTS[0] if generation and quant == AUTO_QUANT else quant
    mismatch = kv_cache_mismatch(kv_cache, task, variant, INT8_KV_VARIANTS if generation else ())
    if mismatch is not None:
        raise InvalidInput(f"kv_cache: {mismatch}", field="kv_cache")


def check_export_request(source: str, name: str, quant: str, task: str, kv_cache: str) -> ExportForm:
    """The form's fields validated in order; InvalidInput names the first bad field."""
    source = source.strip()
    if not source:
        raise InvalidInput("source: give a local folder, a .gguf or .onnx file, or package:NAME", field="source")
    if source.startswith("package:"):
        if not PACKAGE_SOURCE.fullmatch(source):
            raise InvalidInput("source: package:NAME with a valid Python distribution name", field="source")
    else:
        path = Path(source)
        if not path.is_absolute():
            raise InvalidInput("source: use an absolute path on the appliance", field="source")
        if not (path.is_dir() or (path.is_file() and path.suffix in (".gguf", ".onnx"))):
            raise InvalidInput(f"source: {source} is not a folder, a .gguf or an .onnx file on the appliance", field="source")
    try:
        check_model_name(name.strip())
    except ValueError as exc:
        raise InvalidInput(f"name: {exc}", field="name") from None
    if quant not in QUANT_CHOICES:
        raise InvalidInput(f"quant: choose one of {', '.join(QUANT_CHOICES)}", field="quant")
    if task not in TASK_CHOICES:
        raise InvalidInput(f"task: choose one of {', '.join(t for t in TASK_CHOICES if t)}", field="task")
    check_kv_cache(kv_cache, quant, task)
    return ExportForm(source=source, name=name.strip(), quant=quant, task=task or None, kv_cache=kv_cache)


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, 2)
            size = handle.tell()
            handle.seek(max(0, size - LOG_TAIL_BYTES))
            data = handle.read()
    except OSError:
        return ""
    text = data.decode("utf-8", errors="replace").replace("\r", "\n")
    return "\n".join(text.splitlines()[-lines:])


class ExportRunner:
    def __init__(
        self, state_dir: Path, jobs: ExportJobStore, reload: Callable[[str], Awaitable[object]], deployments: DeploymentStore,
        *, command: list[str] | None = None, config: Path | None = None,
    ) -> None:
        self.state_dir = state_dir
        #: The server's configuration file, handed on so the export sees the same settings.
        self.config = config
        self.jobs = jobs
        #: Loads the model's serving version in whichever engine serves it.
        self.reload = reload
        self.deployments = deployments
        #: The program and leading arguments; tests and packaged installs may differ.
        self.command = command or [sys.executable, "-m", "appliance"]
        self._processes: dict[int, asyncio.subprocess.Process] = {}
        self._watchers: set[asyncio.Task[None]] = set()

    @property
    def busy(self) -> bool:
        return any(process.returncode is None for process in self._processes.values())

    async def start(
        self, *, source: str, name: str, quant: str, task: str, kv_cache: str, actor: str, address: str
    ) -> JobInfo:
        request = check_export_request(source, name, quant, task, kv_cache)
        if self.busy:
            raise InvalidInput("source: an export is already running; wait for it to finish", field="source")
        logs = self.state_dir / "exports"
        logs.mkdir(parents=True, exist_ok=True, mode=0o700)
        job = await asyncio.to_thread(
            self.jobs.create, source=request.source, name=request.name, quant=request.quant, task=request.task,
            kv_cache=request.kv_cache, log_file="", actor=actor, address=address,
        )
        log_path = logs / f"job-{job.id}.log"
        arguments = [*self.command, "export", "--name", request.name, "--quant", request.quant, "--state-dir", str(self.state_dir)]
        if request.task:
            arguments += ["--task", request.task]
        if request.kv_cache != DEFAULT_KV_CACHE:
            arguments += ["--kv-cache", request.kv_cache]
        if self.config is not None:
            arguments += ["--config", str(self.config)]
        arguments += ["--", request.source]
        with open(log_path, "wb") as output:
            process = await asyncio.create_subprocess_exec(
                *arguments, stdin=asyncio.subprocess.DEVNULL, stdout=output, stderr=asyncio.subprocess.STDOUT
            )
        self._processes[job.id] = process
        await asyncio.to_thread(self.jobs.started, job.id, process.pid, str(log_path))
        watcher = asyncio.get_running_loop().create_task(self._watch(job.id, request.name, process), name=f"export-{job.id}")
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)
        log.info(
            "export job %d started: %s as %s, KV cache %s (pid %d)", job.id, request.name, request.quant, request.kv_cache, process.pid
        )
        return job

    def log_path(self, job_id: int) -> Path:
        return self.state_dir / "exports" / f"job-{job_id}.log"

    async def _watch(self, job_id: int, name: str, process: asyncio.subprocess.Process) -> None:
        code = await process.wait()
        cancelled = code < 0 or getattr(process, "_appliance_cancelled", False)
        status = "cancelled" if cancelled else ("succeeded" if code == 0 else "failed")
        await asyncio.to_thread(self.jobs.finished, job_id, status, code)
        log.info("export job %d %s (exit %d)", job_id, status, code)
        if status == "succeeded":
            held = await asyncio.to_thread(self.deployments.held_back)
            if name not in held:
                try:
                    await self.reload(name)
                except Exception as exc:  # noqa: BLE001 - the job's own result stands; say why it does not serve
                    log.warning("export job %d published %s but loading it failed: %s", job_id, name, exc)

    async def cancel(self, job_id: int) -> bool:
        process = self._processes.get(job_id)
        if process is None or process.returncode is not None:
            return False
        process._appliance_cancelled = True  # type: ignore[attr-defined]
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), CANCEL_GRACE_S)
        except TimeoutError:
            process.kill()
        return True

    def status(self, job_id: int) -> dict[str, Any]:
        job = self.jobs.get(job_id)
        return {
            "id": job.id,
            "name": job.name,
            "source": job.source,
            "quant": job.quant,
            "kv_cache": job.kv_cache,
            "status": job.status,
            "exit_code": job.exit_code,
            "finished": job.finished,
            "log": tail(self.log_path(job.id)),
        }

    async def close(self) -> None:
        for job_id in list(self._processes):
            await self.cancel(job_id)
        for watcher in list(self._watchers):
            with contextlib.suppress(Exception):
                await watcher
