"""Models page: every model with its serving state, the memory it holds against the budget,
its last use, pin and keep-alive; every version with its task, quantisation, size, provider and
export report (for a generation export, also the KV cache it kept: datatype, perplexity over
each cache, bytes per token). Actions: deploy, undeploy, pin, unpin, keep-alive, set default, delete a version
or the whole model; the override that makes a rejected variant deployable; start an export
and follow it. When the appliance serves through Ray Serve (docs/SCALE.md), each model also
shows its replicas: how many run of how many wanted (and the autoscaling bounds), and where
each runs (node, process, state), as Ray Serve's controller reported them last; and a form
that sets its replicas (fixed or autoscaling) and what each reserves (replicas.py), saved in
the database (it outlives the server) and applied to the running application at once.

Deploying records the decision (it survives restarts) and loads the serving version now (a
model too large for the memory budget is refused here, with the reason); undeploying unloads
it and keeps it unloaded. Deleting a whole model needs its name typed again and is refused
while the model is deployed and loaded (undeploy it first). Every action is an audit event.
Never imports the export stage: exports run as a separate process (exports.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, RedirectResponse
from starlette.responses import Response

from appliance.admin.auth import AdminActionDep, AdminCtxDep, AdminDep, AdminHTTPError, client_address, form_of
from appliance.admin.context import AdminContext
from appliance.admin.dashboard import budget_info
from appliance.admin.exports import AUTO_QUANT, KV_CACHE_CHOICES, QUANT_CHOICES, TASK_CHOICES
from appliance.admin.replicas import AUTOSCALING, FIXED, MIB, current_scale, parse_scale_form
from appliance.admin.views import render
from appliance.errors import ApplianceError, InvalidInput, NotFound
from appliance.repository.manifest import Report
from appliance.repository.store import ModelVersion
from appliance.serving.cluster import ClusterHealth, ClusterScaler
from appliance.serving.states import ModelStatus, ServingState
from appliance.serving.keep_alive import KEEP_FOREVER, parse_keep_alive
from appliance.repository.kv_cache import DEFAULT_KV_CACHE
from appliance.store.scale_models import ScaleModelChanges

router = APIRouter()
FormDep = Annotated[dict[str, str], Depends(form_of)]


@dataclass(frozen=True)
class KvCacheOutcome:
    """What a generation export decided about its KV cache (report.json `details.kv_cache`): the
    datatype it kept and why, and, when int8 was tried, the perplexity over each cache and the
    bytes per token: what an admin weighs (a quarter of the memory against the quality)."""

    #: FP32 or INT8, as the export kept it.
    datatype: str
    #: The export's own reason ("--kv-cache int8 within +1% perplexity over the fp32 cache").
    chosen_by: str
    #: Short lines for the version table: perplexities, bytes per token.
    facts: tuple[str, ...]

    @classmethod
    def from_report(cls, report: Report | None) -> KvCacheOutcome | None:
        """None for exports without a KV cache and for reports written before it was recorded.
        report.json is a file on disk: a figure of the wrong type is left out, not an error."""
        details = (report.model_extra or {}).get("details") if report is not None else None
        recorded = details.get("kv_cache") if isinstance(details, dict) else None
        if not isinstance(recorded, dict) or not isinstance(recorded.get("datatype"), str):
            return None

        def figure(key: str) -> float | None:
            value = recorded.get(key)
            return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

        facts: list[str] = []
        fp32, int8, increase = figure("perplexity_fp32_cache"), figure("perplexity_int8_cache"), figure("perplexity_increase")
        if fp32 is not None and int8 is not None:
            change = f" ({increase:+.2%})" if increase is not None else ""
            facts.append(f"perplexity {fp32:.4g} over the fp32 cache, {int8:.4g} over int8{change}")
        per_token, per_token_fp32 = figure("bytes_per_token"), figure("bytes_per_token_fp32")
        if per_token is not None:
            than_fp32 = f" (fp32 cache: {per_token_fp32:,.0f})" if per_token_fp32 not in (None, per_token) else ""
            facts.append(f"{per_token:,.0f} bytes per token{than_fp32}")
        return cls(datatype=recorded["datatype"], chosen_by=str(recorded.get("chosen_by", "")), facts=tuple(facts))


def _version_row(version: ModelVersion, serving: int | None, loaded_version: int | None, provider: str | None) -> dict[str, Any]:
    report = version.report
    try:
        size = report.size_bytes if report is not None else version.size_bytes
    except OSError:
        size = None
    return {
        "version": version.version,
        "task": version.manifest.task,
        "quantization": version.manifest.quantization,
        "size_bytes": size,
        "created_at": version.manifest.created_at,
        "deployable": version.manifest.deployable,
        "default": version.manifest.default,
        "serving": version.version == serving,
        "loaded": version.version == loaded_version,
        "provider": provider if version.version == loaded_version else None,
        "verdict": report.verdict if report is not None else None,
        "quality": report.quality if report is not None else {},
        "latency": report.latency if report is not None else {},
        "variant": report.variant if report is not None else None,
        "kv_cache": KvCacheOutcome.from_report(report),
    }


def model_rows(ctx: AdminContext, cluster: ClusterHealth | None = None) -> list[dict[str, Any]]:
    """One row per model; with a cluster (scale-out on Ray), each with its deployment's replicas
    and the replicas and resources it is set to."""
    repository = ctx.models.repository
    statuses = {status.name: status for status in ctx.models.statuses()}
    deployments = {deployment.model: deployment for deployment in cluster.deployments()} if cluster is not None else {}
    saved = ScaleModelChanges(ctx.database).all() if cluster is not None else {}
    rows = []
    for name in repository.names():
        status = statuses.get(name)
        serving = repository.serving_version(name)
        loaded_version = status.loaded_version if status is not None else None
        provider = status.provider if status is not None else None
        rows.append(
            {
                "name": name,
                "deployed": status.deployed if status is not None else True,
                "status": status.state.value.lower() if status is not None else "unknown",
                "serving_state": status,
                "reason": status.reason if status is not None else None,
                "versions": [
                    _version_row(v, serving.version if serving else None, loaded_version, provider)
                    for v in reversed(repository.versions(name))
                ],
                "broken": repository.broken_versions(name),
                "loaded": status is not None and status.state in (ServingState.READY, ServingState.LOADING),
                "deployment": deployments.get(name),
                "scale": current_scale(ctx.settings, name, saved) if cluster is not None else None,
            }
        )
    return rows


def keep_alive_text(status: ModelStatus | None) -> str:
    if status is None:
        return "—"
    return "never unloaded" if status.keep_alive_s == KEEP_FOREVER else f"{status.keep_alive_s:g} s"


def _page(request: Request, ctx: AdminContext, *, error: str | None = None, status_code: int = 200, job: int | None = None) -> Response:
    cluster: ClusterHealth | None = getattr(request.app.state, "cluster", None)  # scale-out only (appliance.scale)
    values = {
        "models": model_rows(ctx, cluster),
        "cluster": cluster is not None,
        "budget": budget_info(ctx.models),
        "default_keep_alive_s": ctx.settings.serving.keep_alive_s,
        "keep_alive_text": keep_alive_text,
        "jobs": ctx.export_jobs.recent(),
        "quant_choices": QUANT_CHOICES,
        "kv_cache_choices": KV_CACHE_CHOICES,
        "task_choices": [t for t in TASK_CHOICES if t],
        "export_busy": ctx.exports.busy,
        "follow_job": job,
        "scale_modes": (FIXED, AUTOSCALING),
        "mib": MIB,
    }
    return render(request, "models.html", values, page="models", error=error, status_code=status_code)


async def _error_page(request: Request, ctx: AdminContext, exc: ApplianceError) -> Response:
    status = exc.status_code if 400 <= exc.status_code < 600 else 400
    return await anyio.to_thread.run_sync(lambda: _page(request, ctx, error=exc.message, status_code=status))


def _done(code: str) -> RedirectResponse:
    return RedirectResponse(f"/admin/models?done={code}", status_code=303)


def _known(ctx: AdminContext, name: str) -> None:
    if name not in ctx.models.repository.names():
        raise NotFound(f"model: no model named {name!r}", field="model")


@router.get("/admin/models", include_in_schema=False)
def models_page(request: Request, ctx: AdminCtxDep, _admin: AdminDep) -> Response:
    job = request.query_params.get("job", "")
    return _page(request, ctx, job=int(job) if job.isdigit() else None)


async def _decide(
    request: Request, ctx: AdminContext, name: str, record: Callable[[], None], done: str,
    then: Callable[[], Awaitable[object]] | None = None,
) -> Response:
    """Record an admin's decision about `name` (in the database, with its audit event), have
    the server follow it (`then`), and go back to the page, or show the page with the error."""
    try:
        await anyio.to_thread.run_sync(_known, ctx, name)
        await anyio.to_thread.run_sync(record)
        await ctx.models.reload_policies()
        if then is not None:
            await then()
    except ApplianceError as exc:
        return await _error_page(request, ctx, exc)
    return _done(done)


@router.post("/admin/models/{name}/deploy", include_in_schema=False)
async def deploy(name: str, request: Request, ctx: AdminCtxDep, admin: AdminActionDep) -> Response:
    address = client_address(request)
    return await _decide(
        request, ctx, name, lambda: ctx.deployments.set(name, True, actor=admin.user_name, address=address), "deployed",
        then=lambda: ctx.models.load(name),
    )


@router.post("/admin/models/{name}/undeploy", include_in_schema=False)
async def undeploy(name: str, request: Request, ctx: AdminCtxDep, admin: AdminActionDep) -> Response:
    address = client_address(request)
    return await _decide(
        request, ctx, name, lambda: ctx.deployments.set(name, False, actor=admin.user_name, address=address), "undeployed",
        then=lambda: ctx.models.unload(name, reason="undeployed by an admin"),
    )


@router.post("/admin/models/{name}/pin", include_in_schema=False)
async def pin(name: str, request: Request, ctx: AdminCtxDep, admin: AdminActionDep, form: FormDep) -> Response:
    """Pin (never evicted, never idled out) or unpin, as the form's `pinned` says."""
    pinned = form.get("pinned") == "yes"
    address = client_address(request)
    return await _decide(
        request, ctx, name, lambda: ctx.deployments.set_pinned(name, pinned, actor=admin.user_name, address=address),
        "pinned" if pinned else "unpinned",
    )


