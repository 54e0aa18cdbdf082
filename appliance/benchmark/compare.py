"""Variant comparison: which published versions of a model to measure, how much quality each
one lost (from its export report), and which one to recommend for a quality budget.

Quality loss is one number per task, 0 meaning "as good as the unquantised reference":
text generation: perplexity / reference_perplexity - 1 (relative perplexity increase; if the
report lacks perplexities, 1 - greedy_agreement); feature extraction: 1 - cosine_mean;
classification: 1 - label_agreement, or for a cross-encoder (judged on ranking) 1 - spearman_mean.
An fp32 version without quality figures is the reference
itself (loss 0). The recommendation is the cheapest variant (cost per 1k units at its best
sweep point) whose loss is within the budget. Reads the repository; never writes to it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from appliance.benchmark.results import Recommendation, VariantResult
from appliance.errors import InvalidInput, ModelNotFound
from appliance.repository.store import ModelRepository, ModelVersion

#: Default quality budget for `--max-quality-loss` (5 % perplexity increase, cosine 0.95, ...).
DEFAULT_MAX_QUALITY_LOSS = 0.05


def _number(quality: dict[str, Any], key: str) -> float | None:
    value = quality.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _generation_loss(quality: dict[str, Any]) -> tuple[float, str] | None:
    ppl, ref = _number(quality, "perplexity"), _number(quality, "reference_perplexity")
    if ppl is not None and ref:
        return max(0.0, ppl / ref - 1.0), "perplexity / reference_perplexity - 1"
    agreement = _number(quality, "greedy_agreement")
    if agreement is not None:
        return max(0.0, 1.0 - agreement), "1 - greedy_agreement"
    return None


def _one_minus(key: str) -> Callable[[dict[str, Any]], tuple[float, str] | None]:
    def loss(quality: dict[str, Any]) -> tuple[float, str] | None:
        value = _number(quality, key)
        return (max(0.0, 1.0 - value), f"1 - {key}") if value is not None else None

    return loss


def _classification_loss(quality: dict[str, Any]) -> tuple[float, str] | None:
    """Label agreement for a classifier; rank correlation for a cross-encoder."""
    return _one_minus("spearman_mean")(quality) or _one_minus("label_agreement")(quality)


#: Task -> how its report's quality becomes one loss number.
QUALITY_LOSS_BY_TASK: dict[str, Callable[[dict[str, Any]], tuple[float, str] | None]] = {
    "text-generation": _generation_loss,
    "feature-extraction": _one_minus("cosine_mean"),
    "text-classification": _classification_loss,
}


def quality_loss(task: str, quantization: str, quality: dict[str, Any]) -> tuple[float | None, str | None]:
    """(loss, how it was derived); (None, None) when the report does not say."""
    rule = QUALITY_LOSS_BY_TASK.get(task)
    found = rule(quality) if rule is not None else None
    if found is not None:
        return found
    if quantization == "fp32" and not quality:
        return 0.0, "fp32 reference"
    return None, None


def variants_of(repository: ModelRepository, name: str) -> tuple[list[ModelVersion], list[str]]:
    """The deployable versions of `name`, oldest first, and notes on the ones left out."""
    try:
        versions = repository.versions(name)
    except ModelNotFound:
        known = ", ".join(repository.names()) or "none"
        raise ModelNotFound(f"compare: model {name!r} is not in the repository (models: {known})", field="compare") from None
    chosen = [v for v in versions if v.manifest.deployable]
    skipped = [f"version {v.version} ({v.manifest.quantization}) is not deployable" for v in versions if not v.manifest.deployable]
    broken = repository.broken_versions(name)
    skipped += [f"version {number} is unreadable: {why}" for number, why in broken.items()]
    if not chosen:
        raise InvalidInput(f"compare: model {name!r} has no deployable version to measure", field="compare")
    return chosen, skipped


def variant_result(version: ModelVersion) -> VariantResult:
    """A variant's identity and quality, before any measurement."""
    manifest = version.manifest
    quality = dict(version.report.quality) if version.report is not None else {}
    loss, metric = quality_loss(manifest.task, manifest.quantization, quality)
    return VariantResult(
        model=manifest.name,
        version=manifest.version,
        quantization=manifest.quantization,
        size_bytes=version.report.size_bytes if version.report is not None else version.size_bytes,
        quality=quality,
        quality_metric=metric,
        quality_loss=loss,
    )


@dataclass(frozen=True)
class FrontierPoint:
    variant: VariantResult
    cost_per_1k: float
    quality_loss: float


def frontier(variants: list[VariantResult], unit: str) -> list[FrontierPoint]:
    """Variants no other variant beats on both cost and quality loss, cheapest first."""
    candidates = [
        FrontierPoint(v, cost, v.quality_loss)
        for v in variants
        if v.quality_loss is not None and (cost := v.best_cost_per_1k(unit)) is not None
    ]
    candidates.sort(key=lambda p: (p.cost_per_1k, p.quality_loss))
    kept: list[FrontierPoint] = []
    best_loss = float("inf")
    for point in candidates:
        if point.quality_loss < best_loss:
            kept.append(point)
            best_loss = point.quality_loss
    return kept


def recommend(variants: list[VariantResult], unit: str, max_quality_loss: float) -> Recommendation:
    """The cheapest measured variant whose quality loss is within `max_quality_loss`."""
    if max_quality_loss < 0:
        raise InvalidInput(f"max-quality-loss: must be >= 0, got {max_quality_loss:g}", field="max-quality-loss")
    within = [p for p in frontier(variants, unit) if p.quality_loss <= max_quality_loss]
    if not within:
        unknown = [v.label for v in variants if v.quality_loss is None]
        why = f"no measured variant loses at most {max_quality_loss:g} quality"
        if unknown:
            why += f" (no quality figures for: {', '.join(unknown)})"
        return Recommendation(max_quality_loss=max_quality_loss, reason=why)
    best = min(within, key=lambda p: (p.cost_per_1k, p.quality_loss))
    return Recommendation(
        max_quality_loss=max_quality_loss,
        model=best.variant.model,
        version=best.variant.version,
        cost_per_1k=best.cost_per_1k,
        quality_loss=best.quality_loss,
        reason=f"cheapest variant with quality loss {best.quality_loss:.4g} <= {max_quality_loss:g}",
    )
