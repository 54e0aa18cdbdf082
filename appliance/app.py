"""FastAPI application factory: settings -> store (migrated) -> ModelService -> routes.

The composition root of the server: it wires the layers and owns their lifetimes. The
lifespan starts the ModelService (which loads the deployable models that fit its budget in the
background; readiness says 503 until they settle), the repository watch and the usage writer,
and at shutdown lets in-flight work finish within `drain_grace_s`, then writes the last usage
counts. Refuses to build an app that would listen beyond loopback without authentication.
Never imports the export stage, torch or transformers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from appliance import __version__
from appliance.api import metrics as metrics_routes
from appliance.api import openai as openai_routes
from appliance.api import openai_chat as openai_chat_routes
from appliance.api import rerank as rerank_routes
from appliance.api import v2 as v2_routes
from appliance.api import batches as batch_routes
from appliance.api import files as file_routes
from appliance.api.batch_runner import BatchRunner
from appliance.api.batch_state import BatchApi
from appliance.admin import AdminContext, install_admin
from appliance.api.context import ServerContext
from appliance.api.errors import install_error_handlers
from appliance.api.request_logging import RequestLogMiddleware
from appliance.api.rate_limit_headers import RateLimitHeaders
from appliance.api.usage_counting import UsageCounter
from appliance.api.metrics import ServerMetrics
from appliance.api.middleware import GuardMiddleware, InflightCounter
from appliance.benchmark.results import BENCH_DIR
from appliance.config import Settings
from appliance.errors import ConfigError
from appliance.generation.metrics import GenerationMetrics
from appliance.repository.store import ModelRepository
from appliance.runtime.batcher import BatchPolicy
from appliance.runtime.providers import ProviderConfig
from appliance.serving.service import ModelService
from appliance.serving.loaders import ModelLoader, ModelOpener
from appliance.serving.metrics import ServingMetrics
from appliance.serving.watch import RepositoryWatch
from appliance.store.audit import AuditLog
from appliance.store.batch_files import FileStore
from appliance.store.batch_store import BatchStore
from appliance.store.db import Database
from appliance.store.deployments import DeploymentStore
from appliance.store.keys import KeyStore
from appliance.store.migrate import upgrade
from appliance.store.privacy import PrivacyPolicy
from appliance.store.request_log import RequestLog
from appliance.store.rate_limits import RateLimiter
from appliance.store.usage_recorder import UsageRecorder

log = logging.getLogger("appliance.server")

#: FastAPI's built-in OpenTelemetry off, including its environment auto-configuration
#: (FASTAPI_OTEL_AUTO_CONFIGURE + OTEL_EXPORTER_OTLP_ENDPOINT would export off the box): the
#: appliance sends nothing out, and the spans cost CPU on every request. /metrics is ours.
NO_TELEMETRY: dict[str, Any] = {
    "tracing": False,
    "metrics": False,
    "logs": False,
    "operation_spans": False,
    "auto_configure": False,
}


def check_bind_policy(settings: Settings) -> None:
    """Auth may be off only while the server listens on loopback alone."""
    if not settings.auth and settings.listens_beyond_loopback:
        raise ConfigError(
            f"auth: refusing to listen on {settings.host} without API keys; keep auth on or bind to 127.0.0.1",
            field="auth",
        )


def provider_config(settings: Settings) -> ProviderConfig:
    return ProviderConfig(
        choice=settings.providers,
        cpu_threads=settings.cpu_threads,
        instances=settings.batching.instances,
        cuda_device_id=settings.cuda_device_id,
        cuda_mem_limit_bytes=settings.cuda_mem_limit_bytes,
        trt_workspace_bytes=settings.trt_workspace_bytes,
        trt_cache_dir=settings.trt_cache_dir,
    )


def batch_policy(settings: Settings) -> BatchPolicy:
    batching = settings.batching
    return BatchPolicy(
        max_batch_size=batching.max_batch_size,
        max_queue_delay_us=batching.max_queue_delay_us,
        max_queue_size=batching.max_queue_size,
        instances=batching.instances,
        preferred_batch_sizes=tuple(batching.preferred_batch_sizes),
        enabled=batching.enabled,
    )


#: Builds the ModelService's opener from the repository and the server's metrics (scale-out:
#: appliance.scale opens Ray deployments instead of sessions in this process).
OpenerFactory = Callable[[ModelRepository, ServerMetrics], ModelOpener]


def create_app(settings: Settings, *, opener: OpenerFactory | None = None) -> FastAPI:
    """Build the server app; migrates the database now so a broken one fails the start.
    `opener`: how models are brought into service (default: loaded in this process)."""
    check_bind_policy(settings)
    settings.make_state_dir()
    database = Database(settings.db_url)
    upgrade(database)
    metrics = ServerMetrics()
    inflight = InflightCounter()
    repository = ModelRepository(settings.models_dir)
    deployments = DeploymentStore(database)
    loader = opener(repository, metrics) if opener is not None else ModelLoader(
        repository,
        settings,
        provider_config(settings),
        batch_policy(settings),
        GenerationMetrics(metrics.registry),
        observer_factory=metrics.observer,
    )
    models = ModelService(
        repository, settings, loader, policies=deployments.policies, metrics=ServingMetrics(metrics.registry)
    )
    metrics.attach(models, inflight)
    keys = KeyStore(database)
    rate_limiter = RateLimiter(database)
    ctx = ServerContext(
        settings=settings, database=database, keys=keys, models=models, metrics=metrics, rate_limiter=rate_limiter
    )
    privacy = PrivacyPolicy(settings, database)
    ctx.api_networks, ctx.admin_networks = privacy.api_networks, privacy.admin_networks  # live lists: the UI edits them
    request_log = RequestLog(database)
    usage = UsageRecorder(database)
    if settings.auth and keys.count_active() == 0:
        log.warning("no API keys yet: every /v1 and /v2 request will get 401; create one with `appliance keys create NAME`")
    watch = RepositoryWatch(models, settings.repository_poll_s)

    batch_api: BatchApi | None = None

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await models.start()
        usage.start()
        if batch_api is not None:
            batch_api.runner.start()
        watching = asyncio.get_running_loop().create_task(watch.run(), name="repository-watch") if settings.repository_poll_s else None
        try:
            yield
        finally:
            if watching is not None:
                watching.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watching
            if batch_api is not None:
                await batch_api.runner.stop(grace_s=settings.drain_grace_s)
            ctx.draining = True
            await models.close(grace_s=settings.drain_grace_s)
            await asyncio.to_thread(usage.close)
            await asyncio.to_thread(rate_limiter.flush)
            database.close()

    app = FastAPI(
        title="inference-appliance",
        version=__version__,
        summary="Quantised ONNX models over KServe V2 and an OpenAI-compatible API.",
        lifespan=lifespan,
        telemetry=NO_TELEMETRY,
    )
    app.state.ctx = ctx
    app.state.key_cache = {}
    app.state.inflight = inflight
    install_error_handlers(app)
    app.include_router(v2_routes.router)
    app.include_router(openai_routes.router)
    app.include_router(openai_chat_routes.router)
    app.include_router(rerank_routes.router)
    app.include_router(metrics_routes.router)
    # The stores exist with the Batch API off too: files kept from when it was on stay
    # listed and deletable on the admin's Privacy page.
    files = FileStore(database, settings.batch_files_dir)
    batches = BatchStore(database)
    if settings.batch_api.enabled:
        runner = BatchRunner(
            app, settings=settings.batch_api, files=files, batches=batches, privacy=privacy, work_dir=settings.batch_work_dir
        )
        batch_api = BatchApi(settings.batch_api, files, batches, privacy, runner)
        app.state.batch_api = batch_api
        app.include_router(file_routes.router)
        app.include_router(batch_routes.router)
    admin = AdminContext(
        settings, database, keys, models, privacy, request_log, usage, settings.state_dir / BENCH_DIR,
        tls=settings.tls_cert is not None, files=files, batches=batches,
        cancel_batch=batch_api.runner.cancel if batch_api is not None else None,
    )
    install_admin(app, admin)
    app.add_middleware(
        RequestLogMiddleware, policy=privacy, request_log=request_log, audit=AuditLog(database),
        usage=UsageCounter(usage, models, auth=settings.auth, rate_limiter=rate_limiter, key_metrics=metrics.key_usage),
    )
    app.add_middleware(RateLimitHeaders)
    app.add_middleware(
        GuardMiddleware, max_body_bytes=settings.max_body_bytes, draining=lambda: ctx.draining, counter=inflight,
        upload_limits={file_routes.UPLOAD_PATH: settings.batch_api.max_file_bytes} if settings.batch_api.enabled else None,
    )
    _complete_openapi(app)
    return app


def _complete_openapi(app: FastAPI) -> None:
    """Add the schemas of bodies parsed by hand (V2 infer) to /openapi.json."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            schemas = schema.setdefault("components", {}).setdefault("schemas", {})
            schemas.update(v2_routes.openapi_models())
            # Validation failures answer 400 in the family's error format, never FastAPI's 422.
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    responses = operation.get("responses", {})
                    if responses.pop("422", None) is not None and "400" not in responses:
                        responses["400"] = {"description": "Invalid request (the message names the field)"}
            for unused in ("HTTPValidationError", "ValidationError"):
                schemas.pop(unused, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
