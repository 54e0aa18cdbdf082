"""A ModelService built the way the app factory builds it, for tests that drive the serving
layer directly (no HTTP). Its own Prometheus registry, so several can live in one process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from appliance.app import batch_policy, provider_config
from appliance.config import load_settings
from appliance.generation.metrics import GenerationMetrics
from appliance.repository.store import ModelRepository
from appliance.serving.loaders import ModelLoader
from appliance.serving.metrics import ServingMetrics
from appliance.serving.service import ModelService


def model_service(state_dir: Path, **overrides: Any) -> ModelService:
    settings = load_settings(state_dir=state_dir, **overrides)
    repository = ModelRepository(settings.models_dir)
    metrics = CollectorRegistry()
    loader = ModelLoader(repository, settings, provider_config(settings), batch_policy(settings), GenerationMetrics(metrics))
    return ModelService(repository, settings, loader, metrics=ServingMetrics(metrics))
