"""Service and TLS checks for `appliance doctor`: one verdict (OK / WARN / FAIL) per line.

Covers what the service installer is responsible for: the state directory's privacy, the
installed unit, the systemd environment the server runs in, and the TLS files. Reads only;
must never change a file or talk to the network.
"""

from __future__ import annotations

import os
import pwd
import ssl
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from appliance.ops.service_files import SERVICE_USER

Verdict = Literal["OK", "WARN", "FAIL"]

#: A certificate closer than this to its end gets a warning.
CERT_EXPIRY_WARNING_S = 30 * 24 * 3600

INSTALLED_UNIT = Path("/etc/systemd/system/appliance.service")


@dataclass(frozen=True)
class Check:
    name: str
    verdict: Verdict
    detail: str


def state_dir_check(state_dir: Path) -> Check:
    """Models, keys and request logs live here: nobody but the service user may enter."""
    name = "state directory"
    try:
        info = state_dir.stat()
    except FileNotFoundError:
        return Check(name, "WARN", f"{state_dir} does not exist yet (created on first start)")
    except OSError as exc:
        return Check(name, "FAIL", f"{state_dir}: {exc.strerror}")
    mode = stat.S_IMODE(info.st_mode)
    owner = _user_name(info.st_uid)
    # root may inspect the service's directory; anyone else must own the one they use.
    if info.st_uid != os.geteuid() and not (os.geteuid() == 0 and owner == SERVICE_USER):
        return Check(name, "FAIL", f"{state_dir} is owned by {owner}, not by this user ({_user_name(os.geteuid())})")
    if mode & 0o077:
        return Check(name, "FAIL", f"{state_dir} has mode {mode:04o}; others can read it (chmod 0700)")
    if not os.access(state_dir, os.W_OK):
        return Check(name, "FAIL", f"{state_dir} is not writable")
    return Check(name, "OK", f"{state_dir} (mode {mode:04o}, owned by {owner})")


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def service_check(unit_file: Path = INSTALLED_UNIT) -> Check:
    """Whether this process runs under systemd, and whether the unit is installed at all."""
    name = "systemd service"
    if os.environ.get("INVOCATION_ID") and os.environ.get("NOTIFY_SOCKET"):
        return Check(name, "OK", "running under systemd (readiness and watchdog notifications on)")
    if unit_file.is_file():
        return Check(name, "OK", f"{unit_file} installed (this command runs outside it)")
    return Check(name, "WARN", "not installed as a service (sudo appliance install-service)")


def tls_check(cert: Path | None, key: Path | None, *, now_s: float | None = None) -> Check:
    """The TLS pair loads together, the key is private, and the certificate is not expiring."""
    name = "TLS"
    if cert is None or key is None:
        return Check(name, "WARN", "off: HTTP in clear text (set tls_cert and tls_key to serve HTTPS)")
    for label, path in (("tls_cert", cert), ("tls_key", key)):
        if not path.is_file():
            return Check(name, "FAIL", f"{label}: file not found: {path}")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(certfile=str(cert), keyfile=str(key))
    except (ssl.SSLError, OSError) as exc:
        return Check(name, "FAIL", f"tls_cert/tls_key do not load as a pair: {exc}")
    key_mode = stat.S_IMODE(key.stat().st_mode)
    if key_mode & 0o004:
        return Check(name, "FAIL", f"tls_key {key} is readable by everyone (mode {key_mode:04o}; chmod 0640)")
    remaining_s = _seconds_until_expiry(cert, time.time() if now_s is None else now_s)
    if remaining_s is not None and remaining_s <= 0:
        return Check(name, "FAIL", f"tls_cert {cert} has expired")
    if remaining_s is not None and remaining_s < CERT_EXPIRY_WARNING_S:
        return Check(name, "WARN", f"tls_cert {cert} expires in {remaining_s / 86400:.0f} days")
    return Check(name, "OK", f"HTTPS with {cert}")


def _seconds_until_expiry(cert: Path, now_s: float) -> float | None:
    """Seconds left on the certificate, from CPython's own PEM decoder (None if unavailable)."""
    decode = getattr(ssl._ssl, "_test_decode_cert", None)  # type: ignore[attr-defined]
    if decode is None:
        return None
    try:
        not_after = decode(str(cert))["notAfter"]
    except (ssl.SSLError, OSError, KeyError, ValueError):
        return None
    return ssl.cert_time_to_seconds(not_after) - now_s


def service_checks(state_dir: Path, cert: Path | None, key: Path | None) -> list[Check]:
    """Everything this module checks, in the order `appliance doctor` prints it."""
    return [state_dir_check(state_dir), service_check(), tls_check(cert, key)]
