"""`appliance doctor`: one OK/WARN/FAIL line per check, exit 1 only when something FAILs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from appliance.repository.store import ModelRepository
from tests.helpers.generation import TinyDecoders, tiny_decoders  # noqa: F401 - fixture
from tests.helpers.tiny_models import publish_adder

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r"^(OK|WARN|FAIL) +[a-zA-Z][\w ]*: .+$")


def _doctor(state_dir: Path, **env_extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    env.update(APPLIANCE_STATE_DIR=str(state_dir), COLUMNS="400", **env_extra)
    return subprocess.run([sys.executable, "-m", "appliance", "doctor"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_healthy_box_passes_with_one_line_per_check(state_dir: Path) -> None:
    state_dir.chmod(0o700)
    publish_adder(ModelRepository(state_dir / "models"))
    subprocess.run([sys.executable, "-m", "appliance", "db", "upgrade", "--state-dir", str(state_dir)], cwd=ROOT, check=True, capture_output=True)
    result = _doctor(state_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    assert all(LINE.match(line) for line in lines), lines
    text = result.stdout
    assert "OK   provider cpu: usable" in text
    assert re.search(r"provider cuda: not usable", text)
    assert "database: schema at" in text and "models: 1 deployable" in text
    assert "api keys: no active API key" in text


def test_auth_off_beyond_loopback_is_a_failure(state_dir: Path) -> None:
    state_dir.chmod(0o700)
    result = _doctor(state_dir, APPLIANCE_HOST="0.0.0.0", APPLIANCE_AUTH="false")
    assert result.returncode == 1
    assert re.search(r"^FAIL bind and auth: auth is off while listening on 0\.0\.0\.0", result.stdout, re.M)


def test_generation_placement_names_models_that_stay_on_the_cpu_of_a_gpu_box(tiny_decoders: TinyDecoders) -> None:
    from appliance.cli.doctor_cmd import generation_placement_check
    from appliance.config import load_settings

    cpu_layout = load_settings(state_dir=tiny_decoders.state_dir)
    cuda_layout = load_settings(state_dir=tiny_decoders.llama_fp16.path.parent.parent.parent)
    # Without a usable CUDA provider (this box) there is nothing to say.
    assert generation_placement_check(cpu_layout, cuda_usable=False) is None
    # As if CUDA worked (the probe's answer on a GPU box): fp32 / int4 exports stay on the CPU.
    check = generation_placement_check(cpu_layout, cuda_usable=True)
    assert check is not None and check.verdict == "WARN" and "tiny-llama" in check.detail and "--quant fp16" in check.detail
    check = generation_placement_check(cuda_layout, cuda_usable=True)
    assert check is not None and check.verdict == "OK" and check.detail == "decode on CUDA: tiny-llama"


def test_fast_paths_name_what_this_cpu_runs_fast() -> None:
    """The same variants run different kernels on AVX2-only and VNNI CPUs; doctor says which."""
    from appliance.cli.doctor_cmd import fast_paths

    verdict, vnni = fast_paths({"avx2", "fma", "avx512f", "avx512_vnni"})
    assert verdict in ("OK", "WARN") and any("through VNNI" in path for path in vnni)
    assert any("AVX-512" in path for path in vnni)
    _, avx2 = fast_paths({"avx2", "fma"})
    assert any("no VNNI" in path for path in avx2) and not any("through VNNI" in path for path in avx2)
    assert any("AVX2/FMA" in path for path in avx2)
    _, amx = fast_paths({"avx2", "fma", "avx512f", "avx512_vnni", "amx_int8"})
    assert any("AMX" in path for path in amx)
    assert all("int8 KV cache" in paths[-1] for paths in (vnni, avx2, amx))
