"""The usage page's chart: tokens and requests over a period, stacked per key, group or model.

Drawn server-side as a PNG with matplotlib's object API on the Agg canvas (no pyplot state,
safe in the server's worker threads), like the benchmark's plots, so the page needs no
script. The PNG's `Description` text chunk holds a JSON account of what it plots (names and
their totals), so a test can check the picture against the report. Never reads text.
"""

from __future__ import annotations

import io
import json
from datetime import datetime, timedelta

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from appliance.store.usage_queries import SeriesPoint
from appliance.store.usage_rollup import bucket_start

#: Names drawn on their own; the rest are added up as "other".
TOP_NAMES = 8
OTHER_LABEL = "other"
FIGURE_SIZE_IN = (9.0, 5.0)
FIGURE_DPI = 100


def _buckets(since: datetime, until: datetime, bucket_s: int) -> list[datetime]:
    starts, current = [], bucket_start(since, bucket_s)
    while current < until:
        starts.append(current)
        current += timedelta(seconds=bucket_s)
    return starts


def usage_chart_png(points: list[SeriesPoint], since: datetime, until: datetime, bucket_s: int, by: str) -> bytes:
    """Stacked bars of tokens (top) and requests (bottom) per `bucket_s` bucket, one colour per
    name of the `by` dimension."""
    starts = _buckets(since, until, bucket_s)
    index = {start: position for position, start in enumerate(starts)}
    totals: dict[str, int] = {}
    for point in points:
        totals[point.name] = totals.get(point.name, 0) + point.tokens + point.requests
    ranked = sorted(totals, key=lambda name: (-totals[name], name))
    shown = ranked[:TOP_NAMES]
    names = shown + ([OTHER_LABEL] if len(ranked) > TOP_NAMES else [])
    tokens = {name: [0] * len(starts) for name in names}
    requests = {name: [0] * len(starts) for name in names}
    for point in points:
        position = index.get(bucket_start(point.bucket_start, bucket_s))
        if position is None:
            continue
        name = point.name if point.name in shown else OTHER_LABEL
        tokens[name][position] += point.tokens
        requests[name][position] += point.requests

    figure = Figure(figsize=FIGURE_SIZE_IN)
    token_axes, request_axes = figure.subplots(2, 1, sharex=True)
    width = timedelta(seconds=bucket_s * 0.9)
    for axes, values, label in ((token_axes, tokens, "tokens (prompt + completion)"), (request_axes, requests, "requests")):
        bottom = [0] * len(starts)
        for name in names:
            axes.bar(starts, values[name], width=width, bottom=bottom, align="edge", label=name)
            bottom = [b + v for b, v in zip(bottom, values[name], strict=True)]
        axes.set_ylabel(label)
        axes.grid(True, axis="y", alpha=0.3)
    token_axes.set_title(f"Usage per {by}, {since:%Y-%m-%d %H:%M} to {until:%Y-%m-%d %H:%M} UTC")
    if names:
        token_axes.legend(fontsize=8, loc="upper left")
    figure.autofmt_xdate()
    description = {
        "plot": "usage",
        "by": by,
        "bucket_s": bucket_s,
        "buckets": len(starts),
        "series": [{"name": name, "tokens": sum(tokens[name]), "requests": sum(requests[name])} for name in names],
    }
    FigureCanvasAgg(figure)
    figure.tight_layout()
    out = io.BytesIO()
    figure.savefig(out, format="png", dpi=FIGURE_DPI, metadata={"Description": json.dumps(description)})
    return out.getvalue()
