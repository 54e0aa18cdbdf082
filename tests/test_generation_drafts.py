"""Which version drafts for a served model when `generation.speculative = "draft"`."""

from __future__ import annotations

import shutil
from pathlib import Path

from appliance.generation.drafts import draft_version_for
from appliance.repository import ModelRepository, ModelVersion
from tests.helpers.generation import TinyDecoders, tiny_decoders  # noqa: F401 - fixture


def republish(repository: ModelRepository, version: ModelVersion, variant: str) -> ModelVersion:
    """A copy of `version` published anew, its report naming `variant`."""
    staged = repository.staging_dir()
    for path in version.path.iterdir():
        if path.name not in ("manifest.json", "report.json"):
            shutil.copy2(path, staged / path.name)
    assert version.report is not None
    manifest = version.manifest.model_copy(update={"default": False})
    return repository.publish(staged, manifest, version.report.model_copy(update={"variant": variant}))


def test_the_exact_4_bit_version_drafts_before_a_newer_mixed_one(tiny_decoders: TinyDecoders, tmp_path: Path) -> None:
    shutil.copytree(tiny_decoders.state_dir / "models", tmp_path / "models", ignore=shutil.ignore_patterns(".staging", ".lock"))
    repository = ModelRepository(tmp_path / "models")
    fp32 = repository.get("tiny-llama", tiny_decoders.llama_fp32.version)
    int4 = repository.get("tiny-llama", tiny_decoders.llama_int4.version)
    exact = republish(repository, int4, "int4-exact")
    newest_mixed = republish(repository, int4, "int4")
    assert newest_mixed.version > exact.version > int4.version
    draft = draft_version_for(repository, fp32, "draft")
    assert draft is not None and draft.version == exact.version
    assert draft_version_for(repository, newest_mixed, "draft") is None, "a 4-bit model gets no 4-bit draft"
    assert draft_version_for(repository, fp32, "prompt-lookup") is None, "no draft unless speculation asks for one"
