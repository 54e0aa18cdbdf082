"""The layering rules of ARCHITECTURE.md, enforced by import-linter on every run.

import-linter walks one directory per root package, but export/, kernels/ and admin/ live
outside appliance/ and are mapped in at install time. The test therefore assembles the
installed layout (Python files only) in a temporary folder and lints that.
"""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAPPED = {"export": "export", "kernels": "kernels", "admin": "admin"}


def _assemble_installed_layout(target: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "static", "templates")
    shutil.copytree(ROOT / "appliance", target / "appliance", ignore=ignore)
    for sub, folder in MAPPED.items():
        shutil.copytree(ROOT / folder, target / "appliance" / sub, ignore=ignore)


def test_import_contracts_hold(tmp_path: Path) -> None:
    _assemble_installed_layout(tmp_path)
    lint = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run(
        [str(lint), "--config", str(ROOT / "pyproject.toml")],
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_server_starts_without_torch_or_transformers() -> None:
    code = (
        "import sys, appliance.cli, appliance.repository, appliance.config\n"
        "bad = [m for m in ('torch', 'transformers', 'optimum') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_server_and_cli_start_without_ray() -> None:
    """Ray is the optional `ray` extra: the CLI, the app factory and the serving layer never
    load it (only `appliance serve --ray` and appliance.scale do)."""
    code = (
        "import sys, appliance.cli, appliance.app, appliance.serving.service, appliance.scale.plan\n"
        "bad = [m for m in sys.modules if m == 'ray' or m.startswith('ray.')]\n"
        "assert not bad, bad[:5]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
