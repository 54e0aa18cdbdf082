"""Repository watch: the server serves what the model repository says, without a restart.

Why: `appliance export` and `appliance models set-default|pin|deploy` run as processes of their
own (from a shell, a script, or an export the admin UI started), and what they publish or
decide must take effect once it is written. Every `repository_poll_s` seconds the watch asks
the ModelService to `refresh()`: a loaded model whose serving version changed loads the new
one (the old serves until it is ready), a new model is learned (and loaded if it fits without
evicting anything), a removed one stops serving, and the admin's decisions are re-read. A
version that failed to load is not retried until the repository names another one.
"""

from __future__ import annotations

import asyncio
import logging

from appliance.serving.service import ModelService

log = logging.getLogger(__name__)


class RepositoryWatch:
    """Polls the repository through the ModelService."""

    def __init__(self, service: ModelService, interval_s: float) -> None:
        self.service = service
        self.interval_s = interval_s

    async def run(self) -> None:
        """Poll until cancelled; one failed poll is logged and the next one tries again."""
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.poll_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the watch must outlive one bad poll
                log.exception("repository watch: poll failed")

    async def poll_once(self) -> list[str]:
        """Act on what changed since the last poll; returns the model names acted on."""
        return await self.service.refresh()
