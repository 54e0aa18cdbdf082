"""The unit and its GPU drop-in pass `systemd-analyze verify` silently and score low exposure.

Both verbs work without systemd as PID 1. `verify --root` needs systemd's own units
(sysinit.target, ...) and the ExecStart= program inside the root, so each test assembles
such a root: a copy of the system unit directory plus the real `appliance` console script at
the unit's path.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest

from appliance.ops.service_files import (
    DEFAULT_PREFIX,
    ServicePaths,
    render_gpu_dropin,
    render_network_dropin,
    render_unit,
    template_text,
)

ANALYZE = shutil.which("systemd-analyze")
SYSTEM_UNITS = Path("/usr/lib/systemd/system")
CPU_EXPOSURE_LIMIT = 1.5
GPU_EXPOSURE_LIMIT = 2.0

pytestmark = pytest.mark.skipif(
    ANALYZE is None or not (SYSTEM_UNITS / "sysinit.target").exists(),
    reason="systemd-analyze is not installed (scripts/test_system_deps.sh installs Debian's systemd package)",
)


def _analysis_root(
    tmp_path: Path,
    unit_text: str,
    prefix: PurePosixPath = DEFAULT_PREFIX,
    dropin: str | None = None,
    network_dropin: str | None = None,
) -> tuple[Path, Path]:
    root = tmp_path / "root"
    shutil.copytree(SYSTEM_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    paths = ServicePaths(root=root, prefix=prefix)
    executable = paths.on_disk(paths.executable)
    executable.parent.mkdir(parents=True)
    shutil.copy2(Path(sys.prefix) / "bin" / "appliance", executable)
    unit = paths.on_disk(paths.unit_file)
    unit.parent.mkdir(parents=True, exist_ok=True)
    unit.write_text(unit_text)
    if dropin is not None:
        target = paths.on_disk(paths.gpu_dropin)
        target.parent.mkdir(parents=True)
        target.write_text(dropin)
    if network_dropin is not None:
        target = paths.on_disk(paths.network_dropin)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(network_dropin)
    return root, unit


def _verify(root: Path, unit: Path) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run([ANALYZE, "verify", f"--root={root}", str(unit)], capture_output=True, text=True, timeout=120)


def _exposure(root: Path, unit: Path) -> tuple[float, str]:
    assert ANALYZE is not None
    result = subprocess.run(
        [ANALYZE, "security", "--offline=yes", f"--root={root}", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    match = re.search(r"Overall exposure level for appliance\.service: (\d+\.\d+)", result.stdout)
    assert match, result.stdout[-2000:] + result.stderr
    return float(match.group(1)), result.stdout


def test_shipped_unit_verifies_with_nothing_on_stdout_or_stderr(tmp_path: Path) -> None:
    root, unit = _analysis_root(tmp_path, template_text("appliance.service"))
    result = _verify(root, unit)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_verify_reports_a_misspelled_key_on_stderr_so_silence_means_clean(tmp_path: Path) -> None:
    broken = template_text("appliance.service").replace("ProtectSystem=strict", "ProtectSytem=strict")
    root, unit = _analysis_root(tmp_path, broken)
    result = _verify(root, unit)
    assert "ProtectSytem" in result.stderr


def test_unit_with_gpu_dropin_verifies_with_nothing_on_stderr(tmp_path: Path) -> None:
    nodes = [PurePosixPath(p) for p in ("/dev/nvidia0", "/dev/nvidia1", "/dev/nvidia-caps/nvidia-cap1")]
    root, unit = _analysis_root(tmp_path, template_text("appliance.service"), dropin=render_gpu_dropin(nodes))
    result = _verify(root, unit)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_cpu_unit_exposure_is_at_most_1_5(tmp_path: Path) -> None:
    root, unit = _analysis_root(tmp_path, template_text("appliance.service"))
    exposure, report = _exposure(root, unit)
    print(f"CPU unit exposure: {exposure}")
    assert exposure <= CPU_EXPOSURE_LIMIT, report
    assert "Service has no access to hardware devices" in report


def test_gpu_unit_exposure_is_at_most_2_0_and_allows_only_nvidia_devices(tmp_path: Path) -> None:
    dropin = render_gpu_dropin([PurePosixPath("/dev/nvidia0")])
    root, unit = _analysis_root(tmp_path, template_text("appliance.service"), dropin=dropin)
    exposure, report = _exposure(root, unit)
    print(f"GPU unit exposure: {exposure}")
    assert exposure <= GPU_EXPOSURE_LIMIT, report
    device_line = next(line for line in report.splitlines() if "DeviceAllow=" in line)
    allowed = set(re.findall(r"(\S+):r", device_line) + re.findall(r"(\S+):rw", device_line))
    assert allowed == {"char-rtc", "/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia0"}


def test_unit_rendered_for_another_prefix_differs_only_in_the_prefix_and_verifies(tmp_path: Path) -> None:
    prefix = PurePosixPath("/srv/appliance")
    rendered = render_unit(prefix)
    shipped = template_text("appliance.service").splitlines()
    changed = [(a, b) for a, b in zip(shipped, rendered.splitlines(), strict=True) if a != b]
    assert changed == [
        (
            "ExecStart=/opt/appliance/venv/bin/appliance serve --config /etc/appliance/appliance.toml",
            "ExecStart=/srv/appliance/venv/bin/appliance serve --config /etc/appliance/appliance.toml",
        )
    ]
    root, unit = _analysis_root(tmp_path, rendered, prefix=prefix)
    result = _verify(root, unit)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_stop_timeout_covers_the_default_drain_grace() -> None:
    from appliance.config import Settings

    unit = template_text("appliance.service")
    stop_s = int(re.search(r"^TimeoutStopSec=(\d+)s$", unit, re.M).group(1))  # type: ignore[union-attr]
    watchdog_s = int(re.search(r"^WatchdogSec=(\d+)s$", unit, re.M).group(1))  # type: ignore[union-attr]
    drain_grace_s = Settings.model_fields["drain_grace_s"].default
    assert drain_grace_s + 5 <= stop_s
    assert watchdog_s >= 10


def test_network_dropin_verifies_and_widens_the_ip_allow_list(tmp_path: Path) -> None:
    dropin = render_network_dropin(["203.0.113.0/24", "2001:db8::/32"])
    root, unit = _analysis_root(tmp_path, template_text("appliance.service"), network_dropin=dropin)
    result = _verify(root, unit)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    exposure, _ = _exposure(root, unit)
    assert exposure <= CPU_EXPOSURE_LIMIT
