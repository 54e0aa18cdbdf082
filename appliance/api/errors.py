"""The one place where errors become HTTP responses, per API family.

- `/v1/...` (OpenAI-compatible): `{"error": {"message", "type", "param", "code"}}`; request
  validation failures are 400 with `param` naming the field, never FastAPI's 422.
- everything else (`/v2`, `/metrics`, ...): `{"error": "<message>"}` as KServe V2 does.

Every error is logged as one line (method, path, status, message), never a traceback; 429 gets
`Retry-After` (so do the 503s a client should retry: no room in the memory budget, a lost
scale-out replica), 401 gets `WWW-Authenticate`. Never imports the runtime's internals.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from appliance.api.inference import CLIENT_CLOSED_STATUS, ClientDisconnected
from appliance.errors import ApplianceError, CapacityExceeded, MemoryBudgetExceeded, ReplicaUnavailable

log = logging.getLogger("appliance.api")

OPENAI_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
    504: "timeout_error",
}
OPENAI_CODES: dict[int, str] = {
    401: "invalid_api_key",
    404: "model_not_found",
    413: "request_too_large",
    429: "queue_full",
    503: "model_not_ready",
    504: "deadline_exceeded",
}


def is_openai_path(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


def error_body(path: str, status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """The error body of the path's API family."""
    if is_openai_path(path):
        return {
            "error": {
                "message": message,
                "type": OPENAI_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error"),
                "param": param,
                "code": OPENAI_CODES.get(status),
            }
        }
    return {"error": message}


def error_headers(status: int, exc: BaseException | None = None) -> dict[str, str]:
    headers: dict[str, str] = {}
    if isinstance(exc, (CapacityExceeded, MemoryBudgetExceeded, ReplicaUnavailable)):
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
    elif status == 429:
        headers["Retry-After"] = "1"
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return headers


def error_bytes(path: str, status: int, message: str, param: str | None = None) -> bytes:
    """The same body, encoded, for ASGI middleware that answers before FastAPI runs."""
    return json.dumps(error_body(path, status, message, param)).encode("utf-8")


def error_response(request: Request, status: int, message: str, param: str | None = None, exc: BaseException | None = None) -> JSONResponse:
    level = logging.WARNING if status >= 500 else logging.INFO
    log.log(level, "%s %s -> %d %s", request.method, request.url.path, status, message)
    return JSONResponse(error_body(request.url.path, status, message, param), status_code=status, headers=error_headers(status, exc))


def _validation_param(error: dict[str, Any], path: str) -> str:
    """The field a validation error is about: OpenAI names the top-level parameter, V2 the path."""
    loc = [str(part) for part in error.get("loc", ()) if part not in ("body", "query", "path", "header")]
    if not loc:
        return "body"
    return loc[0] if is_openai_path(path) else ".".join(loc)


async def _appliance_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApplianceError)
    return error_response(request, exc.status_code, exc.message, exc.field, exc)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {"msg": "invalid request"}
    param = _validation_param(first, request.url.path)
    message = str(first.get("msg", "invalid value"))
    if first.get("type") == "json_invalid":
        message = f"malformed JSON: {first.get('ctx', {}).get('error', message)}"
        param = "body"
    elif param == "body" and first.get("type") in ("model_attributes_type", "dict_type"):
        message = "the request body must be a JSON object (send Content-Type: application/json)"
    elif first.get("type") == "missing":
        message = f"{_validation_where(first, param)}: field required"
    else:
        message = f"{_validation_where(first, param)}: {message}"
    return error_response(request, 400, message, param)


def _validation_where(error: dict[str, Any], param: str) -> str:
    """Where inside the parameter the error is, as a client writes it (`tools[0].function.name`):
    OpenAI's `param` names only the top-level field, the message says the rest."""
    parts = [part for part in error.get("loc", ()) if part not in ("body", "query", "path", "header")]
    if len(parts) <= 1 or not param or "." in param:
        return param
    where = str(parts[0])
    for part in parts[1:]:
        where += f"[{part}]" if isinstance(part, int) else f".{part}"
    return where


async def _client_disconnected(request: Request, exc: Exception) -> Response:
    """The client went away; its queued work was cancelled. Nobody reads this answer: the
    status is for the request log and the metrics (nginx's 499)."""
    log.info("%s %s: client disconnected; its work was cancelled", request.method, request.url.path)
    return Response(status_code=CLIENT_CLOSED_STATUS)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    message = exc.detail if isinstance(exc.detail, str) else "request failed"
    if exc.status_code == 404 and message == "Not Found":
        message = f"no route {request.url.path}"
    return error_response(request, exc.status_code, message)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApplianceError, _appliance_error)
    app.add_exception_handler(ClientDisconnected, _client_disconnected)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    # Unexpected exceptions are answered by GuardMiddleware (middleware.py): Starlette's own
    # handler for `Exception` re-raises after answering, which would log a traceback.
