"""Turning one finished inference request into usage counts for its API key.

Called by the request-logging middleware, which already sees every inference request's
model, status and `usage` (in every privacy mode), once the answer is complete. Counts are
numbers only — requests, 4xx/5xx errors, prompt and completion tokens as the client's `usage`
said (a stream without `include_usage` is counted by its content chunks and has no prompt
count), embedding inputs and rerank documents of successful requests — handed to the
in-memory `UsageRecorder`, so counting never waits on the database. The same event feeds the
per-key Prometheus counters (`KeyUsageMetrics`), so /metrics and the usage table agree.

Only a key that `require_scope` verified is charged; a request refused before its key was
checked (401/403, which are audited instead, a body that is not JSON, one over the size limit)
is not counted, so a client without a valid key cannot make rows appear. A model name the
serving layer does not know is counted as "(unknown)", so made-up names cannot grow the table
either. Never reads or keeps text.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from starlette.types import Scope

from appliance.api.deps import RATE_CHARGED_STATE, verified_key_id
from appliance.api.metrics import KeyUsageMetrics
from appliance.errors import ModelNotFound
from appliance.serving.service import ModelService
from appliance.store.rate_limits import RateLimiter
from appliance.store.usage_recorder import UsageEvent, UsageRecorder
from appliance.store.usage_tables import MODEL_MAX_CHARS, UNKNOWN_MODEL, VERSION_MAX_CHARS

#: Request kinds (the middleware's path families) whose completion counts are generated tokens.
GENERATION_KINDS = frozenset({"chat/completions", "completions"})


def embedding_inputs(body: dict[str, Any]) -> int:
    """Inputs in an embeddings request: a string or one token list is one; a list of strings
    or of token lists is one per item."""
    value = body.get("input")
    if isinstance(value, str):
        return 1
    if not isinstance(value, list) or not value:
        return 0
    return 1 if isinstance(value[0], int) else len(value)


def rerank_documents(body: dict[str, Any]) -> int:
    documents = body.get("documents")
    return len(documents) if isinstance(documents, list) else 0


class UsageCounter:
    """Builds a UsageEvent per request and hands it to the recorder."""

    def __init__(
        self, recorder: UsageRecorder, models: ModelService, *, auth: bool, rate_limiter: RateLimiter | None = None,
        key_metrics: KeyUsageMetrics | None = None,
    ) -> None:
        """`rate_limiter`: where the tokens of keys and groups with token limits are charged;
        `key_metrics`: the server's per-key Prometheus counters (None: not exported)."""
        self.recorder = recorder
        self.models = models
        self.auth = auth
        self.rate_limiter = rate_limiter
        self.key_metrics = key_metrics

    def count(
        self,
        scope: Scope,
        *,
        kind: str | None,
        model: str,
        path_version: str | None,
        body: dict[str, Any],
        status: int,
        prompt_tokens: int | None,
        completion_tokens: int | None,
    ) -> None:
        """Count one finished request (`kind` None: a KServe V2 infer, whose body is not read)."""
        if self.auth:
            key_id = verified_key_id(scope)
            if key_id is None:
                return
        else:
            key_id = ""
        self._charge_tokens(scope, (prompt_tokens or 0) + ((completion_tokens or 0) if kind in GENERATION_KINDS else 0))
        label, version = self._served(model, path_version, status)
        ok = status < 400
        event = UsageEvent(
            at=datetime.now(UTC),
            key_id=key_id,
            model=label,
            version=version,
            status=status,
            prompt_tokens=prompt_tokens or 0,
            completion_tokens=(completion_tokens or 0) if kind in GENERATION_KINDS else 0,
            embedding_inputs=embedding_inputs(body) if ok and kind == "embeddings" else 0,
            rerank_documents=rerank_documents(body) if ok and kind == "rerank" else 0,
        )
        self.recorder.add(event)
        if self.key_metrics is not None:
            self.key_metrics.count(event)

    def _charge_tokens(self, scope: Scope, tokens: int) -> None:
        """A finished request of a key with token limits, or in a group with some: its tokens
        count toward them."""
        state = scope.get("state")
        subjects = state.get(RATE_CHARGED_STATE) if isinstance(state, dict) else None
        if subjects and self.rate_limiter is not None:
            self.rate_limiter.charge(subjects, tokens)

    def _served(self, model: str, path_version: str | None, status: int) -> tuple[str, str]:
        """The model's label and the version that served (an explicit V2 version, else the
        loaded one); '' for a failed request, whose version is not known."""
        try:
            serving = self.models.status(model)
        except ModelNotFound:
            return UNKNOWN_MODEL, ""
        if status >= 400:
            return model[:MODEL_MAX_CHARS], ""
        version = path_version or serving.loaded_version or serving.version
        return model[:MODEL_MAX_CHARS], str(version)[:VERSION_MAX_CHARS] if version is not None else ""
