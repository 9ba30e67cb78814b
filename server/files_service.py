"""Fine-tune training files: upload (every line validated, size caps), list, show, delete — per tenant,
on the adapter store's backend (`adapters_store.training_files`). Blocking I/O: call off the event loop."""

from __future__ import annotations

from typing import BinaryIO

from adapters_store.backends import open_backend
from adapters_store.training_files import FileLimits, TrainingFile, TrainingFileStore
from server.auth import Tenant
from server.protocol import FileDeleted, FileList, FileObject
from server.settings import GatewaySettings

FILES_PATH = "/v1/files"


def file_object(f: TrainingFile) -> FileObject:
    return FileObject(id=f.id, bytes=f.bytes, created_at=f.created_at, filename=f.filename, purpose=f.purpose,
                      records=f.records)


class FilesService:
    def __init__(self, store: TrainingFileStore, limits: FileLimits):
        self.store = store
        self.limits = limits

    def upload(self, tenant: Tenant, filename: str, f: BinaryIO, purpose: str) -> FileObject:
        """`f`: the uploaded file (spooled to disk), validated and stored as it is read."""
        return file_object(self.store.put_file(tenant.name, filename, f, self.limits, purpose))

    def list(self, tenant: Tenant, purpose: str | None = None) -> FileList:
        files = [f for f in self.store.list(tenant.name) if purpose is None or f.purpose == purpose]
        return FileList(data=[file_object(f) for f in files])

    def get(self, tenant: Tenant, file_id: str) -> FileObject:
        return file_object(self.store.get(file_id, tenant.name))

    def content(self, tenant: Tenant, file_id: str) -> tuple[str, bytes]:
        """(media type, bytes) of one of the tenant's files."""
        meta, data = self.store.content(file_id, tenant.name)
        return ("text/csv" if meta.filename.endswith(".csv") else "application/jsonl"), data

    def find(self, tenant: Tenant, file_id: str) -> TrainingFile | None:
        found = self.store.find(file_id)
        return found if found is not None and found.owner == tenant.name else None

    def delete(self, tenant: Tenant, file_id: str) -> FileDeleted:
        return FileDeleted(id=self.store.delete(file_id, tenant.name).id)


def build_files_service(settings: GatewaySettings) -> FilesService:
    limits = FileLimits(max_bytes=settings.max_training_file_bytes, max_lines=settings.max_training_file_lines,
                        max_line_bytes=settings.max_training_line_bytes)
    return FilesService(TrainingFileStore(open_backend(settings.resolved_store_url)), limits)
