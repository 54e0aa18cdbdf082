"""`appliance doctor`: one line per check, OK / WARN / FAIL; exit 1 when anything FAILs.

Python and package versions, CPU features, memory, GPU and driver, which execution providers
really create a session, state directory, database migrations, bind address against auth,
free disk, the repository's models and what the memory budget would hold. Reads only: never changes a file or the database,
never talks to the network.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
import typer

from appliance.cli.app import ConfigOption, StateDirOption, app, console, settings_from
from appliance.config import Settings
from appliance.ops.checks import Check, service_checks

if TYPE_CHECKING:
    from appliance.runtime.probe import ProviderProbe

GIB = 1 << 30
MIN_FREE_DISK_WARN_BYTES = 5 * GIB
MIN_FREE_DISK_FAIL_BYTES = 1 * GIB
MIN_AVAILABLE_MEMORY_WARN_BYTES = 2 * GIB
NVIDIA_SMI_TIMEOUT_S = 10
INTERESTING_CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8")
PACKAGES = ("onnxruntime", "onnxruntime-gpu", "numpy", "tokenizers", "fastapi", "uvicorn", "sqlalchemy", "alembic", "onnxruntime-genai")


def python_check() -> Check:
    version = platform.python_version()
    ok = (3, 11) <= sys.version_info[:2] < (3, 13)
    return Check("python", "OK" if ok else "WARN", f"{version} ({sys.executable})" + ("" if ok else "; supported: 3.11-3.12"))


def packages_check() -> list[Check]:
    found: dict[str, str] = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    checks = [Check("packages", "OK", ", ".join(f"{k} {v}" for k, v in found.items()))]
    if "onnxruntime" in found and "onnxruntime-gpu" in found:
        checks.append(Check("onnxruntime build", "FAIL", "both onnxruntime and onnxruntime-gpu are installed; they overwrite each other (keep one)"))
    elif "onnxruntime" not in found and "onnxruntime-gpu" not in found:
        checks.append(Check("onnxruntime build", "FAIL", "no onnxruntime installed (install the cpu or gpu extra)"))
    return checks


def _cpu_model_and_flags() -> tuple[str, set[str]]:
    flags: set[str] = set()
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", "unknown CPU", platform.machine()):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return model, flags


def fast_paths(flags: set[str]) -> tuple[str, list[str]]:
    """(verdict, what runs fast on this CPU) for the kernels the appliance's variants use.

    Why it matters: the int4 and int8 decoder variants run MatMulNBits with int8 activations
    (accuracy_level 4), whose dot products take one instruction per four int8 products with
    VNNI and three without it (AVX2's maddubs + madd + add); speed figures measured on one
    kind of CPU do not carry over to the other (docs/BENCHMARKS.md names the flags of each)."""
    paths: list[str] = []
    if "amx_int8" in flags:
        paths.append("int8 matrix tiles (AMX) for int8 GEMMs")
    if "avx512_vnni" in flags or "avx_vnni" in flags:
        paths.append("int4/int8 weights with int8 activations through VNNI dot products")
    elif "avx2" in flags:
        paths.append("int4/int8 weights with int8 activations through AVX2 (no VNNI: three instructions where VNNI needs one)")
    if "avx512f" in flags:
        paths.append("fp32 GEMMs and attention in AVX-512")
    elif "avx2" in flags and "fma" in flags:
        paths.append("fp32 GEMMs and attention in AVX2/FMA")
    paths.append("int8 KV cache (GroupQueryAttention, any x86-64 or Arm CPU)")
    machine = platform.machine()
    verdict = "OK" if machine not in ("x86_64", "AMD64") or "avx2" in flags else "WARN"
    return verdict, paths


def fast_paths_check() -> Check:
    verdict, paths = fast_paths(_cpu_model_and_flags()[1])
    return Check("cpu fast paths", verdict, "; ".join(paths))


def cpu_check() -> Check:
    model, flags = _cpu_model_and_flags()
    present = [flag for flag in INTERESTING_CPU_FLAGS if flag in flags]
    cores = psutil.cpu_count(logical=True) or 1
    verdict = "OK" if "avx2" in flags or platform.machine() not in ("x86_64", "AMD64") else "WARN"
    note = "" if verdict == "OK" else " (no AVX2: int8 kernels will be slow)"
    return Check("cpu", verdict, f"{model}, {cores} logical cores, features: {' '.join(present) or 'none of ' + '/'.join(INTERESTING_CPU_FLAGS)}{note}")


def memory_check() -> Check:
    memory = psutil.virtual_memory()
    verdict = "OK" if memory.available >= MIN_AVAILABLE_MEMORY_WARN_BYTES else "WARN"
    return Check("memory", verdict, f"{memory.total / GIB:.1f} GiB total, {memory.available / GIB:.1f} GiB available")


def gpu_check() -> Check:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return Check("gpu", "OK", "none found (nvidia-smi absent): serving on CPU")
    try:
        out = subprocess.run(
            [smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S, check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Check("gpu", "WARN", f"nvidia-smi did not answer: {exc}")
    if out.returncode != 0:
        return Check("gpu", "WARN", f"nvidia-smi failed: {(out.stderr or out.stdout).strip().splitlines()[0][:200] if (out.stderr or out.stdout).strip() else out.returncode}")
    gpus = "; ".join(line.strip() for line in out.stdout.splitlines() if line.strip())
    return Check("gpu", "OK", gpus or "nvidia-smi lists no GPU")


def provider_checks(settings: Settings, probes: list[ProviderProbe]) -> list[Check]:
    checks = []
    for probe in probes:
        wanted = settings.providers in ("auto", probe.name)
        if probe.usable:
            verdict = "OK"
        elif probe.name == "cpu":
            verdict = "FAIL"
        elif settings.providers == probe.name:
            verdict = "WARN"  # asked for explicitly but will fall back
        else:
            verdict = "OK" if not wanted or "not in this onnxruntime build" in probe.detail else "WARN"
        prefix = "usable" if probe.usable else "not usable"
        checks.append(Check(f"provider {probe.name}", verdict, f"{prefix}: {probe.detail}"))
    return checks


def generation_placement_check(settings: Settings, cuda_usable: bool) -> Check | None:
    """Where each served text-generation model will decode, on a box where CUDA works: a
    model exported in a CPU layout stays on the CPU, which an admin with a GPU wants to know."""
    if not cuda_usable or settings.providers == "cpu":
        return None
    from appliance.generation.placement import cpu_layout_reason
    from appliance.repository.store import ModelRepository

    repository = ModelRepository(settings.models_dir)
    on_gpu, on_cpu = [], []
    for name in repository.names():
        version = repository.serving_version(name)
        spec = version.manifest.generation if version is not None else None
        if spec is not None:
            (on_cpu if cpu_layout_reason(spec) else on_gpu).append(name)
    if not on_gpu and not on_cpu:
        return None
    if not on_cpu:
        return Check("generation placement", "OK", f"decode on CUDA: {', '.join(on_gpu)}")
    detail = f"decode on the CPU (exported for the CPU; export again with --quant fp16 for CUDA): {', '.join(on_cpu)}"
    return Check("generation placement", "WARN", detail + (f"; on CUDA: {', '.join(on_gpu)}" if on_gpu else ""))


def database_check(settings: Settings) -> Check:
    from sqlalchemy.exc import SQLAlchemyError

    from appliance.store.db import Database
    from appliance.store.migrate import current_revision, head_revision

    db_file = settings.state_dir / "appliance.db"
    if settings.database_url is None and not db_file.exists():
        return Check("database", "WARN", f"{db_file} not created yet (the server or `appliance db upgrade` creates it)")
    try:
        database = Database(settings.db_url)
        current = current_revision(database)
        database.close()
    except (SQLAlchemyError, OSError) as exc:
        return Check("database", "FAIL", f"cannot open: {exc.__class__.__name__}: {str(exc).splitlines()[0][:200]}")
    head = head_revision()
    if current == head:
        return Check("database", "OK", f"schema at {current}")
    return Check("database", "WARN", f"schema at {current or '(empty)'}, newest is {head}: run `appliance db upgrade`")


def bind_check(settings: Settings) -> Check:
    where = f"{settings.host}:{settings.port}"
    if not settings.auth and settings.listens_beyond_loopback:
        return Check("bind and auth", "FAIL", f"auth is off while listening on {where}: the server will refuse to start")
    if not settings.auth:
        return Check("bind and auth", "WARN", f"auth is off (allowed only because {where} is loopback)")
    if settings.listens_beyond_loopback and settings.tls_cert is None:
        return Check("bind and auth", "WARN", f"listening on {where} with keys but without TLS: keys travel in clear on the LAN")
    return Check("bind and auth", "OK", f"{where}, API keys required")


def keys_check(settings: Settings) -> Check | None:
    from appliance.store.db import Database
    from appliance.store.keys import KeyStore

    if not settings.auth or (settings.database_url is None and not (settings.state_dir / "appliance.db").exists()):
        return None
    try:
        active = KeyStore(Database(settings.db_url)).count_active()
    except Exception as exc:  # noqa: BLE001 - a missing table is reported by the database line
        return Check("api keys", "WARN", f"cannot count keys: {exc.__class__.__name__}")
    if active == 0:
        return Check("api keys", "WARN", "no active API key: every request will get 401 (appliance keys create NAME)")
    return Check("api keys", "OK", f"{active} active")


def disk_check(settings: Settings) -> Check:
    target = settings.state_dir
    while not target.exists() and target != target.parent:
        target = target.parent
    usage = shutil.disk_usage(target)
    verdict = "OK" if usage.free >= MIN_FREE_DISK_WARN_BYTES else ("WARN" if usage.free >= MIN_FREE_DISK_FAIL_BYTES else "FAIL")
    return Check("free disk", verdict, f"{usage.free / GIB:.1f} GiB free of {usage.total / GIB:.1f} GiB at {target}")


def models_check(settings: Settings) -> Check:
    from appliance.repository.store import ModelRepository

    repository = ModelRepository(settings.models_dir)
    names = repository.names()
    if not names:
        return Check("models", "WARN", "the repository is empty (appliance export --defaults, or appliance up)")
    broken = {name: repository.broken_versions(name) for name in names}
    serving = [name for name in names if repository.serving_version(name) is not None]
    problems = [f"{name} v{v}: {why}" for name, versions in broken.items() for v, why in versions.items()]
    if problems:
        return Check("models", "WARN", f"{len(serving)} deployable; unreadable: {'; '.join(problems)[:400]}")
    return Check("models", "OK", f"{len(serving)} deployable of {len(names)}: {', '.join(names)}")


def memory_budget_check(settings: Settings) -> Check:
    """The models' memory budget, and which deployable models it would hold at start (from
    their files' size and KV reservation: the server corrects these by measuring each load)."""
    from appliance.repository.store import ModelRepository
    from appliance.serving.budget import MIB, Budget, estimate_bytes, plan_start
    from appliance.serving.loaders import expected_kv_bytes, version_file_bytes
    from appliance.serving.tasks import family_of

    budget = Budget.from_settings(settings.serving, psutil.virtual_memory().available)
    repository = ModelRepository(settings.models_dir)
    held_back = _held_back(settings)
    candidates: list[tuple[str, int, str]] = []
    for name in sorted(repository.names(), key=lambda n: (not (settings.serving.models.get(n) and settings.serving.models[n].pin), n)):
        version = repository.serving_version(name)
        if version is None or name in held_back:
            continue
        kv = expected_kv_bytes(version, settings) if family_of(version.manifest.task) == "generation" else 0
        candidates.append((name, estimate_bytes(version_file_bytes(version), kv), "cpu"))
    plan = plan_start(candidates, budget)
    sizes = {name: needed for name, needed, _device in candidates}
    where = f"{budget.host_bytes / GIB:.1f} GiB" + ("" if settings.serving.memory_budget_bytes else " (75% of the memory available now)")
    parts = [f"budget {where}"]
    if budget.max_models:
        parts.append(f"at most {budget.max_models} models")
    parts.append("would hold " + (", ".join(f"{n} (~{sizes[n] / MIB:.0f} MiB)" for n in plan.held) or "nothing"))
    if plan.on_demand:
        parts.append("load on demand, evicting idle ones: " + ", ".join(plan.on_demand))
    if plan.never:
        parts.append("never fit: " + "; ".join(f"{n}: {why}" for n, why in plan.never.items()))
    return Check("memory budget", "WARN" if plan.never else "OK", "; ".join(parts))


def _held_back(settings: Settings) -> set[str]:
    """Models an admin undeployed (none when the database does not exist yet)."""
    from appliance.store.db import Database
    from appliance.store.deployments import DeploymentStore

    if settings.database_url is None and not (settings.state_dir / "appliance.db").exists():
        return set()
    try:
        database = Database(settings.db_url)
        try:
            return DeploymentStore(database).held_back()
        finally:
            database.close()
    except Exception:  # noqa: BLE001 - a broken database is reported by the database line
        return set()


def tls_fingerprint_check(settings: Settings) -> Check | None:
    """The certificate's SHA-256 fingerprint, to compare with what a browser shows."""
    from appliance.admin.tls import fingerprint_line

    try:
        line = fingerprint_line(settings)
    except (OSError, ValueError) as exc:
        return Check("TLS fingerprint", "WARN", f"cannot read the certificate: {exc.__class__.__name__}")
    if line is None:
        return None
    return Check("TLS fingerprint", "OK", line)


def run_checks(settings: Settings) -> list[Check]:
    from appliance.runtime.probe import probe_providers

    probes = probe_providers()
    checks = [python_check(), *packages_check(), cpu_check(), fast_paths_check(), memory_check(), gpu_check(), *provider_checks(settings, probes)]
    checks += service_checks(settings.state_dir, settings.tls_cert, settings.tls_key)
    tls_fingerprint = tls_fingerprint_check(settings)
    if tls_fingerprint is not None:
        checks.append(tls_fingerprint)
    checks += [database_check(settings)]
    keys = keys_check(settings)
    if keys is not None:
        checks.append(keys)
    checks += [bind_check(settings), disk_check(settings), models_check(settings), memory_budget_check(settings)]
    placement = generation_placement_check(settings, any(probe.name == "cuda" and probe.usable for probe in probes))
    if placement is not None:
        checks.append(placement)
    return checks


COLOURS = {"OK": "green", "WARN": "yellow", "FAIL": "bold red"}


@app.command("doctor")
def doctor(state_dir: StateDirOption = None, config: ConfigOption = None) -> None:
    """Check hardware, execution providers and configuration; one line each."""
    settings = settings_from(state_dir=state_dir, config=config)
    checks = run_checks(settings)
    for check in checks:
        console.print(f"[{COLOURS[check.verdict]}]{check.verdict:<4}[/] {check.name}: {check.detail}", highlight=False, soft_wrap=True)
    if any(check.verdict == "FAIL" for check in checks):
        raise typer.Exit(1)
