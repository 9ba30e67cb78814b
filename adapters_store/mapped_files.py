"""Uploaded files kept on disk, not in memory: a spooled upload, or an archive entry streamed to a temp file,
is mapped read-only (`mmap`), so validation slices it like bytes and the store hashes and copies it in
pieces, while its pages stay the kernel's page cache (dropped under pressure), never the process's heap.

`Buffer` is what the store and the validators take as a file's contents: bytes, or such a map. A map is
unmapped when its last reference goes; the temp file behind it is already unlinked."""

from __future__ import annotations

import io
import mmap
import os
import tempfile
from collections.abc import Iterable
from typing import BinaryIO

from adapters_store.errors import AdapterTooLargeError

Buffer = bytes | mmap.mmap
CHUNK_BYTES = 1024 * 1024


def map_file(f: BinaryIO) -> Buffer:
    """`f` (a real file, or a `SpooledTemporaryFile`: `fileno()` rolls it over to disk) mapped read-only."""
    f.flush()
    fd = f.fileno()
    return mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if os.fstat(fd).st_size else b""


def spool(chunks: Iterable[bytes], limit: int, what: str) -> Buffer:
    """`chunks` written to an unlinked temp file and mapped; AdapterTooLargeError past `limit` bytes (what
    was written so far is dropped with the file)."""
    with tempfile.TemporaryFile() as f:
        for chunk in chunks:
            if f.tell() + len(chunk) > limit:
                raise AdapterTooLargeError(f"{what} is over {limit} bytes")
            f.write(chunk)
        return map_file(f)


def chunks_of(f: BinaryIO) -> Iterable[bytes]:
    return iter(lambda: f.read(CHUNK_BYTES), b"")


class _BufferReader(io.RawIOBase):
    """A seekable read-only file over a buffer, without copying it (io.BytesIO copies anything but bytes)."""

    def __init__(self, data: Buffer):
        self._view = memoryview(data)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = max(0, min(len(b), len(self._view) - self._pos))
        b[:n] = self._view[self._pos : self._pos + n]
        self._pos += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        start = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, start + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        self._view.release()  # the map can be closed once every reader is
        super().close()


def reader(data: Buffer) -> BinaryIO:
    return io.BufferedReader(_BufferReader(data), CHUNK_BYTES)
