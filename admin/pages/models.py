"""Models page: every version in the repository with its task, quantisation, size, provider and
export report; deploy, undeploy, set default, delete; the override that makes a rejected
variant deployable; start an export and follow it.

Deploying records the decision (it survives restarts) and loads the serving version now;
undeploying unloads it and keeps it unloaded at the next start. Every action is an audit event.
Never imports the export stage: exports run as a separate process (exports.py).
"""

from __future__ import annotations

from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, RedirectResponse
from starlette.responses import Response

from appliance.admin.auth import AdminActionDep, AdminCtxDep, AdminDep, AdminHTTPError, client_address, form_of
from appliance.admin.context import AdminContext
from appliance.admin.dashboard import engine_provider
from appliance.admin.exports import QUANT_CHOICES, TASK_CHOICES
from appliance.admin.serving import is_generation, load_model, unload_model
from appliance.admin.views import render
from appliance.errors import ApplianceError, InvalidInput, NotFound
from appliance.repository.store import ModelVersion

router = APIRouter()
FormDep = Annotated[dict[str, str], Depends(form_of)]


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
    }


def model_rows(ctx: AdminContext) -> list[dict[str, Any]]:
    repository = ctx.registry.repository
    held = ctx.deployments.held_back()
    rows = []
    for name in repository.names():
        serving = repository.serving_version(name)
        if is_generation(ctx, name) and ctx.generation is not None:
            status, reason = ctx.generation.status(name)
            provider, note = engine_provider(ctx.generation, name) if status == "ready" else (None, None)
            reason = reason or note
            loaded_version = serving.version if status == "ready" and serving is not None else None
        else:
            state = ctx.registry.state(name)
            loaded = state.loaded if state is not None and state.status == "ready" else None
            status = state.status if state is not None else "not loaded"
            reason = state.reason if state is not None else None
            provider = loaded.provider.active if loaded is not None else None
            loaded_version = state.version if loaded is not None and state is not None else None
        rows.append(
            {
                "name": name,
                "deployed": name not in held,
                "status": status,
                "reason": reason,
                "versions": [
                    _version_row(v, serving.version if serving else None, loaded_version, provider)
                    for v in reversed(repository.versions(name))
                ],
                "broken": repository.broken_versions(name),
            }
        )
    return rows


def _page(request: Request, ctx: AdminContext, *, error: str | None = None, status_code: int = 200, job: int | None = None) -> Response:
    values = {
        "models": model_rows(ctx),
        "jobs": ctx.export_jobs.recent(),
        "quant_choices": QUANT_CHOICES,
        "task_choices": [t for t in TASK_CHOICES if t],
        "export_busy": ctx.exports.busy,
        "follow_job": job,
    }
    return render(request, "models.html", values, page="models", error=error, status_code=status_code)


async def _error_page(request: Request, ctx: AdminContext, exc: ApplianceError) -> Response:
    status = exc.status_code if 400 <= exc.status_code < 600 else 400
    return await anyio.to_thread.run_sync(lambda: _page(request, ctx, error=exc.message, status_code=status))


def _done(code: str) -> RedirectResponse:
    return RedirectResponse(f"/admin/models?done={code}", status_code=303)


def _known(ctx: AdminContext, name: str) -> None:
    if name not in ctx.registry.repository.names():
        raise NotFound(f"model: no model named {name!r}", field="model")


@router.get("/admin/models", include_in_schema=False)
def models_page(request: Request, ctx: AdminCtxDep, _admin: AdminDep) -> Response:
    job = request.query_params.get("job", "")
    return _page(request, ctx, job=int(job) if job.isdigit() else None)


@router.post("/admin/models/{name}/deploy", include_in_schema=False)
async def deploy(name: str, request: Request, ctx: AdminCtxDep, admin: AdminActionDep) -> Response:
    address = client_address(request)
    try:
        await anyio.to_thread.run_sync(_known, ctx, name)
        await anyio.to_thread.run_sync(lambda: ctx.deployments.set(name, True, actor=admin.user_name, address=address))
        status, reason = await load_model(ctx, name)
    except ApplianceError as exc:
        return await _error_page(request, ctx, exc)
    if status == "failed":
        return await _error_page(request, ctx, InvalidInput(f"model: {name} failed to load: {reason}", field="model"))
    return _done("deployed")


