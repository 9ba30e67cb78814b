"""Fine-tune training files: upload (multipart, `purpose=fine-tune`), list, show, content, delete (a job's
result files, purpose `fine-tune-results`, are listed and read the same way)."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import Response

from server.auth import CurrentTenant
from server.errors import PayloadTooLargeError
from server.files_service import FILES_PATH, FilesService
from server.protocol import ErrorResponse, FileDeleted, FileList, FileObject


async def _files(request: Request) -> FilesService:
    return request.app.state.files


Files = Annotated[FilesService, Depends(_files)]
router = APIRouter(prefix=FILES_PATH, responses={"default": {"model": ErrorResponse}})


@router.post("", response_model=FileObject)
async def upload_file(
    files: Files,
    tenant: CurrentTenant,
    file: Annotated[UploadFile, File(description="JSONL: {prompt, completion} or {messages} records")],
    purpose: Annotated[str, Form()] = "fine-tune",
) -> FileObject:
    if file.size is not None and file.size > files.limits.max_bytes:  # spooled to disk; refused unread
        raise PayloadTooLargeError(f"the file is over {files.limits.max_bytes} bytes", param="file")
    return await asyncio.to_thread(files.upload, tenant, file.filename or "upload.jsonl", file.file, purpose)


@router.get("", response_model=FileList)
async def list_files(files: Files, tenant: CurrentTenant, purpose: str | None = None) -> FileList:
    return await asyncio.to_thread(files.list, tenant, purpose)


@router.get("/{file_id}", response_model=FileObject)
async def show_file(file_id: str, files: Files, tenant: CurrentTenant) -> FileObject:
    return await asyncio.to_thread(files.get, tenant, file_id)


@router.get("/{file_id}/content", response_class=Response)
async def file_content(file_id: str, files: Files, tenant: CurrentTenant) -> Response:
    media_type, data = await asyncio.to_thread(files.content, tenant, file_id)
    return Response(data, media_type=media_type)


@router.delete("/{file_id}", response_model=FileDeleted)
async def delete_file(file_id: str, files: Files, tenant: CurrentTenant) -> FileDeleted:
    return await asyncio.to_thread(files.delete, tenant, file_id)
