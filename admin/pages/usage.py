"""Usage page: requests, tokens, inputs, documents, errors and cost per API key, group and model
over the last day, week or month, a chart of the same, and the period's CSV.

Read-only. Before reading, this server's pending counts are written (they are otherwise up to
a few seconds behind); other servers on the same database are at most their flush interval
behind. Costs come from `appliance bench`'s measured throughputs and the cost model
(`appliance.store.usage_pricing`); usage of a model without a measured figure is shown
without cost, with the reason. Never shows or reads request text: there is none to show.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import cast
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from starlette.responses import Response

from appliance.admin.auth import AdminCtxDep, AdminDep, client_address
from appliance.admin.context import AdminContext
from appliance.admin.usage_chart import usage_chart_png
from appliance.admin.views import render
from appliance.errors import InvalidInput
from appliance.repository.store import ModelRepository
from appliance.store.usage_pricing import PriceList
from appliance.store.usage_queries import DIMENSIONS, Dimension, SeriesPoint, UsageFilter, usage_series
from appliance.store.usage_report import NO_GROUP_LABEL, NO_KEY_LABEL, UsageReport, build_report, format_cost
from appliance.store.usage_rollup import bucket_start
from appliance.store.usage_tables import DAY_S, HOUR_S

router = APIRouter()


@dataclass(frozen=True)
class Period:
    """A choice on the page: how far back it looks and the chart's bar length."""

    span: timedelta
    bucket_s: int


PERIODS: dict[str, Period] = {
    "day": Period(timedelta(days=1), HOUR_S),
    "week": Period(timedelta(days=7), 6 * HOUR_S),
    "month": Period(timedelta(days=30), DAY_S),
}
DEFAULT_PERIOD = "week"
DEFAULT_DIMENSION: Dimension = "key"


@dataclass(frozen=True)
class UsageQuery:
    """The page's query string, checked: period, chart dimension, key and group filters."""

    period: str
    by: Dimension
    key_id: str | None
    group: str | None

    def where(self, now: datetime) -> UsageFilter:
        period = PERIODS[self.period]
        return UsageFilter(bucket_start(now - period.span, period.bucket_s), now, key_id=self.key_id, group=self.group)

    def query_string(self) -> str:
        values = {"period": self.period, "by": self.by, "key": self.key_id or "", "group": self.group or ""}
        return urlencode({name: value for name, value in values.items() if value})


def _query(request: Request) -> UsageQuery:
    params = request.query_params
    period = params.get("period", DEFAULT_PERIOD) or DEFAULT_PERIOD
    if period not in PERIODS:
        raise InvalidInput(f"period: must be one of {', '.join(PERIODS)}, got {period!r}", field="period")
    by = params.get("by", DEFAULT_DIMENSION) or DEFAULT_DIMENSION
    if by not in DIMENSIONS:
        raise InvalidInput(f"by: must be one of {', '.join(DIMENSIONS)}, got {by!r}", field="by")
    return UsageQuery(period, cast(Dimension, by), params.get("key") or None, params.get("group") or None)


def _report(ctx: AdminContext, query: UsageQuery, now: datetime) -> UsageReport:
    ctx.usage.flush()
    prices = PriceList.from_bench_dir(ctx.bench_dir, ctx.privacy.cost)
    repository = ModelRepository(ctx.settings.models_dir)
    variants = {(version.name, str(version.version)): version.variant for version in repository.all_versions()}
    return build_report(ctx.database, query.where(now), prices, variants)


def _page(request: Request, ctx: AdminContext, query: UsageQuery) -> Response:
    report = _report(ctx, query, datetime.now(UTC))
    keys = ctx.keys.list()
    values = {
        "query": query,
        "periods": list(PERIODS),
        "dimensions": DIMENSIONS,
        "keys": keys,
        "groups": sorted({info.group for info in keys if info.group}),
        "report": report,
        "by_key": report.summary("key"),
        "by_group": report.summary("group"),
        "by_model": report.summary("model"),
        "total": report.total(),
        "query_string": query.query_string(),
        "format_cost": format_cost,
    }
    return render(request, "usage.html", values, page="usage")


@router.get("/admin/usage", include_in_schema=False)
def usage_page(request: Request, ctx: AdminCtxDep, _admin: AdminDep) -> Response:
    try:
        query = _query(request)
    except InvalidInput as exc:
        return render(request, "error.html", {"status": 400, "message": exc.message}, status_code=400)
    return _page(request, ctx, query)


@router.get("/admin/usage/chart.png", include_in_schema=False)
def usage_chart(request: Request, ctx: AdminCtxDep, _admin: AdminDep) -> Response:
    try:
        query = _query(request)
    except InvalidInput as exc:
        return Response(exc.message + "\n", status_code=400, media_type="text/plain")
    now = datetime.now(UTC)
    ctx.usage.flush()
    where = query.where(now)
    names = {info.prefix: info.name for info in ctx.keys.list()}
    points = [_labelled(point, query.by, names) for point in usage_series(ctx.database, where, query.by)]
    png = usage_chart_png(points, where.since, where.until, PERIODS[query.period].bucket_s, query.by)
    return Response(png, media_type="image/png")


def _labelled(point: SeriesPoint, by: Dimension, key_names: dict[str, str]) -> SeriesPoint:
    """The point under the name the tables use: the key's name, '(no key)', '(no group)'."""
    if by == "key":
        return replace(point, name=key_names.get(point.name, point.name) if point.name else NO_KEY_LABEL)
    if by == "group":
        return replace(point, name=point.name or NO_GROUP_LABEL)
    return point


@router.get("/admin/usage.csv", include_in_schema=False)
def usage_csv(request: Request, ctx: AdminCtxDep, admin: AdminDep) -> Response:
    try:
        query = _query(request)
    except InvalidInput as exc:
        return Response(exc.message + "\n", status_code=400, media_type="text/plain")
    report = _report(ctx, query, datetime.now(UTC))
    ctx.audit.record("usage.export", actor=admin.user_name, address=client_address(request), target="usage_counts", detail=f"CSV export, {query.period}")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return Response(
        report.to_csv(), media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="appliance-usage-{query.period}-{stamp}.csv"'},
    )