@router.post("/admin/models/{name}/undeploy", include_in_schema=False)
async def undeploy(name: str, request: Request, ctx: AdminCtxDep, admin: AdminActionDep) -> Response:
    address = client_address(request)
    try:
        await anyio.to_thread.run_sync(_known, ctx, name)
        await anyio.to_thread.run_sync(lambda: ctx.deployments.set(name, False, actor=admin.user_name, address=address))
        await unload_model(ctx, name)
    except ApplianceError as exc:
        return await _error_page(request, ctx, exc)
    return _done("undeployed")


@router.post("/admin/models/{name}/versions/{version}/default", include_in_schema=False)
async def set_default(name: str, version: int, request: Request, ctx: AdminCtxDep, admin: AdminActionDep) -> Response:
    address = client_address(request)
    try:
        chosen = await anyio.to_thread.run_sync(ctx.registry.repository.get, name, version)
        if not chosen.manifest.deployable:
            raise InvalidInput(f"version: {name} version {version} was rejected; override it first", field="version")
        await anyio.to_thread.run_sync(ctx.registry.repository.set_default, name, version)
        await anyio.to_thread.run_sync(
            lambda: ctx.audit.record("model.default", actor=admin.user_name, address=address, target=f"{name}/{version}")
        )
        if name not in await anyio.to_thread.run_sync(ctx.deployments.held_back):
            await load_model(ctx, name)
    except ApplianceError as exc:
        return await _error_page(request, ctx, exc)
    return _done("default-set")


@router.post("/admin/models/{name}/versions/{version}/override", include_in_schema=False)
async def override(name: str, version: int, request: Request, ctx: AdminCtxDep, admin: AdminActionDep, form: FormDep) -> Response:
    address = client_address(request)
    try:
        if form.get("confirm") != "yes":
            raise InvalidInput("confirm: tick the box to accept serving a variant that failed its quality check", field="confirm")
        chosen = await anyio.to_thread.run_sync(ctx.registry.repository.get, name, version)
        verdict = chosen.report.verdict if chosen.report is not None else "no report"
        await anyio.to_thread.run_sync(ctx.registry.repository.set_deployable, name, version, True)
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
    try:
        await anyio.to_thread.run_sync(ctx.registry.repository.get, name, version)
        serving = await anyio.to_thread.run_sync(ctx.registry.repository.serving_version, name)
        was_serving = serving is not None and serving.version == version
        generation = await anyio.to_thread.run_sync(is_generation, ctx, name)
        await anyio.to_thread.run_sync(ctx.registry.repository.delete, name, version)
        await anyio.to_thread.run_sync(
            lambda: ctx.audit.record("model.delete", actor=admin.user_name, address=address, target=f"{name}/{version}")
        )
        remaining = await anyio.to_thread.run_sync(ctx.registry.repository.names)
        if name not in remaining:
            if generation and ctx.generation is not None:
                await ctx.generation.unload(name)
            await ctx.registry.unload(name)
            await anyio.to_thread.run_sync(ctx.deployments.forget, name)
        elif was_serving and name not in await anyio.to_thread.run_sync(ctx.deployments.held_back):
            status, _reason = await load_model(ctx, name)
            if status == "failed":
                await unload_model(ctx, name)  # nothing deployable is left: stop serving the deleted one
    except ApplianceError as exc:
        return await _error_page(request, ctx, exc)
    return _done("deleted")


# -- exports -------------------------------------------------------------------------------------
@router.post("/admin/exports", include_in_schema=False)
async def start_export(request: Request, ctx: AdminCtxDep, admin: AdminActionDep, form: FormDep) -> Response:
    try:
        job = await ctx.exports.start(
            source=form.get("source", ""), name=form.get("name", ""), quant=form.get("quant", "auto"),
            task=form.get("task", ""), actor=admin.user_name, address=client_address(request),
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
