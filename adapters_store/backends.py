"""Where the store's bytes live, behind one small key → bytes interface: a local directory or an
S3-compatible bucket. Keys are relative POSIX paths built by the store (never user input).

Both backends give the store the two guarantees it is built on:
- `write` is atomic: a reader sees the old bytes or the new ones, never a partial file.
- `create` writes only if the key does not exist yet, atomically (local: `link(2)` of a finished temp
  file; S3: a conditional `PutObject` with `If-None-Match: *`), so two publishers cannot take one version.

`open_backend(url)`: `file:///abs/dir` or `s3://bucket/prefix?endpoint_url=http://host:port&region=…`
(S3 credentials come from the usual boto3 environment, never from the URL).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import BinaryIO, Protocol
from urllib.parse import parse_qs, unquote, urlencode, urlparse


class StoreBackend(Protocol):
    url: str  # what `open_backend` takes to reach the same bytes from another process

    def read(self, key: str) -> bytes | None: ...
    def write(self, key: str, data: bytes) -> None: ...
    def write_file(self, key: str, f: BinaryIO) -> None: ...  # from f's position to its end, streamed
    def create(self, key: str, data: bytes) -> bool: ...
    def delete(self, key: str) -> None: ...
    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str) -> list[str]: ...
    def age_s(self, key: str) -> float: ...


def _checked(key: str) -> str:
    assert key and not key.startswith("/") and ".." not in key.split("/"), key
    return key


class LocalBackend:
    """A directory; temp files in `.tmp/` (same file system) are fsynced, then renamed or linked in."""

    TMP = ".tmp"

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        (self.root / self.TMP).mkdir(parents=True, exist_ok=True)
        self.url = self.root.as_uri()

    def _path(self, key: str) -> Path:
        return self.root / _checked(key)

    def read(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def _temp_file(self, data: bytes | BinaryIO) -> Path:
        fd, name = tempfile.mkstemp(dir=self.root / self.TMP)
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, bytes):
                f.write(data)
            else:
                shutil.copyfileobj(data, f, 1024 * 1024)
            f.flush()
            os.fsync(f.fileno())
        return Path(name)

    def write(self, key: str, data: bytes | BinaryIO) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._temp_file(data)
        try:
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(path.parent)

    write_file = write  # a file object is copied to the temp file in 1 MiB pieces

    def create(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._temp_file(data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(path.parent)
        return True

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> list[str]:
        base = self.root / prefix if prefix else self.root
        if not base.is_dir():
            return []
        keys = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if d != self.TMP]
            rel = Path(dirpath).relative_to(self.root)
            keys.extend((rel / f).as_posix() for f in filenames)
        return sorted(keys)

    def age_s(self, key: str) -> float:
        try:
            return time.time() - self._path(key).stat().st_mtime
        except FileNotFoundError:
            return 0.0


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class S3Backend:
    """A bucket (and key prefix) on any S3-compatible service, through boto3."""

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None,
                 region: str | None = None, client=None):
        import boto3

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._s3 = client or boto3.client("s3", endpoint_url=endpoint_url, region_name=region)
        query = urlencode({k: v for k, v in (("endpoint_url", endpoint_url), ("region", region)) if v})
        self.url = f"s3://{bucket}/{self.prefix}" + (f"?{query}" if query else "")

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{_checked(key)}" if self.prefix else _checked(key)

    def _missing(self, exc: Exception) -> bool:
        code = getattr(exc, "response", {}).get("Error", {}).get("Code")
        return code in ("NoSuchKey", "404", "NotFound")

    def read(self, key: str) -> bytes | None:
        from botocore.exceptions import ClientError

        try:
            return self._s3.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except ClientError as e:
            if self._missing(e):
                return None
            raise

    def write(self, key: str, data: bytes) -> None:
        self._s3.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def write_file(self, key: str, f: BinaryIO) -> None:
        self._s3.upload_fileobj(f, self.bucket, self._key(key))  # multipart for big files, never whole

    def create(self, key: str, data: bytes) -> bool:
        from botocore.exceptions import ClientError

        try:
            self._s3.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch="*")
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise
        return True

    def delete(self, key: str) -> None:
        self._s3.delete_object(Bucket=self.bucket, Key=self._key(key))

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self._s3.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as e:
            if self._missing(e):
                return False
            raise
        return True

    def list(self, prefix: str) -> list[str]:
        full = self._key(prefix) if prefix else (f"{self.prefix}/" if self.prefix else "")
        strip = len(f"{self.prefix}/") if self.prefix else 0
        keys = []
        for page in self._s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
            keys.extend(obj["Key"][strip:] for obj in page.get("Contents", ()))
        return sorted(keys)

    def age_s(self, key: str) -> float:
        head = self._s3.head_object(Bucket=self.bucket, Key=self._key(key))
        return time.time() - head["LastModified"].timestamp()


def open_backend(url: str) -> StoreBackend:
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return LocalBackend(unquote(parsed.path))
    if parsed.scheme == "s3":
        query = {k: v[0] for k, v in parse_qs(parsed.query).items()}
        return S3Backend(parsed.netloc, parsed.path, query.get("endpoint_url"), query.get("region"))
    if not parsed.scheme:
        return LocalBackend(url)
    raise ValueError(f"unknown store URL scheme {parsed.scheme!r} (use file:// or s3://)")
