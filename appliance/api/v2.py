"""Open Inference Protocol (KServe V2) routes, including the binary tensor data extension
(`Inference-Header-Content-Length`, `binary_data`, `binary_data_size`, `binary_data_output`)
that tritonclient uses, and the repository extension (admin scope).

Every input is checked against the manifest (name, datatype, shape) with an error that names
it. Never imports onnxruntime or the engines: models are reached through the ModelService.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from appliance import __version__
from appliance.api.context import ServerContext
from appliance.api.deps import AdminKeyDep, CtxDep, InferKeyDep, ModelsDep, key_priority
from appliance.api.inference import RequestTimer, until_disconnect
from appliance.api.v2_schemas import (
    ErrorResponse,
    InferenceRequest,
    InferenceResponse,
    LiveResponse,
    MetadataTensor,
    ModelMetadataResponse,
    ProviderInfo,
    ReadyResponse,
    RepositoryActionResponse,
    RepositoryIndexEntry,
    RepositoryIndexRequest,
    ServerMetadataResponse,
)
from appliance.errors import InvalidInput, ModelNotFound
from appliance.repository import parse_version
from appliance.repository.tensors import check_inputs, from_binary, from_json_data, to_binary, to_json_data
from appliance.serving.service import ModelService
from appliance.serving.states import ModelStatus, ServingState
from appliance.serving.tasks import Route
from appliance.serving.protocols import TensorClient, TensorModelInfo

HEADER_LENGTH = "Inference-Header-Content-Length"
EXTENSIONS = ["binary_tensor_data", "model_repository"]
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "Invalid request (the message names the field)",
        401: "Missing or invalid API key",
        403: "Key lacks the scope",
        404: "Unknown model or version",
        413: "Body over the size limit",
        429: "Queue full; see Retry-After",
        503: "Model not ready or server draining",
        504: "Deadline exceeded",
    }.items()
}
INFER_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/InferenceRequest"}},
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": f"Binary tensor data extension: JSON header ({HEADER_LENGTH} bytes) then raw tensors.",
            },
        },
    }
}

router = APIRouter(tags=["kserve-v2"])


def openapi_models() -> dict[str, Any]:
    """Schemas the infer route documents but FastAPI cannot discover (the body is parsed by hand)."""
    schema = InferenceRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    defs = schema.pop("$defs", {})
    return {"InferenceRequest": schema, **defs}


# -- health and server metadata ---------------------------------------------------------------
@router.get("/v2/health/live", response_model=LiveResponse, summary="The process answers")
async def live() -> LiveResponse:
    return LiveResponse(live=True)


@router.get("/v2/health/ready", response_model=ReadyResponse, responses={503: {"model": ReadyResponse}}, summary="Ready for traffic")
async def ready(ctx: CtxDep) -> JSONResponse:
    ok, reason = ctx.ready()
    body = ReadyResponse(ready=ok, reason=None if ok else reason)
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)


@router.get("/v2", response_model=ServerMetadataResponse, summary="Server metadata")
async def server_metadata(_key: InferKeyDep) -> ServerMetadataResponse:
    return ServerMetadataResponse(name="inference-appliance", version=__version__, extensions=EXTENSIONS)


# -- model metadata and readiness -------------------------------------------------------------
def _version_number(version: str | None) -> int | None:
    if version is None:
        return None
    number = parse_version(version)
    if number is None:
        raise ModelNotFound(f"version {version!r} not found", field="version")
    return number


def _wire_state(state: ServingState) -> str:
    """The repository extension's vocabulary (Triton's): an evicted model is UNAVAILABLE,
    its reason says it loads on the next request."""
    return "UNAVAILABLE" if state is ServingState.EVICTED else state.value


async def _metadata(models: ModelService, name: str, version: str | None) -> ModelMetadataResponse:
    number = _version_number(version)
    described, versions, status = await models.describe(name, number)
    manifest = described.manifest
    state, reason = _wire_state(status.state), status.reason
    if number is not None and number != status.loaded_version:
        state, reason = "UNAVAILABLE", f"serving version {status.version}"
    report = models.provider_report(name) if number is None or number == status.loaded_version else None
    return ModelMetadataResponse(
        name=name,
        versions=[str(v) for v in versions],
        inputs=[MetadataTensor(**spec.model_dump()) for spec in manifest.inputs],
        outputs=[MetadataTensor(**spec.model_dump()) for spec in manifest.outputs],
        task=manifest.task,
        max_batch_size=manifest.max_batch_size,
        state=state,
        reason=reason,
        provider=ProviderInfo(**report) if report is not None else None,
    )


@router.get("/v2/models/{name}", response_model=ModelMetadataResponse, responses=ERRORS, summary="Model metadata")
async def model_metadata(name: str, models: ModelsDep, _key: InferKeyDep) -> ModelMetadataResponse:
    return await _metadata(models, name, None)


@router.get("/v2/models/{name}/versions/{version}", response_model=ModelMetadataResponse, responses=ERRORS, summary="Model version metadata")
async def model_version_metadata(name: str, version: str, models: ModelsDep, _key: InferKeyDep) -> ModelMetadataResponse:
    return await _metadata(models, name, version)


async def _ready_response(ctx: ServerContext, name: str, version: str | None) -> JSONResponse:
    """200 while the model (of any task) is loaded and serving; 503 with the reason otherwise."""
    number = _version_number(version)
    _described, _versions, status = await ctx.models.describe(name, number)
    if ctx.draining:
        reason: str | None = "draining"
    elif status.state is not ServingState.READY:
        reason = f"{status.state.value.lower()}: {status.reason}" if status.reason else status.state.value.lower()
    elif number is not None and number != status.loaded_version:
        reason = f"version {number} is not served (serving version {status.loaded_version})"
    else:
        reason = ctx.cluster.model_problem(status.name) if ctx.cluster is not None else None
    body = ReadyResponse(ready=reason is None, reason=reason)
    return JSONResponse(body.model_dump(), status_code=200 if reason is None else 503)


@router.get("/v2/models/{name}/ready", response_model=ReadyResponse, responses=ERRORS, summary="Model ready")
async def model_ready(name: str, ctx: CtxDep, _key: InferKeyDep) -> JSONResponse:
    return await _ready_response(ctx, name, None)


@router.get("/v2/models/{name}/versions/{version}/ready", response_model=ReadyResponse, responses=ERRORS, summary="Model version ready")
async def model_version_ready(name: str, version: str, ctx: CtxDep, _key: InferKeyDep) -> JSONResponse:
    return await _ready_response(ctx, name, version)


# -- inference --------------------------------------------------------------------------------
def _validation_message(exc: ValidationError) -> InvalidInput:
    first = exc.errors()[0]
    loc = ".".join(str(part) for part in first.get("loc", ()))
    if first.get("type") == "json_invalid":
        return InvalidInput(f"malformed JSON: {first.get('ctx', {}).get('error', first.get('msg'))}", field="body")
    return InvalidInput(f"{loc or 'body'}: {first.get('msg')}", field=loc or "body")


def parse_infer_body(body: bytes, header_length: str | None) -> tuple[InferenceRequest, bytes]:
    """Split the body into the JSON header and the binary tail (empty without the extension)."""
    if header_length is None:
        json_part, tail = body, b""
    else:
        try:
            size = int(header_length)
        except ValueError:
            raise InvalidInput(f"{HEADER_LENGTH}: not an integer", field=HEADER_LENGTH) from None
        if not 0 < size <= len(body):
            raise InvalidInput(f"{HEADER_LENGTH}: {size} does not fit a body of {len(body)} bytes", field=HEADER_LENGTH)
        json_part, tail = body[:size], body[size:]
    if not json_part.strip():
        raise InvalidInput("empty request body: an inference request needs 'inputs'", field="body")
    try:
        return InferenceRequest.model_validate_json(json_part), tail
    except ValidationError as exc:
        raise _validation_message(exc) from None


def decode_inputs(model: TensorModelInfo, request: InferenceRequest, tail: bytes) -> dict[str, np.ndarray]:
    specs = {spec.name: spec for spec in model.inputs}
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    view = memoryview(tail)
    for item in request.inputs:
        spec = specs.get(item.name)
        if spec is None:
            names = ", ".join(specs)
            raise InvalidInput(f"input '{item.name}' is not an input of model {model.name!r} (inputs: {names})", field=item.name)
        if item.name in arrays:
            raise InvalidInput(f"input '{item.name}' is given twice", field=item.name)
        if item.datatype != spec.datatype:
            raise InvalidInput(f"input '{item.name}': datatype {item.datatype} does not match the model's {spec.datatype}", field=item.name)
        binary_size = (item.parameters or {}).get("binary_data_size")
        if binary_size is not None:
            if item.data is not None:
                raise InvalidInput(f"input '{item.name}': give either data or binary_data_size, not both", field=item.name)
            if isinstance(binary_size, bool) or not isinstance(binary_size, int) or binary_size < 0:
                raise InvalidInput(f"input '{item.name}': binary_data_size must be a non-negative integer", field=item.name)
            if offset + binary_size > len(tail):
                raise InvalidInput(f"input '{item.name}': binary data runs past the end of the body", field=item.name)
            arrays[item.name] = from_binary(item.name, item.datatype, list(item.shape), view[offset : offset + binary_size])
            offset += binary_size
        else:
            if item.data is None:
                raise InvalidInput(f"input '{item.name}': data is missing", field=item.name)
            arrays[item.name] = from_json_data(item.name, item.datatype, list(item.shape), item.data)
    if offset != len(tail):
        raise InvalidInput(f"{len(tail) - offset} bytes of binary data are not claimed by any input", field="body")
    check_inputs(model.inputs, arrays)
    for name, array in arrays.items():
        if array.size == 0:
            raise InvalidInput(f"input '{name}' is empty (shape {list(array.shape)})", field=name)
    return arrays


def _wanted_outputs(model: TensorModelInfo, request: InferenceRequest) -> tuple[list[str], dict[str, bool]]:
    """Requested output names and whether each goes back as binary."""
    default_binary = bool((request.parameters or {}).get("binary_data_output", False))
    if not request.outputs:
        names = [spec.name for spec in model.outputs]
        return names, {name: default_binary for name in names}
    known = {spec.name for spec in model.outputs}
    binary: dict[str, bool] = {}
    for item in request.outputs:
        if item.name not in known:
            raise InvalidInput(f"output '{item.name}' is not an output of model {model.name!r} (outputs: {', '.join(sorted(known))})", field=item.name)
        flag = (item.parameters or {}).get("binary_data", default_binary)
        binary[item.name] = bool(flag)
    return list(binary), binary


def build_response(model: TensorModelInfo, request: InferenceRequest, outputs: dict[str, np.ndarray], order: list[str], binary: dict[str, bool]) -> Response:
    datatypes = {spec.name: spec.datatype for spec in model.outputs}
    described: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name in order:
        array = outputs[name]
        entry: dict[str, Any] = {"name": name, "datatype": datatypes[name], "shape": list(array.shape)}
        if binary.get(name):
            raw = to_binary(array, datatypes[name])
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = to_json_data(array, datatypes[name])
        described.append(entry)
    payload: dict[str, Any] = {"model_name": model.name, "model_version": str(model.version), "outputs": described}
    if request.id is not None:
        payload["id"] = request.id
    if request.parameters:
        payload["parameters"] = {k: v for k, v in request.parameters.items() if k != "binary_data_output"} or None
        if payload["parameters"] is None:
            del payload["parameters"]
    header = json.dumps(payload, separators=(",", ":")).encode("utf-8")
    if not chunks:
        return Response(header, media_type="application/json")
    return Response(
        header + b"".join(chunks),
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(header))},
    )


async def _infer(ctx: ServerContext, name: str, version: str | None, request: Request, priority: int) -> Response:
    async with RequestTimer(ctx, name) as timer:
        if request.headers.get("content-encoding", "identity").lower() not in ("identity", ""):
            raise InvalidInput("Content-Encoding is not supported; send the body uncompressed", field="Content-Encoding")
        async with await ctx.models.lease(name, Route.V2_INFER, version=_version_number(version)) as lease:
            client: TensorClient = lease.client
            info = client.metadata()
            timer.version = info.version
            body = await request.body()
            parsed, tail = parse_infer_body(body, request.headers.get(HEADER_LENGTH))
            inputs = decode_inputs(info, parsed, tail)
            order, binary = _wanted_outputs(info, parsed)
            result = await until_disconnect(request, client.infer(inputs, order, ctx.settings.request_timeout_s, priority=priority))
    timer.success(result.queue_us, result.compute_us)
    return build_response(info, parsed, result.outputs, order, binary)


@router.post(
    "/v2/models/{name}/infer",
    response_model=InferenceResponse,
    responses=ERRORS,
    openapi_extra=INFER_BODY,
    summary="Run inference",
)
async def infer(name: str, request: Request, ctx: CtxDep, key: InferKeyDep) -> Response:
    return await _infer(ctx, name, None, request, key_priority(key))


@router.post(
    "/v2/models/{name}/versions/{version}/infer",
    response_model=InferenceResponse,
    responses=ERRORS,
    openapi_extra=INFER_BODY,
    summary="Run inference on a version",
)
async def infer_version(name: str, version: str, request: Request, ctx: CtxDep, key: InferKeyDep) -> Response:
    return await _infer(ctx, name, version, request, key_priority(key))


# -- repository extension (admin) -------------------------------------------------------------
@router.post("/v2/repository/index", response_model=list[RepositoryIndexEntry], responses=ERRORS, summary="Repository index")
async def repository_index(models: ModelsDep, _admin: AdminKeyDep, body: RepositoryIndexRequest | None = None) -> list[RepositoryIndexEntry]:
    """Every model of every task; READY only while it is loaded and serving."""
    entries: list[RepositoryIndexEntry] = []
    for status in models.statuses():
        shown = status.loaded_version or status.version
        entry = RepositoryIndexEntry(
            name=status.name, version=str(shown) if shown else None, state=_wire_state(status.state), reason=status.reason,
        )
        if body is not None and body.ready is not None and (entry.state == "READY") != body.ready:
            continue
        entries.append(entry)
    return entries


def _action_response(status: ModelStatus) -> RepositoryActionResponse:
    shown = status.loaded_version or status.version
    return RepositoryActionResponse(
        name=status.name, state=_wire_state(status.state), version=str(shown) if shown else None, reason=status.reason
    )


@router.post("/v2/repository/models/{name}/load", response_model=RepositoryActionResponse, responses=ERRORS, summary="Load a model")
async def repository_load(name: str, models: ModelsDep, _admin: AdminKeyDep) -> RepositoryActionResponse:
    return _action_response(await models.load(name))


@router.post("/v2/repository/models/{name}/unload", response_model=RepositoryActionResponse, responses=ERRORS, summary="Unload a model")
async def repository_unload(name: str, models: ModelsDep, _admin: AdminKeyDep) -> RepositoryActionResponse:
    """Stop serving `name` and free its memory (a generation engine stops and returns its KV
    cache); it stays unloaded until loaded again."""
    return _action_response(await models.unload(name))
