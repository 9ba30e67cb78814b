"""Typed exceptions, mapped from the server's error shape `{"error": {"type","message","param","code"}}`."""

from __future__ import annotations


class AdapterdError(Exception):
    """Base of every SDK error."""


class APIConnectionError(AdapterdError):
    """The server could not be reached (after retries)."""


class APIStatusError(AdapterdError):
    """The server answered with an error status."""

    status_code: int = 0

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.type = type
        self.param = param
        self.code = code
        self.retry_after = retry_after

    def __str__(self) -> str:
        return f"{self.status_code} {self.code or self.type}: {self.message}"


class BadRequestError(APIStatusError):
    pass


class AuthenticationError(APIStatusError):
    pass


class PermissionDeniedError(APIStatusError):
    pass


class NotFoundError(APIStatusError):
    pass


class ConflictError(APIStatusError):
    pass


class PayloadTooLargeError(APIStatusError):
    pass


class UnprocessableEntityError(APIStatusError):
    pass


class RateLimitError(APIStatusError):
    pass


class InternalServerError(APIStatusError):
    pass


class ServiceUnavailableError(APIStatusError):
    pass


class StreamError(APIStatusError):
    """An error the server reported inside a stream, after it had started."""


_BY_STATUS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    422: UnprocessableEntityError,
    429: RateLimitError,
    503: ServiceUnavailableError,
}


def error_from(status: int, body: object, retry_after: float | None = None, cls: type | None = None) -> APIStatusError:
    err = body.get("error") if isinstance(body, dict) else None
    err = err if isinstance(err, dict) else {}
    kind = cls or _BY_STATUS.get(status) or (InternalServerError if status >= 500 else APIStatusError)
    return kind(
        str(err.get("message") or f"HTTP {status}"),
        status_code=status,
        type=err.get("type"),
        param=err.get("param"),
        code=err.get("code"),
        retry_after=retry_after,
    )
