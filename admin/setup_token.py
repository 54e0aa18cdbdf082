"""The one-time setup token that lets the first admin be created from the browser.

While no admin exists, the server makes a random token at start and prints the setup URL in
its log (whoever can read the server's log owns the box). The token works once and only for
SETUP_TOKEN_TTL_S; only its SHA-256 is kept in memory. A restart without an admin makes a new
one. Never stores the token on disk or in the database.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Callable

SETUP_TOKEN_BYTES = 24
#: How long the printed setup URL works.
SETUP_TOKEN_TTL_S = 60 * 60


class SetupToken:
    def __init__(self, ttl_s: float = SETUP_TOKEN_TTL_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.clock = clock
        self._digest: str | None = None
        self._expires_at = 0.0
        self._lock = threading.Lock()

    def issue(self) -> str:
        """A fresh token (the previous one stops working)."""
        token = secrets.token_urlsafe(SETUP_TOKEN_BYTES)
        with self._lock:
            self._digest = hashlib.sha256(token.encode()).hexdigest()
            self._expires_at = self.clock() + self.ttl_s
        return token

    @property
    def active(self) -> bool:
        with self._lock:
            return self._digest is not None and self.clock() < self._expires_at

    def consume(self, token: str) -> bool:
        """True (once) when `token` is the live token; it is spent either way on success."""
        candidate = hashlib.sha256(token.encode()).hexdigest()
        with self._lock:
            if self._digest is None or self.clock() >= self._expires_at:
                return False
            if not hmac.compare_digest(self._digest, candidate):
                return False
            self._digest = None
            return True

    def revoke(self) -> None:
        with self._lock:
            self._digest = None
