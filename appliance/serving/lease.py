"""A lease on a loaded model: while one is held the model is never evicted or idled out.

A route takes a lease (`ModelService.lease`), uses its client, and releases it when the answer
is complete. A streaming answer hands the lease to its event stream (`hold_until_done`), which
releases it when the stream ends, however it ends; a stream that is never iterated releases it
when it is garbage collected, so a lost response can never pin a model forever.
"""

from __future__ import annotations

import weakref
from collections.abc import AsyncIterator, Callable
from typing import Generic, TypeVar

ClientT = TypeVar("ClientT")
ItemT = TypeVar("ItemT")


class Lease(Generic[ClientT]):
    """One request's hold on a model; `release()` is idempotent."""

    def __init__(self, client: ClientT, version: int, on_release: Callable[[], None]) -> None:
        self.client = client
        #: The version serving this request.
        self.version = version
        self._on_release: Callable[[], None] | None = on_release
        self._handed_off = False

    def release(self) -> None:
        callback, self._on_release = self._on_release, None
        if callback is not None:
            callback()

    async def __aenter__(self) -> Lease[ClientT]:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        if not self._handed_off:
            self.release()

    def hold_until_done(self, events: AsyncIterator[ItemT]) -> AsyncIterator[ItemT]:
        """Keep the model leased while `events` runs; released when it ends (or is dropped)."""
        self._handed_off = True
        wrapped = _held(events, self)
        weakref.finalize(wrapped, self.release)
        return wrapped


async def _held(events: AsyncIterator[ItemT], lease: Lease[ClientT]) -> AsyncIterator[ItemT]:
    try:
        async for item in events:
            yield item
    finally:
        lease.release()
