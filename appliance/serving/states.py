"""The lifecycle states of a served model, and the snapshot the doors read.

    EVICTED ──load──▶ LOADING ──ok──▶ READY ──evict / idle / keep_alive 0──▶ EVICTED
       ▲                 │  └─failed─▶ UNAVAILABLE ◀──undeploy / unload / removed── READY
       └──no room (503)──┘

- EVICTED: not in memory, and loads on the next request for it (never loaded yet, evicted to
  make room, or idle past its keep-alive). The reason says which.
- LOADING: its sessions are being opened (one load at a time per box; concurrent first
  requests wait for the same load).
- READY: loaded and serving. A new version loads beside it and replaces it when ready.
- UNAVAILABLE: will not load until someone acts: undeployed by an admin, unloaded through the
  repository API, failed to load, no deployable version, or too large for the memory budget.

docs/SERVING.md draws the same diagram. Never imports the engines.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class ServingState(StrEnum):
    LOADING = "LOADING"
    READY = "READY"
    EVICTED = "EVICTED"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass(frozen=True)
class ModelStatus:
    """One model as the doors see it at one moment (index, admin pages, metrics, doctor)."""

    name: str
    state: ServingState
    #: Why it is not READY (or a note about a READY one, e.g. a failed reload).
    reason: str | None
    task: str | None
    #: "generation" or "tensor"; None when no version can be read.
    family: str | None
    #: The version the repository says to serve.
    version: int | None
    #: The version in memory (None unless READY; differs from `version` while a new one loads).
    loaded_version: int | None
    #: Bytes the model is counted for in the budget: measured at load, else estimated.
    resident_bytes: int
    #: True when `resident_bytes` was measured at a load (not an estimate).
    measured: bool
    #: Where its bytes count: "cpu" (host memory budget) or "cuda" (GPU budget).
    device: str
    #: Execution provider of the loaded sessions ("cpu", "cuda", ...), None when not loaded.
    provider: str | None
    inflight: int
    queued: int
    #: Unix time of the last request that used it (None: never used since start).
    last_used_at: float | None
    pinned: bool
    #: The keep-alive in force (seconds; -1: never unloaded for idleness).
    keep_alive_s: float
    deployed: bool
    loads: int
    #: Unix time the serving version was created (for /v1/models).
    created: int