@router.post("/admin/models/{name}/keep-alive", include_in_schema=False)
async def keep_alive(name: str, request: Request, ctx: AdminCtxDep, admin: AdminActionDep, form: FormDep) -> Response:
    """The model's own keep-alive: seconds or a duration ("10m"), -1 for never, empty for the
    server's default."""
    raw = form.get("keep_alive", "").strip()
    address = client_address(request)

    def record() -> None:
        seconds = parse_keep_alive(raw) if raw else None
        ctx.deployments.set_keep_alive(name, seconds, actor=admin.user_name, address=address)

    return await _decide(request, ctx, name, record, "keep-alive-set")


@router.post("/admin/models/{name}/replicas", include_in_schema=False)
async def set_replicas(name: str, request: Request, ctx: AdminCtxDep, admin: AdminActionDep, form: FormDep) -> Response:
    """Ray mode: the model's replicas (fixed or autoscaling) and what each replica reserves,
    saved with its audit event, then applied to the running application."""
    scaler: ClusterScaler | None = getattr(request.app.state, "scaler", None)  # scale-out only (appliance.scale)
    address = client_address(request)
    try:
        if scaler is None:
            raise InvalidInput("model: replicas are set only when the appliance serves through Ray Serve (docs/SCALE.md)", field="model")
        await anyio.to_thread.run_sync(_known, ctx, name)
        store = ScaleModelChanges(ctx.database)
        before = current_scale(ctx.settings, name, await anyio.to_thread.run_sync(store.all))
        chosen = parse_scale_form(form, before)
        changes = await anyio.to_thread.run_sync(lambda: store.set(name, chosen, actor=admin.user_name, address=address))
        await scaler.rescale(changes)
    except ApplianceError as exc:
        return await _error_page(request, ctx, exc)
    reserves = ("num_cpus", "num_gpus", "memory_bytes")
    restarting = any(getattr(before, field) != getattr(chosen, field) for field in reserves)
    return _done("replicas-restarting" if restarting else "replicas-set")


