"""`appliance bench`: load a running appliance (or, with --compare, each variant of a model on a
private server) and report throughput, latency percentiles and cost per 1k tokens.

Composition root for appliance.benchmark: parses options, builds BenchOptions from them and
the settings' cost model, draws a progress bar, prints the table (or JSON) and writes
results.json, the PNG plots and the dashboard's `<state dir>/bench/latest.json`. Every refusal
is one line and a non-zero exit. Never imports the server's runtime or generation layers.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from appliance.benchmark.compare import DEFAULT_MAX_QUALITY_LOSS
from appliance.cli.app import ConfigOption, StateDirOption, app, console, err_console, fail, settings_from
from appliance.errors import ApplianceError, InvalidInput

#: Characters per line of the table when stdout is not a terminal.
PIPED_TABLE_WIDTH = 200
#: Closed-loop clients when neither --concurrency nor --rate is given.
DEFAULT_CONCURRENCY = 1
#: Folder under `<state dir>/bench/` where each run's results.json and plots go.
RUNS_DIR = "runs"
#: Folder under `<state dir>/bench/` where --compare's private servers live while they run.
SERVERS_DIR = ".servers"


def parse_list(text: str | None, field_name: str, kind: type[int] | type[float]) -> list:
    """'1,2,4' as numbers; one readable error for anything else."""
    if text is None:
        return []
    values = []
    for part in text.split(","):
        part = part.strip()
        try:
            values.append(kind(part))
        except ValueError:
            raise InvalidInput(f"{field_name}: {part!r} is not a number (expected e.g. 1,2,4)", field=field_name) from None
    return values


class BarProgress:
    """One rich progress bar per sweep point."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.task: TaskID | None = None

    def point_started(self, label: str) -> None:
        self.task = self.progress.add_task(label, total=1.0, done=0)

    def point_progress(self, fraction: float, finished: int) -> None:
        if self.task is not None:
            self.progress.update(self.task, completed=fraction, done=finished)

    def point_finished(self) -> None:
        if self.task is not None:
            self.progress.update(self.task, completed=1.0)


