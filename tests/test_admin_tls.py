"""HTTPS for the LAN: a self-signed certificate made once when listening beyond loopback, its
fingerprint shown by `appliance doctor`, and Secure cookies plus HSTS when serving TLS."""

from __future__ import annotations

import os
import ssl
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx

from appliance.admin.tls import ensure_tls, fingerprint, self_signed_paths
from appliance.config import load_settings
from tests.helpers.admin import ADMIN_NAME, ADMIN_PASSWORD, create_admin, form_token
from tests.helpers.server import free_port

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 60


def test_loopback_needs_no_certificate(state_dir: Path) -> None:
    settings, note = ensure_tls(load_settings(state_dir=state_dir, host="127.0.0.1"))
    assert settings.tls_cert is None and note is None
    assert not self_signed_paths(state_dir)[0].exists()


def test_beyond_loopback_a_self_signed_certificate_is_made_once_and_reused(state_dir: Path) -> None:
    settings, note = ensure_tls(load_settings(state_dir=state_dir, host="0.0.0.0"))
    cert, key = self_signed_paths(state_dir)
    assert (settings.tls_cert, settings.tls_key) == (cert, key)
    assert note is not None and "generated" in note and fingerprint(cert) in note
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert), str(key))
    first = fingerprint(cert)
    again, note_again = ensure_tls(load_settings(state_dir=state_dir, host="0.0.0.0"))
    assert again.tls_cert == cert and fingerprint(cert) == first and "using" in (note_again or "")


def test_doctor_shows_the_certificate_fingerprint(state_dir: Path) -> None:
    ensure_tls(load_settings(state_dir=state_dir, host="0.0.0.0"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    done = subprocess.run(
        [sys.executable, "-m", "appliance", "doctor", "--state-dir", str(state_dir)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    line = next(line for line in done.stdout.splitlines() if "TLS fingerprint" in line)
    assert fingerprint(self_signed_paths(state_dir)[0]) in line.replace("\n", "")


def test_serving_tls_gives_secure_cookies_and_hsts(state_dir: Path) -> None:
    ensure_tls(load_settings(state_dir=state_dir, host="0.0.0.0"))
    cert, key = self_signed_paths(state_dir)
    create_admin(state_dir)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance", "serve", "--port", str(port), "--state-dir", str(state_dir),
         "--tls-cert", str(cert), "--tls-key", str(key)],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    verify = ssl.create_default_context(cafile=str(cert))
    base = f"https://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            try:
                if httpx.get(f"{base}/v2/health/live", verify=verify, timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        with httpx.Client(verify=verify) as client:
            page = client.get(f"{base}/admin/login")
            assert page.headers["strict-transport-security"].startswith("max-age=")
            answer = client.post(
                f"{base}/admin/login",
                data={"csrf_token": form_token(page.text), "name": ADMIN_NAME, "password": ADMIN_PASSWORD},
            )
            assert answer.status_code == 303
            cookie = next(h for h in answer.headers.get_list("set-cookie") if h.startswith("appliance_admin="))
            assert "secure" in cookie.lower() and "httponly" in cookie.lower()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