@router.post("/admin/models/{name}/delete", include_in_schema=False)
async def delete_model(name: str, request: Request, ctx: AdminCtxDep, admin: AdminActionDep, form: FormDep) -> Response:
    """Delete every version of a model; refused while it is deployed and loaded."""
    address = client_address(request)
    try:
        await anyio.to_thread.run_sync(_known, ctx, name)
        if form.get("confirm_name", "").strip() != name:
            raise InvalidInput(f"confirm_name: type the model's name ({name}) to delete it with all its versions", field="confirm_name")
        status = ctx.models.status(name)
        if status.deployed and status.state in (ServingState.READY, ServingState.LOADING):
            raise InvalidInput(f"model: {name} is serving; undeploy it first, then delete it", field="model")
        await ctx.models.forget(name)
        await anyio.to_thread.run_sync(ctx.models.repository.delete, name)
        await anyio.to_thread.run_sync(
            lambda: ctx.audit.record("model.delete", actor=admin.user_name, address=address, target=name, detail="every version")
        )
        await anyio.to_thread.run_sync(ctx.deployments.forget, name)
    except ApplianceError as exc:
        return await _error_page(request, ctx, exc)
    return _done("model-deleted")


@router.post("/admin/models/{name}/versions/{version}/default", include_in_schema=False)
async def set_default(name: str, version: int, request: Request, ctx: AdminCtxDep, admin: AdminActionDep) -> Response:
    address = client_address(request)
    try:
        chosen = await anyio.to_thread.run_sync(ctx.models.repository.get, name, version)
        if not chosen.manifest.deployable:
            raise InvalidInput(f"version: {name} version {version} was rejected; override it first", field="version")
        await anyio.to_thread.run_sync(ctx.models.repository.set_default, name, version)
        await anyio.to_thread.run_sync(
            lambda: ctx.audit.record("model.default", actor=admin.user_name, address=address, target=f"{name}/{version}")
        )
        await ctx.models.refresh()
    except ApplianceError as exc:
        return await _error_page(request, ctx, exc)
    return _done("default-set")


