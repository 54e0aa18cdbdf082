"""Where the service's files go, and their text: the unit, the GPU drop-in, sysusers/tmpfiles.

The templates in the repository's `systemd/` folder (installed as the data package
`appliance.systemd`) are the one source: the unit is complete for the default prefix and is
rendered for another prefix by replacing that prefix only. Must never write files or run
commands; `install.py` does that.
"""

from __future__ import annotations

import importlib.resources
import ipaddress
import stat
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from pathlib import Path, PurePosixPath

from appliance.errors import InvalidInput

SERVICE_NAME = "appliance"
SERVICE_USER = "appliance"
DEFAULT_PREFIX = PurePosixPath("/opt/appliance")

UNIT_TEMPLATE = "appliance.service"
GPU_DROPIN_TEMPLATE = "gpu.conf"
ENV_TEMPLATE = "appliance.env"
CONFIG_TEMPLATE = "appliance.toml"
NETWORK_DROPIN = "network.conf"

#: Folders the unit hides or replaces (ProtectHome=, PrivateTmp=): the service could not
#: read a prefix or a virtual environment there.
HIDDEN_FROM_SERVICE = (
    PurePosixPath("/home"),
    PurePosixPath("/root"),
    PurePosixPath("/run/user"),
    PurePosixPath("/tmp"),
    PurePosixPath("/var/tmp"),
)

#: Characters that change the meaning of a unit file line (specifiers, variables, quoting).
_UNIT_SPECIAL_CHARACTERS = set("%$\"'\\;") | {" ", "\t", "\n"}


def template_dir() -> Traversable:
    """The `systemd/` folder: the installed data package, else the source checkout's folder."""
    try:
        return importlib.resources.files("appliance.systemd")
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / "systemd"


def template_text(name: str) -> str:
    return (template_dir() / name).read_text(encoding="utf-8")


def is_hidden_from_service(path: PurePosixPath) -> bool:
    return any(path == hidden or hidden in path.parents for hidden in HIDDEN_FROM_SERVICE)


def check_prefix(prefix: PurePosixPath) -> PurePosixPath:
    """An absolute prefix the unit can name and the hardened service can read."""
    if not prefix.is_absolute():
        raise InvalidInput(f"prefix: must be an absolute path, got {prefix}", field="prefix")
    if _UNIT_SPECIAL_CHARACTERS & set(str(prefix)):
        raise InvalidInput(f"prefix: must not contain spaces, quotes, '%', '$' or ';': {prefix}", field="prefix")
    if is_hidden_from_service(prefix):
        raise InvalidInput(
            f"prefix: {prefix} is hidden from the service (ProtectHome=/PrivateTmp=); use e.g. /opt/appliance",
            field="prefix",
        )
    return prefix


@dataclass(frozen=True)
class ServicePaths:
    """Every path the service uses, as seen on the target box, and where each is staged."""

    root: Path = Path("/")
    prefix: PurePosixPath = DEFAULT_PREFIX
    unit_dir: PurePosixPath = PurePosixPath("/etc/systemd/system")
    config_dir: PurePosixPath = PurePosixPath("/etc/appliance")
    state_dir: PurePosixPath = PurePosixPath("/var/lib/appliance")
    logs_dir: PurePosixPath = PurePosixPath("/var/log/appliance")
    cache_dir: PurePosixPath = PurePosixPath("/var/cache/appliance")
    sysusers_dir: PurePosixPath = PurePosixPath("/etc/sysusers.d")
    tmpfiles_dir: PurePosixPath = PurePosixPath("/etc/tmpfiles.d")

    @property
    def staging(self) -> bool:
        """True when installing into a folder other than the running system's root."""
        return self.root.resolve() != Path("/")

    def on_disk(self, path: PurePosixPath) -> Path:
        """Where `path` of the target box lies here (under --root when staging)."""
        return self.root / path.relative_to("/")

    @property
    def venv(self) -> PurePosixPath:
        return self.prefix / "venv"

    @property
    def executable(self) -> PurePosixPath:
        return self.venv / "bin" / "appliance"

    @property
    def unit_file(self) -> PurePosixPath:
        return self.unit_dir / f"{SERVICE_NAME}.service"

    @property
    def dropin_dir(self) -> PurePosixPath:
        return self.unit_dir / f"{SERVICE_NAME}.service.d"

    @property
    def gpu_dropin(self) -> PurePosixPath:
        return self.dropin_dir / GPU_DROPIN_TEMPLATE

    @property
    def network_dropin(self) -> PurePosixPath:
        return self.dropin_dir / NETWORK_DROPIN

    @property
    def env_file(self) -> PurePosixPath:
        return self.config_dir / ENV_TEMPLATE

    @property
    def config_file(self) -> PurePosixPath:
        return self.config_dir / CONFIG_TEMPLATE

    @property
    def sysusers_file(self) -> PurePosixPath:
        return self.sysusers_dir / f"{SERVICE_NAME}.conf"

    @property
    def tmpfiles_file(self) -> PurePosixPath:
        return self.tmpfiles_dir / f"{SERVICE_NAME}.conf"

    @property
    def private_dirs(self) -> tuple[PurePosixPath, ...]:
        """Directories only the service user may enter (mode 0700)."""
        return (self.state_dir, self.logs_dir, self.cache_dir)


