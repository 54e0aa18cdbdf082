"""The memory budget's arithmetic: what a model is expected to cost, and which idle models to
evict so that another one fits. Pure functions over plain numbers, decided in one place.

Rules (docs/SERVING.md):
- A model counts for what was measured when it last loaded (weights and session arenas as
  the process's resident growth, plus its KV reservation), else for an estimate from its
  files and manifest (`estimate_bytes`), which the first load then corrects.
- Host and GPU memory are separate budgets; a model counts against the one of its device.
- To make room, idle models are evicted least recently used first. A model with requests or
  sequences in flight, or with requests waiting for it, or pinned, is never evicted.
- If evicting every candidate would still not make room, nothing is evicted and the request
  is refused (503 with Retry-After) naming the budget and what holds it.
- A model larger than its whole budget can never load: refused when it is deployed.
Never imports the engines.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from appliance.config import DEFAULT_MEMORY_BUDGET_SHARE, ServingSettings
from appliance.errors import MemoryBudgetExceeded

#: Bytes held per byte of model files, before a model's first load: ONNX Runtime keeps the
#: weights plus pre-packed copies of some and a session arena. Measured at load: SmolLM2 int4
#: 1.82x, MiniLM int8 1.46x, plain fp32 MatMul chains 1.0x (docs/SERVING.md); the first load
#: replaces the estimate. Erring high only defers a load at start to the model's first
#: request; erring low evicts another model right after the load.
ESTIMATE_FILE_FACTOR = 2.0
#: Retry-After for a request refused because the budget is held by busy models.
NO_ROOM_RETRY_AFTER_S = 5.0
MIB = 1 << 20


@dataclass(frozen=True)
class Budget:
    """What the loaded models may hold together."""

    host_bytes: int
    #: None: no GPU budget beyond the device itself.
    gpu_bytes: int | None = None
    #: 0: no count limit.
    max_models: int = 0

    @classmethod
    def from_settings(cls, serving: ServingSettings, available_bytes: int) -> Budget:
        """The configured budget, or the default share of the memory available now."""
        return cls(
            host_bytes=serving.memory_budget_bytes or int(available_bytes * DEFAULT_MEMORY_BUDGET_SHARE),
            gpu_bytes=serving.gpu_memory_budget_bytes,
            max_models=serving.max_loaded_models,
        )

    def limit_for(self, device: str) -> int | None:
        return self.gpu_bytes if device == "cuda" else self.host_bytes


@dataclass(frozen=True)
class Resident:
    """A loaded (or loading) model as the eviction choice sees it."""

    name: str
    bytes: int
    device: str
    #: Requests in flight or waiting for it: never evicted.
    busy: bool
    pinned: bool
    #: Monotonic time of its last use (smaller = less recently used).
    last_used: float
    #: Being loaded right now (counts, never evicted).
    loading: bool = False


def estimate_bytes(file_bytes: int, kv_reservation_bytes: int = 0) -> int:
    """A model's cost before it was ever loaded here."""
    return int(file_bytes * ESTIMATE_FILE_FACTOR) + kv_reservation_bytes


def check_fits_alone(name: str, needed: int, device: str, budget: Budget) -> str | None:
    """Why `name` can never load within the budget, or None when it could."""
    limit = budget.limit_for(device)
    if limit is not None and needed > limit:
        which = "GPU memory budget" if device == "cuda" else "memory budget"
        return f"needs about {needed / MIB:.0f} MiB, more than the whole {which} of {limit / MIB:.0f} MiB"
    return None


def plan_room(name: str, needed: int, device: str, residents: Sequence[Resident], budget: Budget) -> list[str]:
    """The models to evict, least recently used first, so that `name` (costing `needed` on
    `device`) fits both the byte budget of its device and the count limit. Raises
    MemoryBudgetExceeded (naming what holds the budget) when even evicting every idle model
    would not make room; then nothing should be evicted."""
    others = [resident for resident in residents if resident.name != name]
    limit = budget.limit_for(device)
    same_device = [resident for resident in others if resident.device == device]
    used = sum(resident.bytes for resident in same_device)
    over_bytes = 0 if limit is None else used + needed - limit
    over_count = 0 if budget.max_models == 0 else len(others) + 1 - budget.max_models
    candidates = sorted(
        (resident for resident in others if not (resident.busy or resident.pinned or resident.loading)),
        key=lambda resident: resident.last_used,
    )
    victims: list[str] = []
    for resident in candidates:
        if over_bytes <= 0 and over_count <= 0:
            break
        frees_bytes = resident.device == device and over_bytes > 0
        if not frees_bytes and over_count <= 0:
            continue
        victims.append(resident.name)
        over_count -= 1
        if resident.device == device:
            over_bytes -= resident.bytes
    if over_bytes > 0 or over_count > 0:
        raise MemoryBudgetExceeded(_no_room_message(name, needed, device, others, budget, limit), retry_after_s=NO_ROOM_RETRY_AFTER_S)
    return victims


def _no_room_message(name: str, needed: int, device: str, others: Sequence[Resident], budget: Budget, limit: int | None) -> str:
    holders = []
    for resident in sorted(others, key=lambda r: -r.bytes):
        why = "pinned" if resident.pinned else "loading" if resident.loading else "in use" if resident.busy else "idle"
        holders.append(f"{resident.name} ({resident.bytes / MIB:.0f} MiB, {why})")
    held = ", ".join(holders) or "nothing"
    parts = [f"model {name!r} needs about {needed / MIB:.0f} MiB"]
    if limit is not None:
        which = "GPU memory budget" if device == "cuda" else "memory budget"
        parts.append(f"the {which} is {limit / MIB:.0f} MiB")
    if budget.max_models:
        parts.append(f"at most {budget.max_models} models may be loaded")
    return f"{'; '.join(parts)}; held by {held}; retry when a model is idle"


@dataclass(frozen=True)
class StartPlan:
    """Which models a start would load (in order) within the budget."""

    held: list[str]
    #: Fit alone, but not beside those held: they load on their first request.
    on_demand: list[str]
    #: Larger than the whole budget: refused.
    never: dict[str, str]


def plan_start(candidates: Sequence[tuple[str, int, str]], budget: Budget) -> StartPlan:
    """Load (name, bytes, device) candidates in order while each fits beside the ones before
    it, as the server does at start (`serving.load_at_start`)."""
    held: list[Resident] = []
    on_demand: list[str] = []
    never: dict[str, str] = {}
    for name, needed, device in candidates:
        too_big = check_fits_alone(name, needed, device, budget)
        if too_big is not None:
            never[name] = too_big
            continue
        try:
            if plan_room(name, needed, device, held, budget):
                on_demand.append(name)
                continue
        except MemoryBudgetExceeded:
            on_demand.append(name)
            continue
        held.append(Resident(name=name, bytes=needed, device=device, busy=True, pinned=False, last_used=0.0))
    return StartPlan([resident.name for resident in held], on_demand, never)
