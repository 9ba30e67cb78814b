"""The worker's error hierarchy. Raised anywhere in `workers/`, converted to the JSON error shape
`{"error": {"type", "message", "param", "code"}}` at the worker service's one boundary. Torch-free."""

from __future__ import annotations

from adapters_store.error_shape import ServiceError


class AdapterdError(ServiceError):
    """Base of the worker's errors: the shared shape (`adapters_store.error_shape`) with its HTTP status."""


class InvalidRequestError(AdapterdError):
    status = 400
    type = "invalid_request_error"


class PromptTooLongError(InvalidRequestError):
    code = "context_length_exceeded"


class NotFoundError(AdapterdError):
    status = 404
    type = "not_found_error"


class AdapterNotFoundError(NotFoundError):
    code = "adapter_not_found"


class AdapterValidationError(InvalidRequestError):
    """An adapter's files do not fit the base model or are unsafe (pickle, wrong shapes, rank)."""

    code = "invalid_adapter"


class AdapterBusyError(AdapterdError):
    """The adapter is used by requests in flight, so it cannot be replaced or unloaded now."""

    status = 409
    type = "conflict_error"
    code = "adapter_in_use"


class CapacityError(AdapterdError):
    status = 429
    type = "capacity_error"
    code = "capacity_exceeded"


class UnsupportedModelError(AdapterdError):
    """A base model architecture or config option this runner does not implement."""

    status = 400
    type = "invalid_request_error"
    code = "unsupported_model"


class RequestFailedError(AdapterdError):
    """One request failed inside the engine (its own rows raised); the requests beside it went on."""

    code = "request_failed"


class ShuttingDownError(AdapterdError):
    """The worker's drain grace period ran out while this request was still running."""

    status = 503
    type = "server_error"
    code = "worker_shutting_down"
