"""Web security of the admin UI: who may reach it, what headers it sends, how logins are throttled.

- `AdminGuardMiddleware` (pure ASGI) answers every `/admin` request from outside the allowed
  admin networks with a 403 page that says why, writes an audit event, and adds the strict
  security headers (CSP without 'unsafe-inline', frame-ancestors 'none', nosniff, no referrer,
  no caching) to every `/admin` response.
- `LoginThrottle` counts failed logins per user name and per client address and locks either
  out for a while after too many; a lockout answers without checking the password.
- Denied requests are audited through `appliance.store.audit.audit_denied`, rate-limited per
  address so a flood of them cannot flood the audit log.

Never imports the API layer; never writes a password or token anywhere.
"""

from __future__ import annotations

import html
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable

import anyio
from starlette.types import ASGIApp, Receive, Scope, Send

from appliance.store.audit import AuditLog, DeniedAuditLimiter, audit_denied
from appliance.store.privacy import Network, address_in

ADMIN_PREFIX = "/admin"
#: Failed logins for one user name, within LOGIN_WINDOW_S, before that name is locked.
USER_FAILURES_MAX = 5
#: Failed logins from one address, within LOGIN_WINDOW_S, before that address is locked.
ADDRESS_FAILURES_MAX = 20
LOGIN_WINDOW_S = 15 * 60
LOCKOUT_S = 15 * 60

CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "font-src 'self'",
        "connect-src 'self'",
        "form-action 'self'",
        "base-uri 'none'",
        "frame-ancestors 'none'",
        "object-src 'none'",
    )
)
SECURITY_HEADERS: dict[str, str] = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), usb=(), payment=()",
    "Cache-Control": "no-store",
}
HSTS_HEADER = ("Strict-Transport-Security", "max-age=31536000")


class LoginThrottle:
    """Failed-login counts per user name and per address, with lockout."""

    def __init__(
        self,
        *,
        user_failures_max: int = USER_FAILURES_MAX,
        address_failures_max: int = ADDRESS_FAILURES_MAX,
        window_s: float = LOGIN_WINDOW_S,
        lockout_s: float = LOCKOUT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.user_failures_max = user_failures_max
        self.address_failures_max = address_failures_max
        self.window_s = window_s
        self.lockout_s = lockout_s
        self.clock = clock
        self._failures: dict[str, deque[float]] = defaultdict(deque)
        self._locked_until: dict[str, float] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _keys(user: str, address: str) -> tuple[str, str]:
        return f"user:{user.lower()}", f"addr:{address}"

    def locked_for_s(self, user: str, address: str) -> float:
        """Seconds until a login for (user, address) is allowed again; 0 when allowed."""
        now = self.clock()
        with self._lock:
            remaining = [self._locked_until.get(key, 0.0) - now for key in self._keys(user, address)]
        return max(0.0, *remaining)

    def failed(self, user: str, address: str) -> bool:
        """Count a failure; True when it locked the user or the address."""
        now = self.clock()
        locked = False
        with self._lock:
            for key, limit in zip(self._keys(user, address), (self.user_failures_max, self.address_failures_max), strict=True):
                times = self._failures[key]
                times.append(now)
                while times and times[0] < now - self.window_s:
                    times.popleft()
                if len(times) >= limit:
                    self._locked_until[key] = now + self.lockout_s
                    times.clear()
                    locked = True
        return locked

    def succeeded(self, user: str, address: str) -> None:
        """A good login clears the user's count (not the address's lockout)."""
        with self._lock:
            self._failures.pop(self._keys(user, address)[0], None)


def security_headers(tls: bool) -> list[tuple[bytes, bytes]]:
    headers = [(key.lower().encode(), value.encode()) for key, value in SECURITY_HEADERS.items()]
    if tls:
        headers.append((HSTS_HEADER[0].lower().encode(), HSTS_HEADER[1].encode()))
    return headers


def _forbidden_page(address: str) -> bytes:
    safe = html.escape(address)
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>Not allowed</title></head><body>"
        "<h1>403: the admin UI does not answer this network</h1>"
        f"<p>Your address {safe} is not in the admin networks of this appliance. "
        "An administrator on an allowed network can add yours on the Privacy page, or set "
        "<code>admin_networks</code> in the configuration.</p></body></html>"
    ).encode("utf-8")


class AdminGuardMiddleware:
    """Network allow-list and security headers for everything under /admin."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        networks: list[Network],
        audit: AuditLog,
        limiter: DeniedAuditLimiter,
        tls: bool,
    ) -> None:
        self.app = app
        self.networks = networks
        self.audit = audit
        self.limiter = limiter
        self.headers = security_headers(tls)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if scope["type"] != "http" or not (path == ADMIN_PREFIX or path.startswith(ADMIN_PREFIX + "/")):
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        address = client[0] if client else ""
        if not address_in(address, self.networks):
            await anyio.to_thread.run_sync(
                lambda: audit_denied(
                    self.audit, self.limiter, "denied.network", address=address or "-",
                    target=f"{scope.get('method')} {path}", detail="address outside admin_networks",
                )
            )
            body = _forbidden_page(address or "unknown")
            await send(
                {
                    "type": "http.response.start",
                    "status": 403,
                    "headers": [
                        (b"content-type", b"text/html; charset=utf-8"),
                        (b"content-length", str(len(body)).encode()),
                        *self.headers,
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return

        async def send_with_headers(message: dict) -> None:  # type: ignore[type-arg]
            if message["type"] == "http.response.start":
                present = {key.lower() for key, _ in message.get("headers", [])}
                extra = [(key, value) for key, value in self.headers if key not in present]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)