def render_unit(prefix: PurePosixPath) -> str:
    """The shipped unit with the default prefix replaced by `prefix` (nothing else changes)."""
    text = template_text(UNIT_TEMPLATE)
    if prefix == DEFAULT_PREFIX:
        return text
    return text.replace(f"{DEFAULT_PREFIX}/", f"{check_prefix(prefix)}/")


def nvidia_device_nodes(dev_dir: Path = Path("/dev")) -> list[PurePosixPath]:
    """The NVIDIA character devices present (/dev/nvidia*, /dev/nvidia-caps/*), sorted."""
    candidates = list(dev_dir.glob("nvidia*")) + list((dev_dir / "nvidia-caps").glob("*"))
    nodes = []
    for path in candidates:
        try:
            if stat.S_ISCHR(path.stat().st_mode):
                nodes.append(PurePosixPath("/dev") / path.relative_to(dev_dir))
        except OSError:
            continue
    return sorted(nodes)


def render_gpu_dropin(device_nodes: list[PurePosixPath]) -> str:
    """The shipped GPU drop-in plus one DeviceAllow= line per extra node found on this box."""
    text = template_text(GPU_DROPIN_TEMPLATE)
    listed = {line.split("=", 1)[1].split()[0] for line in text.splitlines() if line.startswith("DeviceAllow=")}
    extra = [f"DeviceAllow={node} rw" for node in device_nodes if str(node) not in listed]
    if not extra:
        return text
    return text.rstrip("\n") + "\n# Found on this box by the installer:\n" + "\n".join(extra) + "\n"


def check_networks(networks: list[str]) -> list[str]:
    """Client networks as systemd wants them (CIDR), each one validated."""
    checked = []
    for network in networks:
        try:
            checked.append(str(ipaddress.ip_network(network, strict=False)))
        except ValueError:
            raise InvalidInput(f"allow_network: not an IP network: {network!r}", field="allow_network") from None
    return checked


def render_network_dropin(networks: list[str]) -> str:
    """A drop-in widening the unit's IPAddressAllow= to client networks beyond the LAN ranges."""
    return (
        "# Client networks allowed beyond the unit's loopback/link-local/private ranges\n"
        "# (written by appliance install-service --allow-network).\n"
        "[Service]\n"
        f"IPAddressAllow={' '.join(check_networks(networks))}\n"
    )


def sysusers_text() -> str:
    """sysusers.d(5) entry: the service's system user and group, home in the state dir."""
    return (
        "# The appliance's service user (written by appliance install-service).\n"
        f'u {SERVICE_USER} - "Inference appliance" {ServicePaths.state_dir} /usr/sbin/nologin\n'
    )


def tmpfiles_text(paths: ServicePaths) -> str:
    """tmpfiles.d(5) entries recording the intended owner and mode of every directory."""
    lines = ["# Directories of appliance.service (written by appliance install-service)."]
    lines.append(f"d {paths.config_dir} 0750 root {SERVICE_USER} -")
    lines.extend(f"d {path} 0700 {SERVICE_USER} {SERVICE_USER} -" for path in paths.private_dirs)
    return "\n".join(lines) + "\n"
