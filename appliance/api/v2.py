"""Open Inference Protocol (KServe V2) routes, including the binary tensor data extension
(`Inference-Header-Content-Length`, `binary_data`, `binary_data_size`, `binary_data_output`)
that tritonclient uses, and the repository extension (admin scope).

Every input is checked against the manifest (name, datatype, shape) with an error that names
it. Never imports onnxruntime: models are reached through the registry.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from appliance import __version__
from appliance.api.context import ServerContext
from appliance.api.deps import AdminKeyDep, CtxDep, InferKeyDep
from appliance.api.inference import ClientDisconnected, RequestTimer, until_disconnect
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
from appliance.runtime.registry import LoadedModel
from appliance.runtime.tensors import check_inputs, from_binary, from_json_data, to_binary, to_json_data

log = logging.getLogger("appliance.api")

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


def _metadata(ctx: ServerContext, name: str, version: str | None) -> ModelMetadataResponse:
    number = _version_number(version)
    described = ctx.registry.repository.get(name, number)  # raises ModelNotFound
    versions = [str(v.version) for v in ctx.registry.repository.versions(name)]
    state = ctx.registry.state(name)
    manifest = described.manifest
    provider = None
    status, reason = "unloaded", None
    if state is not None:
        status, reason = state.status, state.reason
        if number is not None and number != state.version:
            status, reason = "unloaded", f"serving version {state.version}"
        if state.loaded is not None and (number is None or number == state.version):
            provider = ProviderInfo(**state.loaded.provider.as_json())
    return ModelMetadataResponse(
        name=name,
        versions=versions,
        inputs=[MetadataTensor(**spec.model_dump()) for spec in manifest.inputs],
        outputs=[MetadataTensor(**spec.model_dump()) for spec in manifest.outputs],
        task=manifest.task,
        max_batch_size=manifest.max_batch_size,
        state=status,
        reason=reason,
        provider=provider,
    )


@router.get("/v2/models/{name}", response_model=ModelMetadataResponse, responses=ERRORS, summary="Model metadata")
async def model_metadata(name: str, ctx: CtxDep, _key: InferKeyDep) -> ModelMetadataResponse:
    return _metadata(ctx, name, None)


@router.get("/v2/models/{name}/versions/{version}", response_model=ModelMetadataResponse, responses=ERRORS, summary="Model version metadata")
async def model_version_metadata(name: str, version: str, ctx: CtxDep, _key: InferKeyDep) -> ModelMetadataResponse:
    return _metadata(ctx, name, version)


def _ready_response(ctx: ServerContext, name: str, version: str | None) -> JSONResponse:
    ctx.registry.get(name, _version_number(version))  # raises 404 / 503
    if ctx.draining:
        return JSONResponse(ReadyResponse(ready=False, reason="draining").model_dump(), status_code=503)
    return JSONResponse(ReadyResponse(ready=True).model_dump())


@router.get("/v2/models/{name}/ready", response_model=ReadyResponse, responses=ERRORS, summary="Model ready")
async def model_ready(name: str, ctx: CtxDep, _key: InferKeyDep) -> JSONResponse:
    return _ready_response(ctx, name, None)


@router.get("/v2/models/{name}/versions/{version}/ready", response_model=ReadyResponse, responses=ERRORS, summary="Model version ready")
async def model_version_ready(name: str, version: str, ctx: CtxDep, _key: InferKeyDep) -> JSONResponse:
    return _ready_response(ctx, name, version)


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


def decode_inputs(model: LoadedModel, request: InferenceRequest, tail: bytes) -> dict[str, np.ndarray]:
    manifest = model.manifest
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    view = memoryview(tail)
    for item in request.inputs:
        spec = manifest.input(item.name)
        if spec is None:
            names = ", ".join(s.name for s in manifest.inputs)
            raise InvalidInput(f"input '{item.name}' is not an input of model {manifest.name!r} (inputs: {names})", field=item.name)
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
    check_inputs(manifest.inputs, arrays)
    for name, array in arrays.items():
        if array.size == 0:
            raise InvalidInput(f"input '{name}' is empty (shape {list(array.shape)})", field=name)
    return arrays


def _wanted_outputs(model: LoadedModel, request: InferenceRequest) -> tuple[list[str], dict[str, bool]]:
    """Requested output names and whether each goes back as binary."""
    manifest = model.manifest
    default_binary = bool((request.parameters or {}).get("binary_data_output", False))
    if not request.outputs:
        names = [spec.name for spec in manifest.outputs]
        return names, {name: default_binary for name in names}
    known = {spec.name for spec in manifest.outputs}
    binary: dict[str, bool] = {}
    for item in request.outputs:
        if item.name not in known:
            raise InvalidInput(f"output '{item.name}' is not an output of model {manifest.name!r} (outputs: {', '.join(sorted(known))})", field=item.name)
        flag = (item.parameters or {}).get("binary_data", default_binary)
        binary[item.name] = bool(flag)
    return list(binary), binary


def build_response(model: LoadedModel, request: InferenceRequest, outputs: dict[str, np.ndarray], order: list[str], binary: dict[str, bool]) -> Response:
    datatypes = {spec.name: spec.datatype for spec in model.manifest.outputs}
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
    payload: dict[str, Any] = {"model_name": model.manifest.name, "model_version": str(model.manifest.version), "outputs": described}
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


async def _infer(ctx: ServerContext, name: str, version: str | None, request: Request) -> Response:
    timer = RequestTimer(ctx, name)
    try:
        if request.headers.get("content-encoding", "identity").lower() not in ("identity", ""):
            raise InvalidInput("Content-Encoding is not supported; send the body uncompressed", field="Content-Encoding")
        model = ctx.registry.get(name, _version_number(version))
        timer.version = model.manifest.version
        body = await request.body()
        parsed, tail = parse_infer_body(body, request.headers.get(HEADER_LENGTH))
        inputs = decode_inputs(model, parsed, tail)
        order, binary = _wanted_outputs(model, parsed)
        result = await until_disconnect(request, model.infer(inputs, order, ctx.settings.request_timeout_s))
    except ClientDisconnected as exc:
        timer.failure(exc)
        log.info("POST %s: client disconnected; its work was cancelled", request.url.path)
        return Response(status_code=499)
    except Exception as exc:
        timer.failure(exc)
        raise
    timer.success(result.queue_us, result.compute_us)
    return build_response(model, parsed, result.outputs, order, binary)


@router.post(
    "/v2/models/{name}/infer",
    response_model=InferenceResponse,
    responses=ERRORS,
    openapi_extra=INFER_BODY,
    summary="Run inference",
)
async def infer(name: str, request: Request, ctx: CtxDep, _key: InferKeyDep) -> Response:
    return await _infer(ctx, name, None, request)


@router.post(
    "/v2/models/{name}/versions/{version}/infer",
    response_model=InferenceResponse,
    responses=ERRORS,
    openapi_extra=INFER_BODY,
    summary="Run inference on a version",
)
async def infer_version(name: str, version: str, request: Request, ctx: CtxDep, _key: InferKeyDep) -> Response:
    return await _infer(ctx, name, version, request)


# -- repository extension (admin) -------------------------------------------------------------
@router.post("/v2/repository/index", response_model=list[RepositoryIndexEntry], responses=ERRORS, summary="Repository index")
async def repository_index(ctx: CtxDep, _admin: AdminKeyDep, body: RepositoryIndexRequest | None = None) -> list[RepositoryIndexEntry]:
    entries: list[RepositoryIndexEntry] = []
    for name in ctx.registry.repository.names():
        state = ctx.registry.state(name)
        if state is None:
            serving = ctx.registry.repository.serving_version(name)
            entry = RepositoryIndexEntry(name=name, version=str(serving.version) if serving else None, state="unloaded")
        else:
            entry = RepositoryIndexEntry(name=name, version=str(state.version) if state.version else None, state=state.status, reason=state.reason)
        if body is not None and body.ready is not None and (entry.state == "ready") != body.ready:
            continue
        entries.append(entry)
    return entries


@router.post("/v2/repository/models/{name}/load", response_model=RepositoryActionResponse, responses=ERRORS, summary="Load a model")
async def repository_load(name: str, ctx: CtxDep, _admin: AdminKeyDep) -> RepositoryActionResponse:
    state = await ctx.registry.load(name)
    if state.status == "failed":
        raise InvalidInput(f"model {name!r} failed to load: {state.reason}", field="model")
    return RepositoryActionResponse(name=name, state=state.status, version=str(state.version) if state.version else None, reason=state.reason)


@router.post("/v2/repository/models/{name}/unload", response_model=RepositoryActionResponse, responses=ERRORS, summary="Unload a model")
async def repository_unload(name: str, ctx: CtxDep, _admin: AdminKeyDep) -> RepositoryActionResponse:
    state = await ctx.registry.unload(name)
    return RepositoryActionResponse(name=name, state=state.status, version=str(state.version) if state.version else None)
