"""Rules that keep a load generator from becoming a weapon: where it may aim, how much it may send.

Targets must resolve only to loopback or private addresses unless the operator says
`--allow-remote`; every run is bounded in requests and in time by hard caps that no option can
lift. Never sends a request itself.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

from appliance.errors import InvalidInput

#: Most requests one sweep point may send, whatever the options say.
MAX_REQUESTS_PER_POINT_CAP = 100_000
#: Longest one sweep point may run, in seconds.
MAX_POINT_DURATION_S_CAP = 3600.0
#: Most sweep points one run may have.
MAX_SWEEP_POINTS_CAP = 32
#: Highest open-loop arrival rate, requests per second.
MAX_RATE_PER_S_CAP = 10_000.0
#: Most concurrent clients of a closed-loop point.
MAX_CONCURRENCY_CAP = 1024


def _is_local(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback or (address.is_private and not address.is_unspecified) or address.is_link_local


def check_target(url: str, *, allow_remote: bool) -> str:
    """Return the base URL without a trailing slash if it may be loaded, else InvalidInput.

    A host name is resolved and every address it resolves to must be loopback or private, so a
    name cannot smuggle a public address past the rule.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInput(f"url: {url!r} is not an http(s) URL with a host", field="url")
    if parts.query or parts.fragment:
        raise InvalidInput(f"url: {url!r} must not carry a query or fragment", field="url")
    base = url.rstrip("/")
    if allow_remote:
        return base
    host = parts.hostname
    try:
        addresses = {ipaddress.ip_address(host)}
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, parts.port or 80, proto=socket.IPPROTO_TCP)
        except socket.gaierror as exc:
            raise InvalidInput(f"url: cannot resolve host {host!r}: {exc.strerror}", field="url") from None
        addresses = {ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos}
    public = sorted(str(a) for a in addresses if not _is_local(a))
    if public:
        raise InvalidInput(
            f"url: {host} resolves to {', '.join(public)}, outside loopback and private networks; "
            "pass --allow-remote to load it anyway",
            field="url",
        )
    return base


def check_bounds(*, duration_s: float, max_requests: int, warmup_requests: int) -> None:
    """Refuse a point that could run without end or beyond the caps."""
    if not 0 < duration_s <= MAX_POINT_DURATION_S_CAP:
        raise InvalidInput(f"duration: must be within 0..{MAX_POINT_DURATION_S_CAP:g} s, got {duration_s:g}", field="duration")
    if not 0 < max_requests <= MAX_REQUESTS_PER_POINT_CAP:
        raise InvalidInput(f"max-requests: must be within 1..{MAX_REQUESTS_PER_POINT_CAP}, got {max_requests}", field="max-requests")
    if not 0 <= warmup_requests <= MAX_REQUESTS_PER_POINT_CAP:
        raise InvalidInput(f"warmup: must be within 0..{MAX_REQUESTS_PER_POINT_CAP}, got {warmup_requests}", field="warmup")


def check_sweep(*, concurrency: list[int], rates: list[float]) -> None:
    """Exactly one of a concurrency sweep (closed loop) or a rate sweep (open loop)."""
    if concurrency and rates:
        raise InvalidInput("rate: give either --concurrency (closed loop) or --rate (open loop), not both", field="rate")
    points = concurrency or rates
    if not points:
        raise InvalidInput("concurrency: give at least one concurrency or rate", field="concurrency")
    if len(points) > MAX_SWEEP_POINTS_CAP:
        raise InvalidInput(f"concurrency: at most {MAX_SWEEP_POINTS_CAP} sweep points, got {len(points)}", field="concurrency")
    for value in concurrency:
        if not 1 <= value <= MAX_CONCURRENCY_CAP:
            raise InvalidInput(f"concurrency: must be within 1..{MAX_CONCURRENCY_CAP}, got {value}", field="concurrency")
    for rate in rates:
        if not 0 < rate <= MAX_RATE_PER_S_CAP:
            raise InvalidInput(f"rate: must be a positive number of requests/s up to {MAX_RATE_PER_S_CAP:g}, got {rate:g}", field="rate")
