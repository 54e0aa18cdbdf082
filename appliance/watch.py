"""Repository watch: the server serves what the model repository says, without a restart.

Why: `appliance export` and `appliance models set-default` run as processes of their own (from
a shell, a script, or an export the admin UI started), and a published version must be served
once it is published. Every `repository_poll_s` seconds the watch compares each model's serving
version on disk (the default, else the newest deployable one) with the version loaded, and
reloads where they differ; the old version keeps serving until the new one is ready. Models an
admin undeployed, or that a client unloaded (POST /v2/repository/models/NAME/unload), are left
alone until loaded explicitly; a model whose files were removed stops serving. A version that
failed to load is not retried until the repository names another one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from appliance.errors import ApplianceError
from appliance.generation.registry import GenerationRegistry
from appliance.repository import ModelRepository
from appliance.runtime.registry import ModelRegistry

log = logging.getLogger(__name__)

GENERATION_TASK = "text-generation"


class RepositoryWatch:
    """Polls the repository and reloads models whose serving version changed."""

    def __init__(
        self,
        repository: ModelRepository,
        registry: ModelRegistry,
        generation: GenerationRegistry,
        held_back: Callable[[], set[str]],
        interval_s: float,
    ) -> None:
        self.repository = repository
        self.registry = registry
        self.generation = generation
        self.held_back = held_back
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
        """Reload what changed since the last poll; returns the model names acted on."""
        held = await asyncio.to_thread(self.held_back)
        wanted, present = await asyncio.to_thread(self._serving_versions)
        acted: list[str] = []
        for name, (version, task) in sorted(wanted.items()):
            if name in held:
                continue
            if task == GENERATION_TASK:
                if self.generation.version_of(name) != version:
                    log.info("repository watch: %s version %d published, loading it", name, version)
                    await self.generation.load(name)
                    acted.append(name)
                continue
            state = self.registry.state(name)
            if state is not None and (state.version == version or state.status in ("loading", "unloaded")):
                continue
            log.info("repository watch: %s version %d published, loading it", name, version)
            await self.registry.load(name)
            acted.append(name)
        for name in self._loaded_names() - present:
            log.warning("repository watch: %s was removed from the repository, it stops serving", name)
            await self._drop(name)
            acted.append(name)
        return acted

    def _serving_versions(self) -> tuple[dict[str, tuple[int, str]], set[str]]:
        """{name: (serving version, task)} for every model with one, and every name on disk."""
        names = set(self.repository.names())
        wanted: dict[str, tuple[int, str]] = {}
        for name in names:
            try:
                version = self.repository.serving_version(name)
            except ApplianceError as exc:
                log.warning("repository watch: %s is unreadable: %s", name, exc.message)
                continue
            if version is not None:
                wanted[name] = (version.version, version.manifest.task)
        return wanted, names

    def _loaded_names(self) -> set[str]:
        tensor = {state.name for state in self.registry.states() if state.status in ("ready", "loading")}
        return tensor | set(self.generation.loaded_names())

    async def _drop(self, name: str) -> None:
        if name in self.generation.loaded_names():
            await self.generation.unload(name)
            return
        try:
            await self.registry.load(name)  # marks it failed, says why, closes its batcher
        except ApplianceError:
            pass
