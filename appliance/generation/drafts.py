"""Which version of a model drafts for it when `generation.speculative = "draft"`.

A model served in a non-int4 variant is drafted for by another version of the same model
quantised to int4: the int4-exact one (the source's own 4-bit weights) if there is one, else
the newest mixed int4. Measured as an fp32 draft, int4-exact paid 1.15-1.32x against
1.02-1.36x (docs/BENCHMARKS.md). Never imports onnxruntime.
"""

from __future__ import annotations

from appliance.repository.store import ModelRepository, ModelVersion

DRAFT_QUANTIZATION = "int4"


def draft_version_for(repository: ModelRepository, serving: ModelVersion, speculative: str) -> ModelVersion | None:
    """The draft for `serving`, or None (speculation by draft is off, the model is already
    4-bit, or it has no 4-bit version)."""
    if speculative != "draft" or serving.manifest.quantization == DRAFT_QUANTIZATION:
        return None
    candidates = [
        version
        for version in repository.versions(serving.name)
        if version.manifest.quantization == DRAFT_QUANTIZATION
        and version.manifest.generation is not None
        and version.version != serving.version
    ]
    return max(candidates, key=lambda version: (version.variant == "int4-exact", version.version)) if candidates else None
