"""`appliance export`: one model version from a local source, or the embedded defaults.

Composition root only: parses options into an ExportRequest and Settings, runs the export
pipeline, prints the report table. Any failure is one readable line on stderr and a non-zero
exit, with nothing published. The export stage (and through it torch) is imported only when
the command runs, so the rest of the CLI and the server never load it.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

from appliance.cli.app import ConfigOption, StateDirOption, app, console, err_console, fail, settings_from
from appliance.cli.models_cmd import rejection_reason, report_table
from appliance.errors import ApplianceError

TASK_CHOICES = ("text-generation", "feature-extraction", "text-classification", "tensor")
#: Ctrl-C: the shell's convention for death by SIGINT (128 + 2).
INTERRUPTED_EXIT_CODE = 130
INTERRUPTED_MESSAGE = "interrupted: nothing was published"
#: SIGTERM (a service stop, the admin UI cancelling an export): 128 + 15.
TERMINATED_EXIT_CODE = 143
TERMINATED_MESSAGE = "terminated: nothing was published"


class _Terminated(BaseException):
    """Raised in the main thread on SIGTERM so the export unwinds and removes its staging."""


@contextmanager
def _signals_unwind() -> Iterator[list[int]]:
    """SIGTERM raises _Terminated and SIGINT KeyboardInterrupt in the main thread, so the export
    unwinds and removes its staging; both are also remembered in the yielded list, which the
    export checks before each stage. Python cannot raise out of a finaliser or a weakref
    callback: an interrupt landing there is handed to `sys.unraisablehook`, which would print a
    traceback beside the one-line error. The remembered signal already stops the export before
    it publishes, so that hook drops exactly these two exceptions and passes on any other."""
    received: list[int] = []

    def _raise(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        raise _Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

    previous_hook = sys.unraisablehook

    def _drop_swallowed_interrupts(unraisable: sys.UnraisableHookArgs) -> None:
        if not (received and unraisable.exc_type in (_Terminated, KeyboardInterrupt)):
            previous_hook(unraisable)

    previous = {sig: signal.signal(sig, _raise) for sig in (signal.SIGTERM, signal.SIGINT)}
    sys.unraisablehook = _drop_swallowed_interrupts
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sys.unraisablehook = previous_hook


QUANT_HELP = (
    "fp32 | fp16 | int8 | int8-static | int4 | int4-exact | auto (auto picks per task and provider; "
    "int4-exact keeps a Q4_0 or Q4_1 GGUF's own 4-bit weights without rounding them again)."
)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@app.command("export")
def export_command(
    source: Annotated[
        str | None,
        typer.Argument(help="A Hugging Face folder, a .gguf or .onnx file, or package:NAME.", show_default=False),
    ] = None,
    name: Annotated[str | None, typer.Option("--name", help="Model name in the repository.")] = None,
    task: Annotated[
        str | None, typer.Option("--task", help=f"One of {', '.join(TASK_CHOICES)} (default: detected).")
    ] = None,
    quant: Annotated[str, typer.Option("--quant", help=QUANT_HELP)] = "auto",
    max_quality_loss: Annotated[
        float | None, typer.Option("--max-quality-loss", help="Quality budget (0..1); default per task.")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Publish a rejected variant as deployable.")] = False,
    trust_pickle: Annotated[
        bool, typer.Option("--trust-pickle", help="Allow pickle .bin weights (unpickling runs code).")
    ] = False,
    calibration: Annotated[
        Path | None, typer.Option("--calibration", help="Calibration inputs (.npz) for tensor models.")
    ] = None,
    kv_cache: Annotated[
        str,
        typer.Option(
            "--kv-cache",
            help="Decoders: fp32, or int8 (a quarter of the KV memory, prompts as fast, decode at long context faster; kept where it costs <= 1% perplexity).",
        ),
    ] = "fp32",
    defaults: Annotated[bool, typer.Option("--defaults", help="Export the embedded default models.")] = False,
    state_dir: StateDirOption = None,
    config: ConfigOption = None,
) -> None:
    """Export, optimise, quantise, evaluate and publish one model version."""
    settings = settings_from(state_dir=state_dir, config=config)
    if defaults:
        if source is not None or name is not None:
            fail("export: --defaults takes no SOURCE or --name", code=2)
        _run_defaults(settings)
        return
    if source is None:
        fail("export: give a SOURCE (folder, .gguf, .onnx or package:NAME) or --defaults", code=2)
    if name is None:
        fail("name: --name is required (the model's name in the repository)", code=2)
    if task is not None and task not in TASK_CHOICES:
        fail(f"task: {task!r} is not one of {', '.join(TASK_CHOICES)}", code=2)
    from appliance.export.pipeline import ExportRequest, ExportStopped, run_export

    request = ExportRequest(
        source=source,
        name=name,
        task=task,
        quant=quant,
        max_quality_loss=max_quality_loss,
        force=force,
        trust_pickle=trust_pickle,
        calibration=calibration,
        kv_cache=kv_cache,
    )
    received: list[int] = []
    try:
        with _signals_unwind() as received:
            result = run_export(request, settings, console, stop_requested=lambda: bool(received))
    except ApplianceError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail(INTERRUPTED_MESSAGE, code=INTERRUPTED_EXIT_CODE)
    except _Terminated:
        fail(TERMINATED_MESSAGE, code=TERMINATED_EXIT_CODE)
    except ExportStopped:
        terminated = received and received[0] == signal.SIGTERM
        fail(TERMINATED_MESSAGE if terminated else INTERRUPTED_MESSAGE, code=TERMINATED_EXIT_CODE if terminated else INTERRUPTED_EXIT_CODE)
    except Exception as exc:  # noqa: BLE001 - a library failure still gets one line, no traceback
        fail(f"export failed: {type(exc).__name__}: {_first_line(exc)}")
    console.print(report_table(result.version))
    if result.report.verdict == "rejected":
        why = rejection_reason(result.report.budget)
        if result.version.manifest.deployable:
            err_console.print(f"[bold red]warning:[/] --force published it as deployable although {why}", highlight=False)
        else:
            console.print(f"[red]rejected[/]: {why}; published, not deployable")


def _run_defaults(settings: object) -> None:
    from appliance.export.defaults import ensure_default_models

    try:
        with _signals_unwind():
            versions = ensure_default_models(settings, console)  # type: ignore[arg-type]
    except ApplianceError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail(INTERRUPTED_MESSAGE, code=INTERRUPTED_EXIT_CODE)
    except _Terminated:
        fail(TERMINATED_MESSAGE, code=TERMINATED_EXIT_CODE)
    except Exception as exc:  # noqa: BLE001
        fail(f"export failed: {type(exc).__name__}: {_first_line(exc)}")
    for version in versions:
        console.print(f"{version.name}/{version.version} ready at {version.path}")
