"""ModelService: the one owner of every model's lifecycle, for every task.

Like Ollama's scheduler, it keeps a few facts per model (requests in flight, last use,
keep-alive, measured resident bytes) and makes every load and eviction decision in one place,
one at a time (`_placement` lock), following the states of states.py:

- A request takes a lease (`lease`): a READY model is leased at once; an EVICTED one is
  loaded first (concurrent first requests share one load); an UNAVAILABLE one is refused
  with its reason (503), and a route that cannot serve the model's task gets a 400.
- A load first makes room (budget.py): idle models are evicted least recently used first;
  a model that is busy, waited on or pinned never is; when nothing can be evicted the request
  gets 503 with Retry-After naming the budget and what holds it.
- A released lease stamps the model's last use; a reaper unloads models idle longer than
  their keep-alive (the request's `keep_alive`, else the model's, else the server's).
- Admin actions and the repository API load and unload explicitly; the repository watch
  (watch.py) calls `refresh()` so newly published versions are served.

Runs on the event loop; the engines' slow work (opening sessions, stopping threads) runs in
worker threads. Never imports the API layer, torch or transformers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from appliance.config import ModelServingSettings, Settings
from appliance.errors import ApplianceError, InvalidInput, MemoryBudgetExceeded, ModelNotFound, ModelNotReady, ShuttingDown
from appliance.repository.manifest import check_model_name
from appliance.repository.store import ModelRepository, ModelVersion
from appliance.serving import budget as budgeting
from appliance.serving.lease import Lease
from appliance.serving.loaders import LoadedModel, ModelOpener, expected_kv_bytes, version_file_bytes
from appliance.ops.memory import allocated_bytes, available_bytes, give_back_memory
from appliance.serving.metrics import EVICTED_BY_REQUEST, EVICTED_FOR_ROOM, EVICTED_IDLE, ServingMetrics
from appliance.serving.states import ModelStatus, ServingState
from appliance.serving.tasks import Route, check_route, family_of
from appliance.store.deployments import ModelPolicy

log = logging.getLogger("appliance.serving")

#: How often idle models are checked against their keep-alive.
KEEP_ALIVE_TICK_S = 1.0
#: Share of the request deadline a request may wait for room in the budget, unless
#: `serving.max_load_wait_s` says otherwise (as generation's queue wait).
DEFAULT_LOAD_WAIT_SHARE = 0.25
#: While waiting for room, how often the budget is looked at again without a wake-up.
ROOM_RECHECK_S = 0.5
#: Longest model name echoed back in an error message.
NAME_ECHO_CHARS = 80

READY, LOADING, EVICTED, UNAVAILABLE = ServingState.READY, ServingState.LOADING, ServingState.EVICTED, ServingState.UNAVAILABLE

NOT_LOADED_YET = "not loaded yet: loads on its first request"
UNDEPLOYED = "undeployed by an admin"
UNLOADED_BY_API = "unloaded through the repository API; load it to serve it again"
REMOVED = "its files were removed from the model repository"
REMOVED_WHILE_LOADED = REMOVED + " while it was loaded"


@dataclass
class _Entry:
    """What the service knows about one model."""

    name: str
    #: The version the repository says to serve (None: nothing deployable).
    version: ModelVersion | None
    state: ServingState
    reason: str | None = None
    loaded: LoadedModel | None = None
    inflight: int = 0
    #: Requests waiting for its load.
    waiters: int = 0
    #: Monotonic time of the last use, or of the load if it was not used since (keep-alive
    #: and least-recently-used order count from there).
    last_used: float = 0.0
    last_used_at: float | None = None
    #: The keep-alive the last request asked for (None: none asked).
    request_keep_alive_s: float | None = None
    #: Why it must not load until someone acts (undeployed, unloaded through the API).
    held: str | None = None
    #: A version that failed to load: not retried until the repository names another.
    failed_version: int | None = None
    #: Bytes measured at the loads of each version (the smallest).
    measured: dict[int, int] = field(default_factory=dict)
    #: Bytes estimated for each version before its first load.
    estimated: dict[int, int] = field(default_factory=dict)
    loading: asyncio.Task[None] | None = None
    loads: int = 0

    @property
    def task(self) -> str | None:
        return self.version.manifest.task if self.version is not None else None

    @property
    def busy(self) -> bool:
        return self.inflight > 0 or self.waiters > 0


class ModelService:
    """Lists, loads, leases, evicts and unloads the repository's models (module docstring)."""

    def __init__(
        self,
        repository: ModelRepository,
        settings: Settings,
        loader: ModelOpener,
        *,
        policies: Callable[[], dict[str, ModelPolicy]] = dict,
        metrics: ServingMetrics | None = None,
    ) -> None:
        self.repository = repository
        self.settings = settings
        self.loader = loader
        self.metrics = metrics or ServingMetrics()
        self._read_policies = policies
        self._policies: dict[str, ModelPolicy] = {}
        self.budget = budgeting.Budget.from_settings(settings.serving, available_bytes())
        self._entries: dict[str, _Entry] = {}
        self._placement = asyncio.Lock()
        #: Set whenever a model goes idle or is unloaded: loads waiting for room look again.
        self._freed = asyncio.Event()
        self._startup: asyncio.Task[None] | None = None
        self._reaper: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[object]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self.closing = False

    # -- start and stop ---------------------------------------------------------------------
    async def start(self) -> None:
        """Learn the repository and the admin's decisions, then load what fits in the
        background (`load_at_start`); readiness waits for that (`settled`)."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        await self._sync_with_repository()
        if self.settings.serving.load_at_start:
            self._startup = self._loop.create_task(self._load_what_fits(self._start_order()), name="load-models")
        self._reaper = self._loop.create_task(self._reap_idle(), name="keep-alive")

    def _start_order(self) -> list[str]:
        """Pinned models first, then the rest by name."""
        names = [name for name, entry in self._entries.items() if entry.state is EVICTED]
        return sorted(names, key=lambda name: (not self._pinned(name), name))

    async def _load_what_fits(self, names: list[str]) -> None:
        for name in names:
            entry = self._entries.get(name)
            if entry is None or entry.state is not EVICTED:
                continue
            needed, device = self._expected_cost(entry)
            try:
                if budgeting.plan_room(name, needed, device, self._residents(), self.budget):
                    log.info("model %s not loaded at start: it fits only by evicting another; it loads on its first request", name)
                    continue
            except MemoryBudgetExceeded:
                log.info("model %s not loaded at start: the memory budget is full; it loads on its first request", name)
                continue
            with contextlib.suppress(ApplianceError):
                await self._load_shared(entry)

    def settled(self) -> bool:
        """False while the start-up loads run (readiness); loads on demand do not count."""
        return self._startup is None or self._startup.done()

    async def close(self, grace_s: float) -> None:
        """Let in-flight work finish within `grace_s`, then unload everything."""
        self.closing = True
        loads = [entry.loading for entry in self._entries.values() if entry.loading is not None]
        for task in (self._startup, self._reaper, *loads, *self._background):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        deadline = time.monotonic() + grace_s
        while any(entry.inflight for entry in self._entries.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for entry in self._entries.values():
            if entry.loaded is not None:
                loaded, entry.loaded = entry.loaded, None
                await loaded.close(max(0.0, deadline - time.monotonic()))
            entry.state, entry.reason = EVICTED, "the server stopped"

    # -- requests ---------------------------------------------------------------------------
    async def lease(
        self, name: str, route: Route, *, version: int | None = None, keep_alive_s: float | None = None
    ) -> Lease:
        """The model's client, loaded if needed, held until the lease is released.

        404: unknown model or version; 400: invalid name, or a task `route` cannot serve;
        503: unavailable (with the reason), no room in the budget (with Retry-After), or the
        server is stopping."""
        entry = await self._known(name)
        check_route(name, entry.task, route)
        if version is not None:
            await self._check_version(entry, version)
        entry.waiters += 1
        try:
            while entry.state is not READY:
                if self.closing:
                    raise ShuttingDown("the server is shutting down")
                if entry.state is UNAVAILABLE:
                    raise ModelNotReady(f"model {name!r} is unavailable: {entry.reason}", field="model")
                await self._load_shared(entry)
        finally:
            entry.waiters -= 1
        assert entry.loaded is not None
        entry.inflight += 1
        if keep_alive_s is not None:
            entry.request_keep_alive_s = keep_alive_s
        self._touch(entry)
        return Lease(entry.loaded.client, entry.loaded.version.version, lambda: self._release(entry))

    def _release(self, entry: _Entry) -> None:
        """A lease ended (possibly from a garbage collection in another thread)."""
        if self._loop is not None and threading.get_ident() != self._loop_thread:
            self._loop.call_soon_threadsafe(self._release, entry)
            return
        entry.inflight -= 1
        self._touch(entry)
        if entry.inflight == 0:
            self._freed.set()
        if entry.inflight == 0 and self._keep_alive(entry) == 0 and not self._pinned(entry.name):
            self._spawn(self._unload_if_idle(entry, EVICTED_BY_REQUEST, "unloaded after its request (keep_alive 0)"))

    @staticmethod
    def _touch(entry: _Entry) -> None:
        entry.last_used = time.monotonic()
        entry.last_used_at = time.time()

    async def _known(self, name: str) -> _Entry:
        """The entry for `name`; a name not seen yet is looked up on disk (it may have just
        been published). Invalid names never reach the filesystem."""
        try:
            check_model_name(name)
        except ValueError:
            shown = name if len(name) <= NAME_ECHO_CHARS else name[:NAME_ECHO_CHARS] + "…"
            raise InvalidInput(
                f"model: {shown!r} is not a model name (1-64 characters of a-z, 0-9, '.', '_', '-')", field="model"
            ) from None
        entry = self._entries.get(name)
        if entry is None:
            if name not in await asyncio.to_thread(self.repository.names):
                raise ModelNotFound(f"model {name!r} not found", field="model")
            await self._sync_with_repository()
            entry = self._entries.get(name)
            if entry is None:
                raise ModelNotFound(f"model {name!r} not found", field="model")
        return entry

    async def _check_version(self, entry: _Entry, version: int) -> None:
        await asyncio.to_thread(self.repository.get, entry.name, version)  # 404 for a version that does not exist
        serving = entry.version.version if entry.version is not None else None
        if version != serving:
            raise ModelNotReady(
                f"model {entry.name!r} version {version} is not served (serving version {serving})", field="version"
            )

    # -- loading ------------------------------------------------------------------------------
    async def _load_shared(self, entry: _Entry, *, reload: bool = False) -> None:
        """Load `entry` (or join the load already running); raises why it could not.
        `reload`: open the serving version again even when it is loaded (an explicit load)."""
        if entry.loading is None or entry.loading.done():
            entry.loading = asyncio.get_running_loop().create_task(self._load(entry, reload=reload), name=f"load-{entry.name}")
            entry.loading.add_done_callback(_retrieve)
        await asyncio.shield(entry.loading)

    async def _load(self, entry: _Entry, *, reload: bool = False) -> None:
        """Make room and load, one load at a time. When the budget is held by busy or pinned
        models, wait (without holding the placement lock) for one to go idle, up to the load
        wait; then refuse with 503 and Retry-After."""
        deadline = time.monotonic() + self._load_wait_s()
        while True:
            async with self._placement:
                version = entry.version
                if entry.held is not None:
                    raise ModelNotReady(f"model {entry.name!r} is unavailable: {entry.held}", field="model")
                if version is None:
                    self._set(entry, UNAVAILABLE, self._no_version_reason(entry.name))
                    raise ModelNotReady(f"model {entry.name!r} is unavailable: {entry.reason}", field="model")
                if entry.loaded is not None and entry.loaded.version.version == version.version and not reload:
                    return
                needed, device = self._expected_cost(entry)
                too_big = budgeting.check_fits_alone(entry.name, needed, device, self.budget)
                if too_big is not None:
                    self._set(entry, UNAVAILABLE, too_big)
                    raise ModelNotReady(f"model {entry.name!r} is unavailable: {too_big}", field="model")
                try:
                    victims = budgeting.plan_room(entry.name, needed, device, self._residents(), self.budget)
                except MemoryBudgetExceeded:
                    if time.monotonic() >= deadline:
                        raise
                    self._freed.clear()
                else:
                    for victim in victims:
                        await self._evict(self._entries[victim], EVICTED_FOR_ROOM, f"evicted to make room for {entry.name}")
                    replacing = entry.loaded is not None
                    if not replacing:
                        self._set(entry, LOADING, None)
                    await self._open(entry, version, replacing=replacing)
                    return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._freed.wait(), min(ROOM_RECHECK_S, max(0.0, deadline - time.monotonic())))

    def _load_wait_s(self) -> float:
        configured = self.settings.serving.max_load_wait_s
        return configured if configured is not None else self.settings.request_timeout_s * DEFAULT_LOAD_WAIT_SHARE

    async def _open(self, entry: _Entry, version: ModelVersion, *, replacing: bool) -> None:
        give_back_memory()
        before = allocated_bytes()
        started = time.perf_counter()
        try:
            loaded = await self.loader.open(version, lambda why: self._poisoned(entry, why))
        except Exception as exc:  # noqa: BLE001 - a broken model must not stop the server
            first = (str(exc).splitlines() or [""])[0]
            reason = exc.message if isinstance(exc, ApplianceError) else f"{exc.__class__.__name__}: {first}"
            self._load_failed(entry, version, reason, replacing)
            if replacing:
                return  # the version in memory keeps serving; its status says the reload failed
            raise ModelNotReady(f"model {entry.name!r}: version {version.version} failed to load: {reason}", field="model") from None
        elapsed = time.perf_counter() - started
        grown = max(0, allocated_bytes() - before)
        give_back_memory()  # the buffers a load reads its files through are garbage now
        if entry.held is not None:
            # Unloaded or undeployed while it was loading: do not serve it.
            await loaded.close(0.0)
            self._set(entry, UNAVAILABLE, entry.held)
            raise ModelNotReady(f"model {entry.name!r} is unavailable: {entry.held}", field="model")
        # A model's cost: what loading it allocated (weights, pre-packed copies, arena), at
        # least its files, plus the KV cache it may fill (on its device). Concurrent requests
        # can only inflate one measurement, so the smallest of its loads is kept.
        if loaded.device == "cuda":
            cost = loaded.file_bytes + loaded.kv_reservation_bytes
        else:
            cost = max(grown, loaded.file_bytes) + loaded.kv_reservation_bytes
        entry.measured[version.version] = min(cost, entry.measured.get(version.version, cost))
        old, entry.loaded = entry.loaded, loaded
        entry.failed_version = None
        entry.loads += 1
        entry.last_used = max(entry.last_used, time.monotonic())
        self._set(entry, READY, None)
        self.metrics.loads.labels(model=entry.name).inc()
        self.metrics.load_seconds.labels(model=entry.name).observe(elapsed)
        log.info(
            "model %s version %d ready on %s in %.2f s (%.0f MiB counted)",
            entry.name, version.version, loaded.provider, elapsed, entry.measured[version.version] / budgeting.MIB,
        )
        if old is not None:
            self._spawn(self._close_later(old))
        await self._enforce_budget(keep=entry.name)

    async def _enforce_budget(self, *, keep: str | None = None) -> None:
        """A load that measured more than its estimate can leave the loaded models over the
        budget: evict idle ones, least recently used first, until they fit again (busy and
        pinned ones stay; the reaper tries again each tick). Caller holds `_placement`."""
        for device, limit in (("cpu", self.budget.host_bytes), ("cuda", self.budget.gpu_bytes)):
            if limit is None:
                continue
            residents = [r for r in self._residents() if r.device == device]
            over = sum(r.bytes for r in residents) - limit
            for resident in sorted(residents, key=lambda r: r.last_used):
                if over <= 0:
                    break
                if resident.name == keep or resident.busy or resident.pinned or resident.loading:
                    continue
                await self._evict(self._entries[resident.name], EVICTED_FOR_ROOM, "evicted: the models loaded were over the memory budget")
                over -= resident.bytes

    def _load_failed(self, entry: _Entry, version: ModelVersion, reason: str, replacing: bool) -> None:
        log.error("model %s version %d failed to load: %s", entry.name, version.version, reason)
        entry.failed_version = version.version
        if replacing and entry.loaded is not None:
            # Keep serving the old version; say beside it that the new one failed.
            entry.reason = f"reload failed (still serving version {entry.loaded.version.version}): version {version.version}: {reason}"
        else:
            self._set(entry, UNAVAILABLE, f"version {version.version} failed to load: {reason}")

    async def _close_later(self, old: LoadedModel) -> None:
        """Close a replaced version once the requests it was serving are done."""
        await old.close(self.settings.drain_grace_s)
        give_back_memory(collect=_holds_cycles(old))

    def _poisoned(self, entry: _Entry, why: str) -> None:
        """A session ran out of memory at run time: reload it (the batcher already refused
        the batch that failed)."""
        log.error("model %s must be reloaded: %s", entry.name, why)
        old, entry.loaded = entry.loaded, None
        self._set(entry, EVICTED, f"reloading after: {why}")
        if old is not None:
            self._spawn(old.close(0.0))
        self._spawn(self._load_shared(entry))

    def _expected_cost(self, entry: _Entry) -> tuple[int, str]:
        """Bytes and device `entry`'s serving version is expected to hold when loaded."""
        version = entry.version
        assert version is not None
        if entry.loaded is not None and entry.loaded.version.version == version.version:
            return entry.measured.get(version.version, 0), entry.loaded.device
        device = entry.loaded.device if entry.loaded is not None else "cpu"
        if version.version in entry.measured:
            return entry.measured[version.version], device
        if version.version not in entry.estimated:
            # Files are read from disk once per version: the doors ask often (metrics, lists).
            kv = expected_kv_bytes(version, self.settings) if family_of(version.manifest.task) == "generation" else 0
            entry.estimated[version.version] = budgeting.estimate_bytes(version_file_bytes(version), kv)
        return entry.estimated[version.version], device

    def _residents(self) -> list[budgeting.Resident]:
        residents = []
        for entry in self._entries.values():
            if entry.loaded is None and entry.state is not LOADING:
                continue
            if entry.loaded is not None:
                counted = entry.measured.get(entry.loaded.version.version, 0)
                device = entry.loaded.device
            else:
                counted, device = self._expected_cost(entry)
            residents.append(
                budgeting.Resident(
                    name=entry.name, bytes=counted, device=device, busy=entry.busy,
                    pinned=self._pinned(entry.name), last_used=entry.last_used, loading=entry.state is LOADING,
                )
            )
        return residents

    # -- unloading ----------------------------------------------------------------------------
    async def _evict(self, entry: _Entry, metric_reason: str, reason: str) -> None:
        """Unload an idle model (the caller holds `_placement` and checked it is idle)."""
        loaded, entry.loaded = entry.loaded, None
        self._set(entry, EVICTED, reason)
        entry.request_keep_alive_s = None
        self.metrics.evictions.labels(model=entry.name, reason=metric_reason).inc()
        log.info("model %s: %s", entry.name, reason)
        if loaded is not None:
            await loaded.close(0.0)
        give_back_memory(collect=_holds_cycles(loaded))
        self._freed.set()

    async def _unload_if_idle(self, entry: _Entry, metric_reason: str, reason: str) -> None:
        async with self._placement:
            if entry.state is READY and not entry.busy and not self._pinned(entry.name):
                await self._evict(entry, metric_reason, reason)

    async def _reap_idle(self) -> None:
        """Every KEEP_ALIVE_TICK_S: unload models idle past their keep-alive, and evict idle
        ones while the loaded models are over the budget."""
        while True:
            await asyncio.sleep(KEEP_ALIVE_TICK_S)
            if self._over_budget():
                async with self._placement:
                    await self._enforce_budget()
            now = time.monotonic()
            for entry in list(self._entries.values()):
                keep = self._keep_alive(entry)
                if entry.state is READY and not entry.busy and keep >= 0 and now - entry.last_used >= keep and not self._pinned(entry.name):
                    await self._unload_if_idle(entry, EVICTED_IDLE, f"unloaded after {keep:g} s idle (keep-alive)")

    async def _retire(self, entry: _Entry, state: ServingState, reason: str) -> None:
        """Stop serving `entry` now: new requests are refused at once, requests in flight
        get up to `drain_grace_s` to finish, then its memory is returned."""
        self._set(entry, state, reason)
        deadline = time.monotonic() + self.settings.drain_grace_s
        while entry.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        async with self._placement:
            loaded, entry.loaded = entry.loaded, None
            if loaded is not None:
                await loaded.close(max(0.0, deadline - time.monotonic()))
                give_back_memory(collect=_holds_cycles(loaded))
        self._freed.set()

    # -- explicit actions (admin UI, repository API, watch) -------------------------------------
    async def load(self, name: str) -> ModelStatus:
        """Load `name` now (deploy, `POST .../load`). 400 when it can never fit the budget or
        failed to load; 503 when the budget is held by busy models."""
        entry = await self._known(name)
        entry.held = None
        entry.failed_version = None
        if name in await self._sync_with_repository():  # the version to load is the one on disk now
            await self._drop_removed(name)
            raise ModelNotFound(f"model {name!r} not found: {REMOVED}", field="model")
        if entry.state is UNAVAILABLE:
            self._set(entry, EVICTED, None)
        if entry.version is not None:
            needed, device = self._expected_cost(entry)
            too_big = budgeting.check_fits_alone(name, needed, device, self.budget)
            if too_big is not None:
                self._set(entry, UNAVAILABLE, too_big)
                raise InvalidInput(f"model: {name!r} cannot be served here: {too_big}", field="model")
        try:
            await self._load_shared(entry, reload=True)
        except ModelNotReady as exc:
            raise InvalidInput(exc.message, field="model") from None
        return self.status(name)

    async def unload(self, name: str, *, reason: str = UNLOADED_BY_API) -> ModelStatus:
        """Stop serving `name` until it is loaded again (undeploy, `POST .../unload`)."""
        entry = await self._known(name)
        entry.held = reason
        await self._retire(entry, UNAVAILABLE, reason)
        return self.status(name)

    async def forget(self, name: str) -> None:
        """A model deleted from the repository: stop serving it and drop what we knew."""
        entry = self._entries.get(name)
        if entry is not None:
            await self._retire(entry, UNAVAILABLE, REMOVED)
            self._entries.pop(name, None)

    async def reload_policies(self) -> None:
        """Read the admin's decisions again (after a pin, keep-alive or deploy change)."""
        self._policies = await asyncio.to_thread(self._read_policies)

    async def refresh(self) -> list[str]:
        """Follow the repository (the watch's poll): serve newly published or re-defaulted
        versions of loaded models now, learn new models (loading them if they fit without
        evicting anything), stop serving removed ones. Returns the names acted on."""
        before = {name: (entry.version.version if entry.version else None) for name, entry in self._entries.items()}
        removed = await self._sync_with_repository()
        acted: list[str] = []
        for name in removed:
            if await self._drop_removed(name):
                acted.append(name)
        new = [name for name in self._entries if name not in before and self._entries[name].state is EVICTED]
        for name, entry in list(self._entries.items()):
            if name in new or entry.held is not None or entry.loaded is None:
                continue
            if entry.version is None:
                log.warning("model %s has no deployable version left; it stops serving", name)
                await self._retire(entry, UNAVAILABLE, self._no_version_reason(name))
                acted.append(name)
                continue
            if entry.loaded.version.version != entry.version.version and entry.failed_version != entry.version.version:
                log.info("repository: %s version %d published, loading it", name, entry.version.version)
                with contextlib.suppress(ApplianceError):
                    await self._load_shared(entry)
                acted.append(name)
        if new:
            await self._load_what_fits(new)
            acted.extend(new)
        return acted

    async def _sync_with_repository(self) -> list[str]:
        """Read the repository's serving versions and the admin's decisions into the entries;
        returns the names no longer on disk (their entries are left for the caller)."""
        snapshot = await asyncio.to_thread(self._read_repository)
        self._policies = await asyncio.to_thread(self._read_policies)
        for name, version in snapshot.items():
            entry = self._entries.get(name)
            policy = self._policies.get(name, ModelPolicy())
            if entry is None:
                entry = _Entry(name=name, version=version, state=EVICTED, reason=NOT_LOADED_YET)
                self._entries[name] = entry
            else:
                entry.version = version
                if entry.held == REMOVED_WHILE_LOADED:
                    entry.held = None  # published again
            if not policy.deployed and entry.held != UNDEPLOYED:
                entry.held = UNDEPLOYED
                if entry.loaded is not None:
                    await self._retire(entry, UNAVAILABLE, UNDEPLOYED)
                self._set(entry, UNAVAILABLE, UNDEPLOYED)
            elif policy.deployed and entry.held == UNDEPLOYED:
                entry.held = None
                self._set(entry, EVICTED, NOT_LOADED_YET)
            if entry.held is None and entry.loaded is None and entry.state is not LOADING:
                self._settle_unloaded(entry)
        return [name for name in self._entries if name not in snapshot]

    def _settle_unloaded(self, entry: _Entry) -> None:
        """The state of a model that is neither loaded nor held: EVICTED (loads on demand),
        or UNAVAILABLE when it has nothing to serve, is too large for the budget, or failed to
        load this very version (a failed version is not retried until another is named)."""
        version = entry.version
        if version is None:
            self._set(entry, UNAVAILABLE, self._no_version_reason(entry.name))
        elif entry.failed_version != version.version:
            needed, device = self._expected_cost(entry)
            too_big = budgeting.check_fits_alone(entry.name, needed, device, self.budget)
            if too_big is not None:
                self._set(entry, UNAVAILABLE, too_big)
            elif entry.state is UNAVAILABLE:
                self._set(entry, EVICTED, NOT_LOADED_YET)

    async def _drop_removed(self, name: str) -> bool:
        """A model no longer on disk: stop serving it if it was loaded (kept, so that the index
        and the UI say why it stopped), else forget it. True when it was serving."""
        entry = self._entries.get(name)
        if entry is None:
            return False
        if entry.loaded is not None:
            log.warning("model %s was removed from the repository; it stops serving", name)
            entry.held = REMOVED_WHILE_LOADED
            await self._retire(entry, UNAVAILABLE, REMOVED_WHILE_LOADED)
            return True
        if entry.held != REMOVED_WHILE_LOADED:
            self._entries.pop(name, None)
        return False

    def _read_repository(self) -> dict[str, ModelVersion | None]:
        """{name: serving version or None} for every model on disk (worker thread)."""
        snapshot: dict[str, ModelVersion | None] = {}
        for name in self.repository.names():
            try:
                snapshot[name] = self.repository.serving_version(name)
            except ApplianceError as exc:
                log.warning("repository: %s is unreadable: %s", name, exc.message)
                snapshot[name] = None
        return snapshot

    def _no_version_reason(self, name: str) -> str:
        broken = self.repository.broken_versions(name)
        detail = "; ".join(f"version {v}: {why}" for v, why in broken.items())
        return "no deployable version" + (f" ({detail})" if detail else "")

    # -- policies ------------------------------------------------------------------------------
    def _configured(self, name: str) -> ModelServingSettings:
        return self.settings.serving.models.get(name) or ModelServingSettings()

    def _pinned(self, name: str) -> bool:
        """The admin's pin or unpin, else the config file's."""
        policy = self._policies.get(name)
        if policy is not None and policy.pinned is not None:
            return policy.pinned
        return self._configured(name).pin

    def _keep_alive(self, entry: _Entry) -> float:
        """Idle seconds before unloading (-1: never): the last request's, else the admin's,
        else the config file's, else the server's default."""
        if entry.request_keep_alive_s is not None:
            return entry.request_keep_alive_s
        policy = self._policies.get(entry.name)
        if policy is not None and policy.keep_alive_s is not None:
            return policy.keep_alive_s
        configured = self._configured(entry.name).keep_alive_s
        return configured if configured is not None else self.settings.serving.keep_alive_s

    # -- what the doors read -------------------------------------------------------------------
    def names(self) -> list[str]:
        return sorted(self._entries)

    def statuses(self) -> list[ModelStatus]:
        return [self.status(name) for name in sorted(self._entries)]

    def status(self, name: str) -> ModelStatus:
        entry = self._entries.get(name)
        if entry is None:
            raise ModelNotFound(f"model {name!r} not found", field="model")
        loaded = entry.loaded
        if loaded is not None:
            counted, measured, device = entry.measured.get(loaded.version.version, 0), True, loaded.device
        elif entry.version is not None and entry.version.version in entry.measured:
            counted, measured, device = entry.measured[entry.version.version], True, "cpu"
        elif entry.version is not None:
            (counted, device), measured = self._expected_cost(entry), False
        else:
            counted, measured, device = 0, False, "cpu"
        policy = self._policies.get(name, ModelPolicy())
        return ModelStatus(
            name=name,
            state=entry.state,
            reason=entry.reason if entry.state is not READY else entry.reason or (loaded.provider_note if loaded else None),
            task=entry.task,
            family=family_of(entry.task) if entry.task else None,
            version=entry.version.version if entry.version is not None else None,
            loaded_version=loaded.version.version if loaded is not None else None,
            resident_bytes=counted,
            measured=measured,
            device=device,
            provider=loaded.provider if loaded is not None else None,
            inflight=entry.inflight,
            queued=loaded.queued() if loaded is not None else 0,
            last_used_at=entry.last_used_at,
            pinned=self._pinned(name),
            keep_alive_s=self._keep_alive(entry),
            deployed=policy.deployed,
            loads=entry.loads,
            created=_created(entry.version),
        )

    async def find(self, name: str) -> ModelStatus:
        """`status` for a name a client sent (validated; a model just published is found)."""
        return self.status((await self._known(name)).name)

    async def describe(self, name: str, version: int | None) -> tuple[ModelVersion, list[int], ModelStatus]:
        """A version's manifest (the serving one without `version`), every version number
        on disk, and the model's status. 404 for an unknown model or version."""
        entry = await self._known(name)

        def read() -> tuple[ModelVersion, list[int]]:
            return self.repository.get(name, version), [v.version for v in self.repository.versions(name)]

        described, versions = await asyncio.to_thread(read)
        return described, versions, self.status(entry.name)

    def provider_report(self, name: str) -> dict[str, object] | None:
        """Where a loaded model's sessions run and why preferred providers were not used."""
        entry = self._entries.get(name)
        return entry.loaded.provider_report if entry is not None and entry.loaded is not None else None

    def _over_budget(self) -> bool:
        used = self.memory_in_use()
        gpu = self.budget.gpu_bytes
        return used.get("cpu", 0) > self.budget.host_bytes or (gpu is not None and used.get("cuda", 0) > gpu)

    def memory_in_use(self) -> dict[str, int]:
        """Bytes counted against each device's budget by the models loaded now."""
        used: dict[str, int] = {"cpu": 0, "cuda": 0}
        for resident in self._residents():
            used[resident.device] = used.get(resident.device, 0) + resident.bytes
        return used

    def loaded_client(self, name: str) -> object | None:
        """The client of a READY model without leasing it (dashboards, tests); None otherwise."""
        entry = self._entries.get(name)
        return entry.loaded.client if entry is not None and entry.state is READY and entry.loaded is not None else None

    # -- helpers -----------------------------------------------------------------------------
    def _set(self, entry: _Entry, state: ServingState, reason: str | None) -> None:
        entry.state, entry.reason = state, reason

    def _spawn(self, work: object) -> None:
        task = asyncio.get_running_loop().create_task(work)  # type: ignore[arg-type]
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(_retrieve)


def _holds_cycles(loaded: LoadedModel | None) -> bool:
    """A generation engine's parts refer to each other, so its KV buffers and sessions are
    freed only by a garbage collection; a tensor model is freed by reference counting alone
    (a collection costs ~0.2 s in a process with many objects)."""
    return loaded is not None and loaded.family == "generation"


def _retrieve(task: asyncio.Task[object]) -> None:
    """Mark a background task's exception as seen (its waiters got it, or nobody waits)."""
    if not task.cancelled():
        task.exception()


def _created(version: ModelVersion | None) -> int:
    if version is None:
        return 0
    try:
        return int(datetime.fromisoformat(version.manifest.created_at.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return 0
