"""scripts/gpu_check.py has never run on a GPU here; this keeps it runnable: on a CPU-only box
it must finish with exit 0, name the missing GPU providers as warnings and still time the
CPU parts (the appliance's selection, MatMulNBits' zero-point forms)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_on_a_cpu_only_box_and_says_what_is_missing() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--layers", "1", "--runs", "2"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert any(line.startswith("WARN cuda session") for line in lines), done.stdout
    assert any(line.startswith("OK   appliance selection: cpu") for line in lines), done.stdout
    timing = next(line for line in lines if "MatMulNBits zero points" in line)
    assert "uint8" in timing and "float" in timing