@app.command("bench")
def bench(
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model to load (its OpenAI model id / V2 name).")] = None,
    compare: Annotated[str | None, typer.Option("--compare", help="Measure every published variant of this model, each on a private server.")] = None,
    workload: Annotated[str | None, typer.Option("--workload", "-w", help="chat | embeddings | rerank | infer (default: chat; with --compare, from the model's task).")] = None,
    url: Annotated[str | None, typer.Option("--url", help="Server to load (default http://127.0.0.1:<port>). Loopback and private addresses only, unless --allow-remote.")] = None,
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="APPLIANCE_API_KEY", help="API key with the infer scope. Env: APPLIANCE_API_KEY.")] = None,
    version: Annotated[int | None, typer.Option("--version", help="Model version to address (infer workload: /v2/models/NAME/versions/V).")] = None,
    concurrency: Annotated[str | None, typer.Option("--concurrency", "-c", help="Closed loop: concurrent clients per sweep point, e.g. 1,2,4,8.")] = None,
    rate: Annotated[str | None, typer.Option("--rate", "-r", help="Open loop: Poisson arrivals per second per sweep point, e.g. 0.5,1,2.")] = None,
    duration: Annotated[float, typer.Option("--duration", help="Measured seconds per sweep point (after warm-up).")] = 10.0,
    max_requests: Annotated[int, typer.Option("--max-requests", help="Most measured requests per sweep point.")] = 200,
    warmup: Annotated[int, typer.Option("--warmup", help="Unmeasured warm-up requests before each point.")] = 2,
    timeout: Annotated[float, typer.Option("--timeout", help="Deadline of one request, seconds.")] = 120.0,
    prompts: Annotated[Path | None, typer.Option("--prompts", help="JSONL workload file: {prompt|messages, max_tokens} per line (default: the shipped set).")] = None,
    max_tokens: Annotated[str | None, typer.Option("--max-tokens", help="Output length N or uniform range LOW:HIGH (default: per prompt).")] = None,
    temperature: Annotated[float | None, typer.Option("--temperature", help="Sampling temperature sent with chat requests (default: the server's).")] = None,
    ignore_eos: Annotated[bool, typer.Option("--ignore-eos", help="Chat: generate exactly max_tokens, ignoring the model's end of sequence.")] = False,
    sentences: Annotated[int, typer.Option("--sentences", help="Texts per embeddings request; documents per rerank request; rows per infer request.")] = 8,
    sequence: Annotated[int, typer.Option("--sequence", help="Length of dynamic non-batch dimensions of infer tensors.")] = 16,
    max_quality_loss: Annotated[float, typer.Option("--max-quality-loss", help="Quality budget for --compare's recommendation (0 = lossless).")] = DEFAULT_MAX_QUALITY_LOSS,
    out: Annotated[Path | None, typer.Option("--out", help="Folder for results.json and the PNG plots (default: <state dir>/bench/runs/<time>).")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the result JSON on stdout instead of the table.")] = False,
    no_plots: Annotated[bool, typer.Option("--no-plots", help="Skip the PNG plots.")] = False,
    allow_remote: Annotated[bool, typer.Option("--allow-remote", help="Allow a target outside loopback and private networks.")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of prompt choice, arrival times and the per-request sampling seeds.")] = 0,
    state_dir: StateDirOption = None,
    config: ConfigOption = None,
) -> None:
    """Load a running appliance and report throughput, latency percentiles and cost per 1k tokens."""
    from appliance.benchmark.plots import write_plots
    from appliance.benchmark.results import BENCH_DIR, write_result
    from appliance.benchmark.runner import BenchOptions, run_bench, run_compare
    from appliance.benchmark.table import render
    from appliance.benchmark.workloads import load_prompts, parse_range
    from appliance.repository import ModelRepository

    settings = settings_from(state_dir=state_dir, config=config)
    if (model is None) == (compare is None):
        fail("model: give --model NAME (load a running server) or --compare NAME (every variant), not both or neither", code=2)
    if compare is not None and url is not None:
        fail("url: --compare starts a private server per variant; it does not take --url", code=2)
    if workload is not None and workload not in ("chat", "embeddings", "rerank", "infer"):
        fail(f"workload: must be chat, embeddings, rerank or infer, got {workload!r}", code=2)
    try:
        options = BenchOptions(
            model=model or compare or "",
            workload=workload or "chat",  # type: ignore[arg-type]
            url=url or f"http://127.0.0.1:{settings.port}",
            api_key=api_key,
            version=version,
            prompts=prompts,
            output_tokens=parse_range(max_tokens, "max-tokens") if max_tokens else None,
            temperature=temperature,
            ignore_eos=ignore_eos,
            sentences=sentences,
            sequence=sequence,
            concurrency=parse_list(concurrency, "concurrency", int) or ([] if rate else [DEFAULT_CONCURRENCY]),
            rates=parse_list(rate, "rate", float),
            duration_s=duration,
            max_requests=max_requests,
            warmup_requests=warmup,
            request_timeout_s=timeout,
            allow_remote=allow_remote,
            seed=seed,
        )
        if prompts is not None:
            load_prompts(prompts)  # a malformed file fails before any server is started
        columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[done]} done"), TimeElapsedColumn())
        with Progress(*columns, console=err_console, transient=True, disable=not err_console.is_terminal) as bar:
            sink = BarProgress(bar)
            if compare is not None:
                result = run_compare(
                    options,
                    settings.cost,
                    ModelRepository(settings.models_dir),
                    settings.state_dir / BENCH_DIR / SERVERS_DIR,
                    max_quality_loss=max_quality_loss,
                    config_file=settings.config,
                    workload_given=workload is not None,
                    progress=sink,
                )
            else:
                result = run_bench(options, settings.cost, sink)
    except ApplianceError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail("interrupted", code=130)
    folder = out or settings.state_dir / BENCH_DIR / RUNS_DIR / datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not no_plots:
            result.plots = [str(path.resolve()) for path in write_plots(result, folder)]
        written = write_result(result, folder, settings.state_dir)
    except OSError as exc:
        fail(f"out: cannot write results to {folder}: {exc.strerror}")
    if json_output:
        sys.stdout.write(result.to_json() + "\n")
        return
    # Piped output is read later (logs, CI): give the table room instead of truncating cells.
    table_console = console if console.is_terminal else Console(width=PIPED_TABLE_WIDTH)
    table_console.print(render(result))
    console.print(f"results: {written}" + (f" (+ {len(result.plots)} plots)" if result.plots else ""), highlight=False)
