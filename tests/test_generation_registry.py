"""Which version drafts for a served model when `generation.speculative = "draft"`."""

from __future__ import annotations

import shutil
from pathlib import Path

from appliance.config import load_settings
from appliance.generation.registry import GenerationRegistry
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
    settings = load_settings(state_dir=tmp_path, generation={"speculative": "draft"})
    repository = ModelRepository(settings.models_dir)
    fp32 = repository.get("tiny-llama", tiny_decoders.llama_fp32.version)
    int4 = repository.get("tiny-llama", tiny_decoders.llama_int4.version)
    exact = republish(repository, int4, "int4-exact")
    newest_mixed = republish(repository, int4, "int4")
    assert newest_mixed.version > exact.version > int4.version
    registry = GenerationRegistry(repository, settings)
    draft = registry._draft_for("tiny-llama", fp32)
    assert draft is not None and draft.version == exact.version
    assert registry._draft_for("tiny-llama", newest_mixed) is None, "a 4-bit model gets no 4-bit draft"
    off = GenerationRegistry(repository, load_settings(state_dir=tmp_path))
    assert off._draft_for("tiny-llama", fp32) is None, "no draft unless speculation asks for one"
