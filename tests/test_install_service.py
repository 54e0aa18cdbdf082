"""`appliance install-service --root DIR` stages the service exactly as it would install it."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest

from appliance.errors import InvalidInput
from appliance.ops.install import InstallOptions, ServiceInstaller, _retarget_scripts, interpreter_home
from appliance.ops.service_files import ServicePaths, render_unit, template_text


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance", *args], capture_output=True, text=True, timeout=300
    )


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def _head_revision() -> str | None:
    from appliance.store import head_revision

    return head_revision()


def _db_revision(db_file: Path) -> str | None:
    from appliance.store import Database, current_revision

    database = Database(f"sqlite:///{db_file}")
    try:
        return current_revision(database)
    finally:
        database.close()


@pytest.fixture
def staged(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    result = _cli("install-service", "--root", str(root), "--gpu", "no")
    assert result.returncode == 0, result.stderr
    return root


def test_root_install_produces_the_expected_tree(staged: Path) -> None:
    files = sorted(str(p.relative_to(staged)) for p in staged.rglob("*") if p.is_file() or p.is_symlink())
    assert files == [
        "etc/appliance/appliance.env",
        "etc/appliance/appliance.toml",
        "etc/systemd/system/appliance.service",
        "etc/sysusers.d/appliance.conf",
        "etc/tmpfiles.d/appliance.conf",
        "opt/appliance/venv",
        "var/lib/appliance/appliance.db",
    ]
    for empty in ("var/log/appliance", "var/cache/appliance"):
        assert (staged / empty).is_dir()


def test_root_install_sets_private_modes_and_records_the_service_user_as_owner(staged: Path) -> None:
    for private in ("var/lib/appliance", "var/log/appliance", "var/cache/appliance"):
        assert _mode(staged / private) == 0o700, private
    assert _mode(staged / "etc/appliance") == 0o750
    assert _mode(staged / "etc/appliance/appliance.toml") == 0o640
    assert _mode(staged / "etc/appliance/appliance.env") == 0o640
    assert _mode(staged / "etc/systemd/system/appliance.service") == 0o644
    assert _mode(staged / "var/lib/appliance/appliance.db") == 0o600
    tmpfiles = (staged / "etc/tmpfiles.d/appliance.conf").read_text().splitlines()
    assert "d /var/lib/appliance 0700 appliance appliance -" in tmpfiles
    assert "d /var/log/appliance 0700 appliance appliance -" in tmpfiles
    assert "d /etc/appliance 0750 root appliance -" in tmpfiles
    sysusers = (staged / "etc/sysusers.d/appliance.conf").read_text()
    assert 'u appliance - "Inference appliance" /var/lib/appliance /usr/sbin/nologin' in sysusers


def test_root_install_writes_the_shipped_unit_and_templates_unchanged(staged: Path) -> None:
    assert (staged / "etc/systemd/system/appliance.service").read_text() == template_text("appliance.service")
    assert (staged / "etc/appliance/appliance.toml").read_text() == template_text("appliance.toml")
    assert (staged / "etc/appliance/appliance.env").read_text() == template_text("appliance.env")


def test_current_environment_is_linked_at_the_prefix(staged: Path) -> None:
    venv = staged / "opt/appliance/venv"
    assert venv.is_symlink()
    assert venv.resolve() == Path(sys.prefix).resolve()


def test_database_is_migrated_to_the_newest_schema(staged: Path) -> None:
    assert _db_revision(staged / "var/lib/appliance/appliance.db") == _head_revision()


def test_another_prefix_changes_only_the_exec_start_path(tmp_path: Path) -> None:
    root = tmp_path / "root"
    result = _cli("install-service", "--root", str(root), "--prefix", "/srv/ai", "--gpu", "no")
    assert result.returncode == 0, result.stderr
    unit = (root / "etc/systemd/system/appliance.service").read_text()
    assert unit == template_text("appliance.service").replace("/opt/appliance/", "/srv/ai/")
    assert unit == render_unit(PurePosixPath("/srv/ai"))
    assert (root / "srv/ai/venv").is_symlink()


def test_upgrade_keeps_models_and_edited_config_and_migrates_the_database(staged: Path) -> None:
    from alembic import command

    from appliance.store import Database
    from appliance.store.migrate import alembic_config

    model = staged / "var/lib/appliance/models/minilm/1/model.onnx"
    model.parent.mkdir(parents=True)
    model.write_bytes(b"weights")
    config = staged / "etc/appliance/appliance.toml"
    config.write_text('port = 9000\n')
    db_file = staged / "var/lib/appliance/appliance.db"
    database = Database(f"sqlite:///{db_file}")
    command.downgrade(alembic_config(database), "base")
    database.close()
    assert _db_revision(db_file) is None

    result = _cli("install-service", "--root", str(staged), "--gpu", "no")
    assert result.returncode == 0, result.stderr
    assert "keep /etc/appliance/appliance.toml" in result.stdout
    assert model.read_bytes() == b"weights"
    assert config.read_text() == "port = 9000\n"
    assert _db_revision(db_file) == _head_revision()


def test_dry_run_prints_every_step_and_changes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    result = _cli("install-service", "--root", str(root), "--dry-run", "--gpu", "yes")
    assert result.returncode == 0, result.stderr
    assert not root.exists()
    out = result.stdout
    for expected in (
        "record system user 'appliance'",
        "create /opt/appliance (0755 root), /etc/appliance (0750 root:appliance)",
        "link /opt/appliance/venv ->",
        "write /etc/systemd/system/appliance.service",
        "write /etc/systemd/system/appliance.service.d/gpu.conf",
        "write /etc/appliance/appliance.toml",
        "migrate the database in /var/lib/appliance",
    ):
        assert expected in out, out


def test_dry_run_on_a_systemd_box_lists_user_creation_and_systemctl_steps(tmp_path: Path) -> None:
    options = InstallOptions(venv_mode="create", python=_interpreter_reporting(tmp_path, "/usr"))
    installer = ServiceInstaller(options, migrate=lambda state, config: None, systemd_running=True)
    descriptions = [step.description for step in installer.plan_install()]
    assert descriptions[-3:] == [
        "run `systemctl daemon-reload`",
        "run `systemctl enable appliance.service`",
        "run `systemctl restart appliance.service`",
    ]


def test_gpu_install_writes_the_device_dropin_and_a_cpu_reinstall_removes_it(staged: Path) -> None:
    dropin = staged / "etc/systemd/system/appliance.service.d/gpu.conf"
    assert _cli("install-service", "--root", str(staged), "--gpu", "yes").returncode == 0
    assert "DeviceAllow=/dev/nvidiactl rw" in dropin.read_text()
    assert _cli("install-service", "--root", str(staged), "--gpu", "no").returncode == 0
    assert not dropin.exists()


def test_uninstall_keeps_models_and_data(staged: Path) -> None:
    result = _cli("uninstall-service", "--root", str(staged))
    assert result.returncode == 0, result.stderr
    assert not (staged / "etc/systemd/system/appliance.service").exists()
    assert not (staged / "opt/appliance").exists()
    assert (staged / "var/lib/appliance/appliance.db").exists()
    assert (staged / "etc/appliance/appliance.toml").exists()
    assert Path(sys.prefix, "bin", "python").exists()  # the linked environment itself is untouched


def test_uninstall_with_purge_removes_state_config_and_records(staged: Path) -> None:
    result = _cli("uninstall-service", "--root", str(staged), "--purge")
    assert result.returncode == 0, result.stderr
    for gone in ("var/lib/appliance", "var/log/appliance", "var/cache/appliance", "etc/appliance",
                 "etc/sysusers.d/appliance.conf", "etc/tmpfiles.d/appliance.conf"):  # fmt: skip
        assert not (staged / gone).exists(), gone


def test_prefix_hidden_by_protect_home_is_refused_in_one_line(tmp_path: Path) -> None:
    result = _cli("install-service", "--root", str(tmp_path / "root"), "--prefix", "/home/me/appliance")
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0
    assert "prefix" in result.stderr and "ProtectHome" in result.stderr
    assert "Traceback" not in result.stderr


def test_relative_prefix_is_refused(tmp_path: Path) -> None:
    result = _cli("install-service", "--root", str(tmp_path / "root"), "--prefix", "opt/appliance")
    assert result.returncode != 0
    assert "prefix: must be an absolute path" in result.stderr


def test_current_environment_hidden_from_the_service_is_refused() -> None:
    options = InstallOptions(paths=ServicePaths(), current_venv=Path("/home/builder/venv"))
    with pytest.raises(InvalidInput) as caught:
        ServiceInstaller(options, systemd_running=False).plan_install()  # planning only: nothing runs
    assert caught.value.field == "venv"


def test_interpreter_home_is_read_from_pyvenv_cfg(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    venv.mkdir()
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\ninclude-system-site-packages = false\n")
    assert interpreter_home(venv) == PurePosixPath(Path("/usr/bin").resolve())
    assert interpreter_home(tmp_path / "absent") is None


def _interpreter_reporting(tmp_path: Path, base_prefix: str) -> Path:
    """An executable that answers `python -c 'print(sys.base_prefix)'` with `base_prefix`."""
    python = tmp_path / "python3"
    python.write_text(f"#!/bin/sh\necho {base_prefix}\n")
    os.chmod(python, 0o755)
    return python


def test_interpreter_under_root_home_is_refused_for_a_real_install(tmp_path: Path) -> None:
    python = _interpreter_reporting(tmp_path, "/home/builder/.pyenv/versions/3.12.0")
    options = InstallOptions(paths=ServicePaths(), venv_mode="create", python=python)
    with pytest.raises(InvalidInput) as caught:
        ServiceInstaller(options, systemd_running=False).plan_install()  # planning only: nothing runs
    assert caught.value.field == "python"
    assert "/usr/bin/python3" in caught.value.message


def test_interpreter_under_root_home_only_warns_when_staging(tmp_path: Path) -> None:
    python = _interpreter_reporting(tmp_path, "/home/builder/.pyenv/versions/3.12.0")
    options = InstallOptions(paths=ServicePaths(root=tmp_path / "root"), venv_mode="create", python=python)
    first = ServiceInstaller(options).plan_install()[0]
    assert first.description.startswith("warning: python: the environment's interpreter lives in /home/builder/")


def test_system_interpreter_is_accepted(tmp_path: Path) -> None:
    python = _interpreter_reporting(tmp_path, "/usr")
    options = InstallOptions(paths=ServicePaths(), venv_mode="create", python=python)
    assert ServiceInstaller(options, systemd_running=False)._venv_problem() is None


def test_staged_environment_scripts_point_at_the_final_prefix(tmp_path: Path) -> None:
    bin_dir = tmp_path / "stage/opt/appliance/venv/bin"
    bin_dir.mkdir(parents=True)
    script = bin_dir / "appliance"
    script.write_text(f"#!{tmp_path}/stage/opt/appliance/venv/bin/python\nimport appliance\n")
    os.chmod(script, 0o755)
    _retarget_scripts(bin_dir, f"{tmp_path}/stage/opt/appliance/venv", "/opt/appliance/venv")
    assert script.read_text() == "#!/opt/appliance/venv/bin/python\nimport appliance\n"
    assert _mode(script) == 0o755


def test_dry_run_with_a_new_environment_names_what_pip_installs(tmp_path: Path) -> None:
    result = _cli("install-service", "--root", str(tmp_path / "root"), "--dry-run", "--venv", "create", "--gpu", "no")
    assert result.returncode == 0, result.stderr
    assert "create or upgrade the environment /opt/appliance/venv and `pip install " in result.stdout
    assert "[cpu]" in result.stdout


def test_switching_to_a_created_environment_replaces_the_link_and_never_touches_its_target(tmp_path: Path) -> None:
    other = tmp_path / "other-venv"
    (other / "bin").mkdir(parents=True)
    paths = ServicePaths(root=tmp_path / "root")
    venv = paths.on_disk(paths.venv)
    venv.parent.mkdir(parents=True)
    venv.symlink_to(other)
    commands: list[list[str]] = []
    options = InstallOptions(paths=paths, venv_mode="create", python=_interpreter_reporting(tmp_path, "/usr"))
    installer = ServiceInstaller(options, run=lambda argv: commands.append(list(argv)))
    step = next(s for s in installer.plan_install() if s.description.startswith("create or upgrade the environment"))
    step.action()
    assert not venv.is_symlink()
    assert commands[0][1:] == ["-m", "venv", str(venv)]
    assert all(str(other) not in " ".join(command) for command in commands)


def test_allow_network_writes_a_drop_in_and_a_bad_network_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    result = _cli("install-service", "--root", str(root), "--gpu", "no", "--allow-network", "203.0.113.0/24")
    assert result.returncode == 0, result.stderr
    dropin = root / "etc/systemd/system/appliance.service.d/network.conf"
    assert "IPAddressAllow=203.0.113.0/24" in dropin.read_text()
    bad = _cli("install-service", "--root", str(tmp_path / "other"), "--allow-network", "everyone")
    assert bad.returncode != 0
    assert "allow_network: not an IP network: 'everyone'" in bad.stderr
    assert not (tmp_path / "other").exists()


def test_install_script_dry_run_shows_the_bootstrap_and_the_handover() -> None:
    script = Path(__file__).resolve().parents[1] / "systemd" / "install.sh"
    result = subprocess.run(
        ["bash", str(script), "--dry-run", "--prefix", "/srv/ai"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("would create /srv/ai/venv with ")
    assert lines[0].endswith("python3 -m venv (unless it exists)")
    assert "-m pip install --upgrade" in lines[1] and ("[cpu]" in lines[1] or "[gpu]" in lines[1])
    assert lines[2] == "would run /srv/ai/venv/bin/appliance install-service --venv current --dry-run --prefix /srv/ai"
