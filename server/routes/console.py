"""The web console at `/ui`: static files shipped in the package (server/console/static), each response
with a strict Content-Security-Policy (scripts, styles and connections from this origin only; no inline
code, no eval), and the fine-tune methods' default hyperparameters for its job form. The console calls
the public API with the user's key like any client; it has no data route of its own."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse, RedirectResponse
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from adapters_store.training_methods import METHOD_TYPES, validate_method

STATIC_DIR = Path(__file__).resolve().parent.parent / "console" / "static"
CONSOLE_PATH = "/ui"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cache-control": "no-cache",
}

router = APIRouter(include_in_schema=False)


def _secured(response: Response) -> Response:
    response.headers.update(SECURITY_HEADERS)
    return response


class ConsoleFiles(StaticFiles):
    async def get_response(self, path: str, scope: Scope) -> Response:
        return _secured(await super().get_response(path, scope))


@router.get(CONSOLE_PATH)
async def console_root() -> Response:
    return _secured(RedirectResponse(CONSOLE_PATH + "/", status_code=308))


@router.get(CONSOLE_PATH + "/methods.json")
async def methods() -> Response:
    """Every fine-tune method with its hyperparameters' defaults (from the validator: one source)."""
    return _secured(JSONResponse({kind: validate_method({"type": kind}) for kind in METHOD_TYPES}))


def install(app: FastAPI) -> None:
    app.include_router(router)
    app.mount(CONSOLE_PATH, ConsoleFiles(directory=STATIC_DIR, html=True), name="console")
