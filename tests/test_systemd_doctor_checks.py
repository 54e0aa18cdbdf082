"""`appliance doctor`'s service and TLS lines: private state, installed unit, a sound TLS pair."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from appliance.ops.checks import service_check, state_dir_check, tls_check

OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="the openssl command makes the test certificates")


def _make_pair(folder: Path, days: int, name: str = "server") -> tuple[Path, Path]:
    assert OPENSSL is not None
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    subprocess.run(
        [OPENSSL, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-days", str(days), "-subj", "/CN=appliance.test", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    os.chmod(key, 0o600)
    return cert, key


def test_private_state_dir_is_ok(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    assert state_dir_check(state).verdict == "OK"


def test_state_dir_readable_by_others_fails(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    os.chmod(state, 0o755)
    check = state_dir_check(state)
    assert check.verdict == "FAIL"
    assert "0755" in check.detail


def test_missing_state_dir_is_a_warning(tmp_path: Path) -> None:
    assert state_dir_check(tmp_path / "absent").verdict == "WARN"


def test_service_check_sees_the_systemd_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("INVOCATION_ID", raising=False)
    assert service_check(tmp_path / "none.service").verdict == "WARN"
    unit = tmp_path / "appliance.service"
    unit.write_text("[Service]\n")
    assert service_check(unit).verdict == "OK"
    monkeypatch.setenv("INVOCATION_ID", "0123")
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    assert "running under systemd" in service_check(tmp_path / "none.service").detail


def test_no_tls_is_a_warning() -> None:
    assert tls_check(None, None).verdict == "WARN"


@needs_openssl
def test_valid_tls_pair_is_ok(tmp_path: Path) -> None:
    cert, key = _make_pair(tmp_path, days=365)
    assert tls_check(cert, key).verdict == "OK"


@needs_openssl
def test_certificate_close_to_expiry_warns(tmp_path: Path) -> None:
    cert, key = _make_pair(tmp_path, days=5)
    check = tls_check(cert, key)
    assert check.verdict == "WARN"
    assert "expires in" in check.detail


@needs_openssl
def test_expired_certificate_fails(tmp_path: Path) -> None:
    cert, key = _make_pair(tmp_path, days=1)
    assert tls_check(cert, key, now_s=4_000_000_000).verdict == "FAIL"


@needs_openssl
def test_key_of_another_certificate_fails(tmp_path: Path) -> None:
    cert, _ = _make_pair(tmp_path, days=365, name="one")
    _, other_key = _make_pair(tmp_path, days=365, name="two")
    check = tls_check(cert, other_key)
    assert check.verdict == "FAIL"
    assert "pair" in check.detail


@needs_openssl
def test_world_readable_key_fails(tmp_path: Path) -> None:
    cert, key = _make_pair(tmp_path, days=365)
    os.chmod(key, 0o644)
    assert tls_check(cert, key).verdict == "FAIL"


def test_missing_certificate_file_fails_naming_the_setting(tmp_path: Path) -> None:
    check = tls_check(tmp_path / "cert.pem", tmp_path / "key.pem")
    assert check.verdict == "FAIL"
    assert check.detail.startswith("tls_cert: file not found")
