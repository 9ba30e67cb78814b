"""The JSON error shape every adapterd HTTP service answers with, `{"error": {"type", "message", "param",
"code"}}`, and the conversions the gateway's boundary (`server/errors.py`) and the worker's
(`workers/service/app.py`) share: a base error that carries its status and shape, and request-validation and
HTTP errors turned into the shape. Framework-free (plain data), so both boundaries and the worker's signature
middleware build their answers from it."""

from __future__ import annotations


def error_body(type_: str, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"type": type_, "message": message, "param": param, "code": code}}


class ServiceError(Exception):
    """Base of the gateway's and the worker's error hierarchies: the HTTP status and error type it maps to."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def to_dict(self) -> dict:
        return error_body(self.type, self.message, self.param, self.code)


def validation_error(errors: list[dict]) -> tuple[int, dict]:
    """pydantic's errors for a request body (FastAPI's `RequestValidationError.errors()`) → status and body:
    400 `invalid_json` for a body that is not JSON, else 422 `validation_error` naming the first bad field."""
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return 400, error_body("invalid_request_error", "the request body is not valid JSON", code="invalid_json")
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    # pydantic names union members in loc (e.g. "prompt.str"); keep the field path readable
    param = ".".join(p for p in loc if not p.startswith(("str", "list[", "function-", "int")))
    msg = str(first.get("msg", "invalid request"))
    if first.get("type") == "missing":
        msg = f"missing required field {param!r}"
    elif param:
        msg = f"{param}: {msg}"
    return 422, error_body("invalid_request_error", msg, param or None, "validation_error")


def http_error(status: int, detail: str) -> dict:
    """An HTTP error raised by the framework (unknown route, wrong method, a body cut off on the stream)."""
    kind = "not_found_error" if status == 404 else ("invalid_request_error" if status < 500 else "server_error")
    return error_body(kind, detail, code="payload_too_large" if status == 413 else None)


def unexpected_error(exc: BaseException) -> dict:
    """A bug: the body names the exception's class only (its message may hold internals)."""
    return error_body("server_error", f"internal error: {type(exc).__name__}")
