"""The gateway's error hierarchy and its one boundary: every failure leaves as
`{"error": {"type", "message", "param", "code"}}` with the matching HTTP status."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis import exceptions as redis_errors
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters_store import errors as store_errors
from adapters_store import training_files
from adapters_store.error_shape import ServiceError, error_body, http_error, unexpected_error, validation_error
from adapters_store.errors import StoreError

log = logging.getLogger("adapterd.gateway")
REDIS_RETRY_AFTER_S = 1  # Redis restarts in about a second under `adapterd serve`


class GatewayError(ServiceError):
    """The gateway's errors: the shared shape (`adapters_store.error_shape`) plus response headers."""

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message, param=param, code=code)
        self.headers = headers or {}


class InvalidRequestError(GatewayError):
    status = 400
    type = "invalid_request_error"


class AuthenticationError(GatewayError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class ModelNotFoundError(GatewayError):
    status = 404
    type = "not_found_error"
    code = "model_not_found"


class PermissionDeniedError(GatewayError):
    status = 403
    type = "permission_error"
    code = "permission_denied"


class ConflictError(GatewayError):
    status = 409
    type = "conflict_error"
    code = "conflict"


class BaseModelUnknownError(GatewayError):
    status = 503
    type = "service_unavailable"
    code = "base_model_unknown"


class PayloadTooLargeError(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class NoWorkerError(GatewayError):
    """No live worker can take the request (none registered, all down, or the queue is full)."""

    status = 503
    type = "service_unavailable"
    code = "no_worker_available"

    def __init__(self, message: str, *, retry_after_s: int, code: str | None = None):
        super().__init__(message, code=code, headers={"Retry-After": str(retry_after_s)})


class JobNotFoundError(GatewayError):
    status = 404
    type = "not_found_error"
    code = "job_not_found"


class UpstreamError(GatewayError):
    """A worker answered with an error: its status and body pass through unchanged."""

    def __init__(self, status: int, body: dict):
        err = body.get("error") if isinstance(body, dict) else None
        err = err if isinstance(err, dict) else {}
        super().__init__(
            str(err.get("message") or f"worker error {status}"), param=err.get("param"), code=err.get("code")
        )
        self.status = status
        self.type = str(err.get("type") or "server_error")


class WorkerUnreachableError(GatewayError):
    """The worker could not be reached or died before answering (retried once elsewhere)."""

    status = 502
    type = "server_error"
    code = "worker_unreachable"


_STORE_ERRORS: dict[type[StoreError], tuple[int, str, str]] = {
    store_errors.InvalidAdapterError: (400, "invalid_request_error", "invalid_adapter"),
    store_errors.IncompatibleAdapterError: (422, "invalid_request_error", "incompatible_adapter"),
    store_errors.AdapterTooLargeError: (413, "invalid_request_error", "payload_too_large"),
    store_errors.AdapterNotFoundError: (404, "not_found_error", "adapter_not_found"),
    store_errors.NameConflictError: (409, "conflict_error", "adapter_name_taken"),
    store_errors.StoreCorruptionError: (500, "server_error", "store_corrupted"),
    training_files.TrainingFileError: (400, "invalid_request_error", "invalid_training_file"),
    training_files.TrainingFileTooLargeError: (413, "invalid_request_error", "payload_too_large"),
    training_files.TrainingFileNotFoundError: (404, "not_found_error", "file_not_found"),
}


def from_store_error(exc: StoreError) -> GatewayError:
    """The gateway error for a store error (by the most specific class that has a mapping)."""
    status, type_, code = next(
        (v for cls, v in _STORE_ERRORS.items() if isinstance(exc, cls)), (500, "server_error", "store_error")
    )
    error = GatewayError(exc.message, param=exc.param, code=code)
    error.status, error.type = status, type_
    return error


def error_response(
    status: int,
    type_: str,
    message: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(type_, message, param, code), status_code=status, headers=headers)


def install_error_boundary(app: FastAPI) -> None:
    @app.exception_handler(GatewayError)
    async def _gateway(_: Request, exc: GatewayError) -> JSONResponse:
        return JSONResponse(exc.to_dict(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StoreError)
    async def _store(_: Request, exc: StoreError) -> JSONResponse:
        error = from_store_error(exc)
        return JSONResponse(error.to_dict(), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        status, body = validation_error(exc.errors())
        return JSONResponse(body, status_code=status)

    async def _redis_down(_: Request, exc: Exception) -> JSONResponse:  # a typed 503, the connection kept
        log.warning("Redis is not reachable: %s", exc)
        return error_response(503, "service_unavailable", "Redis is not reachable; retry shortly",
                              code="redis_unreachable", headers={"Retry-After": str(REDIS_RETRY_AFTER_S)})

    app.add_exception_handler(redis_errors.ConnectionError, _redis_down)  # refused, reset, still loading
    app.add_exception_handler(redis_errors.TimeoutError, _redis_down)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(http_error(exc.status_code, str(exc.detail)), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(unexpected_error(exc), status_code=500)
