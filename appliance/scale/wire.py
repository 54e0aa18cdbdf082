"""What crosses the network between the ingress and a model's replicas: replies, errors and
stream items, as plain picklable values.

A replica never lets an exception travel through Ray: Ray would wrap it (and lose `field` and
`retry_after_s`, which are keyword arguments). It answers `Reply(replica, value)` or
`Reply(replica, error=WireError(...))`, and the ingress raises the same typed error again, so
a route maps it to the same status and body as on one box. Every reply names the replica that
made it, which the ingress counts per replica. Never imports Ray.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from appliance import errors as appliance_errors
from appliance.errors import ApplianceError
from appliance.serving.protocols import GenerationModelInfo, TensorModelInfo, TokenEvent


@dataclass(frozen=True)
class WireError:
    """An ApplianceError as data: its class name and what its constructor needs."""

    kind: str
    message: str
    field: str | None = None
    retry_after_s: float | None = None

    @classmethod
    def of(cls, exc: ApplianceError) -> WireError:
        return cls(type(exc).__name__, exc.message, exc.field, getattr(exc, "retry_after_s", None))

    def rebuilt(self) -> ApplianceError:
        """The same typed error (an unknown kind becomes a plain ApplianceError, a 500)."""
        kind = getattr(appliance_errors, self.kind, None)
        if not (isinstance(kind, type) and issubclass(kind, ApplianceError)):
            return ApplianceError(self.message, field=self.field)
        if self.retry_after_s is not None:
            try:
                return kind(self.message, field=self.field, retry_after_s=self.retry_after_s)  # type: ignore[call-arg]
            except TypeError:
                pass
        return kind(self.message, field=self.field)


@dataclass(frozen=True)
class ReplicaIdentity:
    """Which replica answered, and where it runs."""

    replica_id: str
    node_id: str
    node_ip: str
    pid: int


@dataclass(frozen=True)
class ReplicaDescription:
    """What the ingress needs to build a model's client: its family and signature, the special
    tokens tool-call grammars must name, and where its sessions run."""

    family: str
    version: int
    generation: GenerationModelInfo | None
    tensor: TensorModelInfo | None
    special_tokens: dict[str, int]
    provider: str | None
    provider_note: str | None
    provider_report: dict[str, Any]


@dataclass(frozen=True)
class Reply:
    """One unary answer of a replica: a value, or the typed error it raised."""

    replica: ReplicaIdentity
    value: Any = None
    error: WireError | None = None

    def unwrap(self) -> Any:
        if self.error is not None:
            raise self.error.rebuilt()
        return self.value


# -- generation streams: the items a replica's `generate` yields, in order -----------------------
@dataclass(frozen=True)
class Started:
    """The sequence got a slot on `replica` (the first item, unless it was refused)."""

    replica: ReplicaIdentity


@dataclass(frozen=True)
class Events:
    """Token events as the engine made them (several when they queued up meanwhile), with the
    text of every token id their logprobs name, so the ingress answers `token_text` locally."""

    events: list[TokenEvent]
    token_texts: dict[int, tuple[str, list[int]]] = field(default_factory=dict)


@dataclass(frozen=True)
class Failed:
    """The sequence was refused or failed; nothing follows."""

    error: WireError
