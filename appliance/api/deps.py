"""Typed dependencies: every route's needs are visible in its signature.

`InferKeyDep`, `AdminKeyDep` check `Authorization: Bearer <key>` against the key store
(scopes: `admin` includes the others); `CtxDep` and `ModelsDep` hand over the running server.
Verified keys are cached for KEY_CACHE_TTL_S so a busy client does not cost a database read per
request; a revocation therefore takes effect within that time. The verified key's public prefix
is left in the request's ASGI state (`verified_key_id`), so the usage counting middleware
charges only keys that were checked, never a prefix a client merely sent. A key with rate
limits, or in a group with limits, is counted against both here (store/rate_limits.py): 429
beyond either. Never logs a key.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import replace
from typing import Annotated

import anyio
from fastapi import Depends, Request
from starlette.types import Scope

from appliance.api.context import ServerContext, in_networks
from appliance.api.local_call import batch_key_id
from appliance.errors import CapacityExceeded, Forbidden, NotFound, Unauthorized
from appliance.serving.protocols import PRIORITY_BY_NAME
from appliance.serving.service import ModelService
from appliance.store.keys import KeyInfo
from appliance.store.rate_limits import Quota, RateLimiter

#: Seconds a verified key is trusted without asking the database again.
KEY_CACHE_TTL_S = 2.0
KEY_CACHE_MAX_ENTRIES = 1024
#: Cache entries of batch owners' keys are filed under this prefix plus the key id.
BATCH_CACHE_PREFIX = "batch:"
#: The priority every batch line runs at, whatever its key's own.
BATCH_PRIORITY = "batch"
#: Where a request's verified key id is kept in its ASGI scope's state.
VERIFIED_KEY_STATE = "verified_key_id"
#: Where the rate-limit headers of a limited key's request wait for its response.
RATE_HEADERS_STATE = "rate_limit_headers"
#: The rate-limit subjects (a key, its group) a finished request's tokens are charged to: those
#: with token limits only.
RATE_CHARGED_STATE = "rate_charged_subjects"


async def get_ctx(request: Request) -> ServerContext:
    """Async on purpose: FastAPI runs plain `def` dependencies in a thread pool, a thread hop
    per request for a dictionary lookup."""
    return request.app.state.ctx


CtxDep = Annotated[ServerContext, Depends(get_ctx)]


async def get_models(request: Request) -> ModelService:
    return request.app.state.ctx.models


ModelsDep = Annotated[ModelService, Depends(get_models)]


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("Authorization header must be 'Bearer <api key>'")
    return token.strip()


async def verified_key(request: Request, ctx: ServerContext) -> KeyInfo:
    """The request's key, verified (cached briefly), or Unauthorized."""
    token = bearer_token(request)
    if token is None:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <api key>'")
    cache: dict[str, tuple[KeyInfo, float]] = request.app.state.key_cache
    digest = hashlib.sha256(token.encode("utf-8")).hexdigest()
    now = time.monotonic()
    hit = cache.get(digest)
    if hit is not None and hit[1] > now:
        info = hit[0]
        if info.state() != "active":
            raise Unauthorized("API key expired")
        return info
    info = await anyio.to_thread.run_sync(ctx.keys.verify, token)
    if len(cache) >= KEY_CACHE_MAX_ENTRIES:
        cache.clear()
    cache[digest] = (info, now + KEY_CACHE_TTL_S)
    return info


def _client_host(request: Request) -> str | None:
    return request.client.host if request.client else None


def require_scope(scope: str):  # noqa: ANN201 - returns a FastAPI dependency
    async def check(request: Request, ctx: CtxDep) -> KeyInfo | None:
        owner = batch_key_id(request.scope)
        if owner is not None:
            return await _batch_line_key(request, ctx, owner, scope)
        if not in_networks(_client_host(request), ctx.api_networks):
            raise Forbidden("this network may not use the API")
        if not ctx.settings.auth:
            return None
        info = await verified_key(request, ctx)
        if scope not in info.scopes and "admin" not in info.scopes:
            raise Forbidden(f"API key {info.name!r} lacks the '{scope}' scope")
        setattr(request.state, VERIFIED_KEY_STATE, info.prefix)
        quotas = info.quotas()
        if scope == "infer" and quotas and ctx.rate_limiter is not None:
            await _admit(request, ctx.rate_limiter, quotas)
        return info

    return check