@router.post("/admin/models/{name}/versions/{version}/override", include_in_schema=False)
async def override(name: str, version: int, request: Request, ctx: AdminCtxDep, admin: AdminActionDep, form: FormDep) -> Response:
    address = client_address(request)
    try:
        if form.get("confirm") != "yes":
            raise InvalidInput("confirm: tick the box to accept serving a variant that failed its quality check", field="confirm")
        chosen = await anyio.to_thread.run_sync(ctx.models.repository.get, name, version)
        verdict = chosen.report.verdict if chosen.report is not None else "no report"
        await anyio.to_thread.run_sync(ctx.models.repository.set_deployable, name, version, True)
        await anyio.to_thread.run_sync(
            lambda: ctx.audit.record(
                "model.override", actor=admin.user_name, address=address, target=f"{name}/{version}",
                detail=f"verdict was {verdict}; made deployable by explicit override",
            )
        )
    except ApplianceError as exc:
        return await _error_page(request, ctx, exc)
    return _done("override")


@router.post("/admin/models/{name}/versions/{version}/delete", include_in_schema=False)
async def delete_version(name: str, version: int, request: Request, ctx: AdminCtxDep, admin: AdminActionDep) -> Response:
    address = client_address(request)
    repository = ctx.models.repository
    try:
        await anyio.to_thread.run_sync(repository.get, name, version)
        await anyio.to_thread.run_sync(repository.delete, name, version)
        await anyio.to_thread.run_sync(
            lambda: ctx.audit.record("model.delete", actor=admin.user_name, address=address, target=f"{name}/{version}")
        )
        if name not in await anyio.to_thread.run_sync(repository.names):
            await ctx.models.forget(name)
            await anyio.to_thread.run_sync(ctx.deployments.forget, name)
        else:
            # A deleted serving version is replaced by the next one the repository names.
            await ctx.models.refresh()
    except ApplianceError as exc:
        return await _error_page(request, ctx, exc)
    return _done("deleted")


# -- exports -------------------------------------------------------------------------------------
@router.post("/admin/exports", include_in_schema=False)
async def start_export(request: Request, ctx: AdminCtxDep, admin: AdminActionDep, form: FormDep) -> Response:
    try:
        job = await ctx.exports.start(
            source=form.get("source", ""), name=form.get("name", ""), quant=form.get("quant", AUTO_QUANT),
            task=form.get("task", ""), kv_cache=form.get("kv_cache", DEFAULT_KV_CACHE),
            actor=admin.user_name, address=client_address(request),
        )
    except ApplianceError as exc:
        return await _error_page(request, ctx, exc)
    return RedirectResponse(f"/admin/models?done=export-started&job={job.id}", status_code=303)


@router.get("/admin/api/exports/{job_id}", include_in_schema=False)
def export_status(job_id: int, ctx: AdminCtxDep, _admin: AdminDep) -> JSONResponse:
    try:
        return JSONResponse(ctx.exports.status(job_id))
    except NotFound as exc:
        raise AdminHTTPError(404, exc.message) from None


@router.post("/admin/exports/{job_id}/cancel", include_in_schema=False)
async def cancel_export(job_id: int, request: Request, ctx: AdminCtxDep, admin: AdminActionDep) -> Response:
    cancelled = await ctx.exports.cancel(job_id)
    await anyio.to_thread.run_sync(
        lambda: ctx.audit.record(
            "export.cancel", actor=admin.user_name, address=client_address(request), target=f"job {job_id}",
            outcome="ok" if cancelled else "failed", detail="" if cancelled else "job was not running",
        )
    )
    return RedirectResponse(f"/admin/models?job={job_id}", status_code=303)
