"""Unpacking uploaded archives (.zip, .tar.gz) without trusting them: every entry name is checked (no
absolute paths, no `..`, no drive letters), links and special files are refused, and decompression is
bounded (total bytes, bytes per entry, entry count, and the zip compression ratio) so a bomb stops early.
The archive is read from its buffer (bytes or a map of the spooled upload) in pieces; each entry is streamed
to an unlinked temp file and comes back mapped (`adapters_store.mapped_files`), keyed by its relative path."""

from __future__ import annotations

import gzip
import io
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import PurePosixPath

from adapters_store.errors import AdapterTooLargeError, InvalidAdapterError
from adapters_store.mapped_files import Buffer, chunks_of, reader, spool

ZIP_MAGIC = b"PK\x03\x04"
GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True)
class ArchiveLimits:
    max_entries: int = 64
    max_entry_bytes: int = 512 * 1024 * 1024
    max_total_bytes: int = 1024 * 1024 * 1024  # all entries together, decompressed
    max_ratio: float = 200.0  # decompressed / compressed, per zip entry (above 1 MiB)


def is_archive(filename: str, data: Buffer) -> bool:
    lower, head = filename.lower(), data[:4]
    return lower.endswith((".zip", ".tar.gz", ".tgz")) or head.startswith(ZIP_MAGIC) or head.startswith(GZIP_MAGIC)


def unpack(filename: str, data: Buffer, limits: ArchiveLimits) -> dict[str, Buffer]:
    head = data[:4]
    if head.startswith(ZIP_MAGIC) or filename.lower().endswith(".zip"):
        return _unzip(data, limits)
    if head.startswith(GZIP_MAGIC):
        return _untar_gz(data, limits)
    raise InvalidAdapterError(f"{filename}: not a .zip or .tar.gz archive")


def checked_member_name(name: str) -> str:
    """A safe relative POSIX path, or InvalidAdapterError naming the entry."""
    if not name or "\x00" in name:
        raise InvalidAdapterError("archive entry with an empty or NUL-containing name")
    normal = name.replace("\\", "/")
    if normal.startswith("/") or (len(normal) > 1 and normal[1] == ":"):
        raise InvalidAdapterError(f"archive entry {name!r} has an absolute path")
    parts = PurePosixPath(normal).parts
    if ".." in parts:
        raise InvalidAdapterError(f"archive entry {name!r} escapes the folder ('..' path traversal)")
    return "/".join(p for p in parts if p not in ("", "."))


class _Budget:
    def __init__(self, limits: ArchiveLimits):
        self.limits = limits
        self.entries = 0
        self.total = 0

    def admit(self, name: str, declared_size: int) -> None:
        self.entries += 1
        if self.entries > self.limits.max_entries:
            raise AdapterTooLargeError(f"archive has more than {self.limits.max_entries} entries")
        if declared_size > self.limits.max_entry_bytes:
            raise AdapterTooLargeError(
                f"archive entry {name!r} is {declared_size} bytes, over {self.limits.max_entry_bytes}")
        self.charge(declared_size)

    def charge(self, size: int) -> None:
        self.total += size
        if self.total > self.limits.max_total_bytes:
            raise AdapterTooLargeError(
                f"archive decompresses to more than {self.limits.max_total_bytes} bytes (decompression bomb?)")


def _unzip(data: Buffer, limits: ArchiveLimits) -> dict[str, Buffer]:
    try:
        archive = zipfile.ZipFile(reader(data))
    except zipfile.BadZipFile as e:
        raise InvalidAdapterError(f"not a valid zip archive: {e}") from e
    budget, out = _Budget(limits), {}
    with archive:
        for info in archive.infolist():
            name = checked_member_name(info.filename)
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise InvalidAdapterError(f"archive entry {info.filename!r} is a symbolic link")
            if info.is_dir():
                continue
            if info.flag_bits & 0x1:
                raise InvalidAdapterError(f"archive entry {info.filename!r} is encrypted")
            budget.admit(name, info.file_size)
            if info.file_size > 1024 * 1024 and info.file_size > limits.max_ratio * max(info.compress_size, 1):
                raise AdapterTooLargeError(
                    f"archive entry {info.filename!r} expands {info.file_size / max(info.compress_size, 1):.0f}×"
                    f" (limit {limits.max_ratio:.0f}×): decompression bomb?")
            out[name] = _read_zip_entry(archive, info, limits.max_entry_bytes)
    return out


def _read_zip_entry(archive: zipfile.ZipFile, info: zipfile.ZipInfo, cap: int) -> Buffer:
    try:
        with archive.open(info) as f:  # never more than declared: a lying header is caught
            body = spool(chunks_of(f), min(info.file_size, cap), f"archive entry {info.filename!r}")
    except AdapterTooLargeError as e:
        raise InvalidAdapterError(f"archive entry {info.filename!r} does not match its declared size") from e
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as e:
        raise InvalidAdapterError(f"archive entry {info.filename!r} cannot be read: {e}") from e
    if len(body) != info.file_size:
        raise InvalidAdapterError(f"archive entry {info.filename!r} does not match its declared size")
    return body


class _BoundedReader(io.RawIOBase):
    """Reads a decompressing stream and stops with AdapterTooLargeError past `limit` bytes."""

    def __init__(self, inner: io.BufferedIOBase, limit: int):
        self._inner = inner
        self._left = limit
        self._limit = limit

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self._inner.readinto(buffer)
        self._left -= n
        if self._left < 0:
            raise AdapterTooLargeError(
                f"archive decompresses to more than {self._limit} bytes (decompression bomb?)")
        return n


def _untar_gz(data: Buffer, limits: ArchiveLimits) -> dict[str, Buffer]:
    stream = _BoundedReader(gzip.GzipFile(fileobj=reader(data)), limits.max_total_bytes + 64 * 1024)
    budget, out = _Budget(limits), {}
    try:
        with tarfile.open(fileobj=io.BufferedReader(stream), mode="r|") as archive:
            for member in archive:
                name = checked_member_name(member.name)
                if member.issym() or member.islnk():
                    raise InvalidAdapterError(f"archive entry {member.name!r} is a link")
                if member.isdir():
                    continue
                if not member.isreg():
                    raise InvalidAdapterError(f"archive entry {member.name!r} is not a regular file")
                budget.admit(name, member.size)
                f = archive.extractfile(member)
                out[name] = spool(chunks_of(f), member.size, f"archive entry {member.name!r}") if f else b""
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise InvalidAdapterError(f"not a valid .tar.gz archive: {e}") from e
    return out