async def _admit(request: Request, limiter: RateLimiter, quotas: tuple[Quota, ...]) -> None:
    """Count the request against its key's and its group's limits; CapacityExceeded (429)
    beyond either. The x-ratelimit-* headers go into the request's state, where
    RateLimitHeaders adds them to the response (a refusal's too); quotas with token limits are
    marked for charging at the end."""
    decision = await anyio.to_thread.run_sync(limiter.admit, quotas)
    setattr(request.state, RATE_HEADERS_STATE, decision.headers)
    _mark_charged(request, quotas)
    if not decision.allowed:
        raise CapacityExceeded(decision.reason, retry_after_s=decision.retry_after_s)


def _mark_charged(request: Request, quotas: tuple[Quota, ...]) -> bool:
    """Mark the quotas with token limits for the request's charge; False when there are none."""
    charged = tuple(quota.subject for quota in quotas if quota.limits.counts_tokens)
    if charged:
        setattr(request.state, RATE_CHARGED_STATE, charged)
    return bool(charged)


async def _batch_line_key(request: Request, ctx: ServerContext, key_id: str, scope: str) -> KeyInfo | None:
    """The key of an in-process batch line: the batch's owner, still active and scoped, at the
    batch priority whatever its own. Per-minute limits do not apply (batch work yields to
    interactive work by priority instead); the daily and monthly token budgets of the key and
    its group do (429: the runner waits)."""
    if not ctx.settings.auth:
        return None
    cache: dict[str, tuple[KeyInfo, float]] = request.app.state.key_cache
    now = time.monotonic()
    hit = cache.get(BATCH_CACHE_PREFIX + key_id)
    if hit is not None and hit[1] > now:
        info = hit[0]
    else:
        try:
            info = await anyio.to_thread.run_sync(ctx.keys.by_id, key_id)
        except NotFound:
            raise Unauthorized("the API key that created this batch no longer exists") from None
        cache[BATCH_CACHE_PREFIX + key_id] = (info, now + KEY_CACHE_TTL_S)
    if info.state() != "active":
        raise Unauthorized(f"the API key that created this batch is {info.state()}")
    if scope not in info.scopes and "admin" not in info.scopes:
        raise Forbidden(f"API key {info.name!r} lacks the '{scope}' scope")
    setattr(request.state, VERIFIED_KEY_STATE, info.prefix)
    quotas = info.quotas()
    if ctx.rate_limiter is not None and _mark_charged(request, quotas):
        decision = await anyio.to_thread.run_sync(ctx.rate_limiter.day_budget, quotas)
        if not decision.allowed:
            raise CapacityExceeded(decision.reason, retry_after_s=decision.retry_after_s)
    return replace(info, priority=BATCH_PRIORITY)


def key_priority(key: KeyInfo | None) -> int:
    """The scheduling priority of a request's key (interactive when auth is off)."""
    return PRIORITY_BY_NAME.get(key.priority, 0) if key is not None else 0


def verified_key_id(scope: Scope) -> str | None:
    """The public prefix of the key `require_scope` accepted for this request, if it did."""
    state = scope.get("state")
    return state.get(VERIFIED_KEY_STATE) if isinstance(state, dict) else None


InferKeyDep = Annotated[KeyInfo | None, Depends(require_scope("infer"))]
AdminKeyDep = Annotated[KeyInfo | None, Depends(require_scope("admin"))]


async def metrics_access(request: Request, ctx: CtxDep) -> None:
    """/metrics: open to the admin networks, otherwise a key with the `metrics` scope."""
    if in_networks(_client_host(request), ctx.admin_networks) or not ctx.settings.auth:
        return
    info = await verified_key(request, ctx)
    if "metrics" not in info.scopes and "admin" not in info.scopes:
        raise Forbidden(f"API key {info.name!r} lacks the 'metrics' scope")


MetricsAccessDep = Annotated[None, Depends(metrics_access)]
