"""Dashboard: the box, loaded models, live request figures, cost per 1k tokens; the metrics JSON
its charts poll; the form that sets the cost model (hardware price, power draw). Never reads
request text: the figures are numbers the API layer counted."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, RedirectResponse
from starlette.responses import Response

from appliance.admin.auth import AdminActionDep, AdminCtxDep, AdminDep, client_address, form_of
from appliance.admin.context import AdminContext
from appliance.admin.dashboard import box_info, budget_info, cost_per_1k_tokens, loaded_models
from appliance.admin.views import render
from appliance.errors import InvalidInput

router = APIRouter()
FormDep = Annotated[dict[str, str], Depends(form_of)]
COST_FIELDS = ("hardware_price", "lifetime_years", "power_watts", "electricity_price_kwh", "cloud_price_per_1k_tokens")


def _summary(ctx: AdminContext) -> dict[str, Any]:
    points = list(ctx.sampler.points)
    last = points[-1] if points else None
    tokens_per_s = ctx.sampler.recent_tokens_per_s()
    return {
        "requests_per_s": last.requests_per_s if last else 0.0,
        "p50_ms": last.p50_ms if last else None,
        "p95_ms": last.p95_ms if last else None,
        "tokens_per_s": last.tokens_per_s if last else 0.0,
        "queue_depth": last.queue_depth if last else 0,
        "cost": cost_per_1k_tokens(ctx.privacy.cost, tokens_per_s),
    }


def _page(request: Request, ctx: AdminContext, *, error: str | None = None, status_code: int = 200) -> Response:
    values = {
        "box": box_info(),
        "models": loaded_models(ctx.models),
        "budget": budget_info(ctx.models),
        "summary": _summary(ctx),
        "cost_settings": ctx.privacy.cost,
        "sample_interval_s": ctx.sampler.interval_s,
    }
    return render(request, "dashboard.html", values, page="dashboard", error=error, status_code=status_code)


@router.get("/admin", include_in_schema=False)
def dashboard(request: Request, ctx: AdminCtxDep, _admin: AdminDep) -> Response:
    return _page(request, ctx)


@router.get("/admin/api/metrics", include_in_schema=False)
def metrics_json(ctx: AdminCtxDep, _admin: AdminDep) -> JSONResponse:
    return JSONResponse(
        {
            "interval_s": ctx.sampler.interval_s,
            "points": ctx.sampler.series(),
            "summary": _summary(ctx),
            "models": loaded_models(ctx.models),
            "budget": budget_info(ctx.models),
        }
    )


@router.post("/admin/cost", include_in_schema=False)
def set_cost(request: Request, ctx: AdminCtxDep, admin: AdminActionDep, form: FormDep) -> Response:
    values: dict[str, Any] = {}
    try:
        for field in COST_FIELDS:
            raw = form.get(field, "").strip()
            if raw:
                try:
                    values[field] = float(raw)
                except ValueError:
                    raise InvalidInput(f"{field}: {raw!r} is not a number", field=field) from None
        currency = form.get("currency", "").strip()
        if currency:
            values["currency"] = currency
        ctx.privacy.set_cost(values, actor=admin.user_name, address=client_address(request))
    except InvalidInput as exc:
        return _page(request, ctx, error=exc.message, status_code=400)
    return RedirectResponse("/admin?done=cost-saved", status_code=303)
