"""The store's error hierarchy. Torch-free and HTTP-free: the gateway maps these to statuses at its one
error boundary (`server/errors.py`); the worker maps them to its own."""

from __future__ import annotations


class StoreError(Exception):
    """Base of everything the store raises on purpose."""

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidAdapterError(StoreError):
    """The upload is malformed or unsafe: pickle files, bad archive entries, bad JSON, broken safetensors."""


class IncompatibleAdapterError(StoreError):
    """The upload is well formed but does not fit the base model (names, shapes, dtypes, rank cap)."""


class AdapterTooLargeError(StoreError):
    """A file, the upload, or an archive's decompressed contents exceed a size limit."""


class AdapterNotFoundError(StoreError):
    """No such adapter name or version (or not visible to the caller)."""


class NameConflictError(StoreError):
    """The name belongs to someone else, or a concurrent publish took the version."""


class StoreCorruptionError(StoreError):
    """Bytes in the store do not match their recorded digest, or a manifest is unreadable."""
