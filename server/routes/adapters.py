"""The adapters API: upload (multipart), save a merge, list, show, download (the folder as a zip), delete;
for admin keys, import a folder from the operator's drop-in directory into a tenant's namespace."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile
from fastapi.responses import Response

from adapters_store import bounded_json
from adapters_store.ingest import CompressionRequest
from adapters_store.mapped_files import map_file
from adapters_store.validation import UploadedFile
from server.auth import AdminTenant, CurrentTenant
from server.dependencies import Adapters
from server.errors import InvalidRequestError
from server.protocol import (
    AdapterDeleted,
    AdapterImportRequest,
    AdapterInfo,
    AdapterList,
    ErrorResponse,
    MergeSaveRequest,
)

router = APIRouter(prefix="/v1/adapters", responses={"default": {"model": ErrorResponse}})


def _compression(raw: str | None) -> CompressionRequest | None:
    if not raw:
        return None
    try:
        return CompressionRequest.from_dict(bounded_json.loads(raw))
    except json.JSONDecodeError as e:
        raise InvalidRequestError(f"compression is not valid JSON: {e}", param="compression") from e


def _mapped(files: list[UploadFile]) -> list[UploadedFile]:
    """The uploaded parts, spooled to disk as the body streamed in (under the upload byte cap, see
    `server.app.BodySizeLimit`), mapped from there: validated and stored without being read into memory."""
    return [UploadedFile(f.filename or "upload", map_file(f.file)) for f in files]


@router.post("", response_model=AdapterInfo, status_code=201)
async def upload_adapter(
    registry: Adapters,
    tenant: CurrentTenant,
    files: Annotated[list[UploadFile], File(description="a PEFT folder's files, or one .zip/.tar.gz")],
    name: Annotated[str, Form()],
    kind: Annotated[str | None, Form()] = None,
    compression: Annotated[str | None, Form(description='{"method":"compeft","density":0.1,"alpha":1.0}')] = None,
    public: Annotated[bool, Form()] = False,
) -> AdapterInfo:
    uploads = await asyncio.to_thread(_mapped, files)
    return await asyncio.to_thread(registry.upload, tenant, name, uploads, kind, _compression(compression), public)


@router.post("/merge", response_model=AdapterInfo, status_code=201)
async def save_merge(body: MergeSaveRequest, registry: Adapters, tenant: CurrentTenant) -> AdapterInfo:
    """Merges adapters (as `merged_adapters` does per request) and stores the result as a new version."""
    return await asyncio.to_thread(registry.save_merge, tenant, body.name, body.merged_adapters, body.public)


@router.post("/import", response_model=AdapterInfo, status_code=201)
async def import_adapter(body: AdapterImportRequest, registry: Adapters, _: AdminTenant) -> AdapterInfo:
    """Validates and stores `DATA_DIR/adapters/FOLDER` as a new version of OWNER's NAME (admin keys only)."""
    return await asyncio.to_thread(registry.import_folder, body.folder, body.owner, body.name, body.public)


@router.get("", response_model=AdapterList)
async def list_adapters(registry: Adapters, tenant: CurrentTenant) -> AdapterList:
    return AdapterList(data=await asyncio.to_thread(registry.list, tenant))


# names may be full (`TENANT/NAME`), hence `:path`; download comes first so that it is not read as a name
@router.get("/{ref:path}/download", response_class=Response, responses={200: {"content": {"application/zip": {}}}})
async def download_adapter(ref: str, registry: Adapters, tenant: CurrentTenant) -> Response:
    manifest, data = await asyncio.to_thread(registry.download, tenant, ref)
    filename = f"{manifest.name.replace('/', '_')}-{manifest.version}.zip"
    return Response(data, media_type="application/zip",
                    headers={"content-disposition": f'attachment; filename="{filename}"'})


@router.get("/{name:path}", response_model=AdapterInfo)
async def show_adapter(name: str, registry: Adapters, tenant: CurrentTenant) -> AdapterInfo:
    return await asyncio.to_thread(registry.describe, tenant, name)


@router.delete("/{ref:path}", response_model=AdapterDeleted)
async def delete_adapter(ref: str, registry: Adapters, tenant: CurrentTenant) -> AdapterDeleted:
    return await asyncio.to_thread(registry.delete, tenant, ref)
