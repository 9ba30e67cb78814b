"""adapterd Python SDK: `Client` / `AsyncClient` over httpx, typed models and errors. Light: httpx +
pydantic only (the `adapterd serve` CLI command imports the server lazily)."""

from adapterd_client.async_client import AsyncClient
from adapterd_client.client import Client
from adapterd_client.errors import (
    AdapterdError,
    APIConnectionError,
    APIStatusError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    InternalServerError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    ServiceUnavailableError,
    StreamError,
    UnprocessableEntityError,
)

__all__ = [
    "APIConnectionError",
    "APIStatusError",
    "AdapterdError",
    "AsyncClient",
    "AuthenticationError",
    "BadRequestError",
    "Client",
    "ConflictError",
    "InternalServerError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "RateLimitError",
    "ServiceUnavailableError",
    "StreamError",
    "UnprocessableEntityError",
]
