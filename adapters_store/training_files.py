"""Fine-tune training files: JSONL, one record per line, every line validated on upload (the first bad line
is refused with its number and the problem), stored on the adapter store's backend next to the adapters so
that trainers on other machines read them the same way. Torch-free.

Record formats (a file may mix them):

    {"prompt": "…", "completion": "…"}                       completion non-empty
    {"messages": [{"role": "system"|"user"|"assistant"|"developer", "content": "…", "weight"?: 0|1}, …]}
                                                             at least one assistant message with content

Blank lines are skipped. Layout on the backend:

    files/{file_id}/data.jsonl     the bytes as uploaded (a result file's CSV is stored under the same key)
    files/{file_id}/meta.json      `TrainingFile` JSON, created (only-if-absent) after the data: a file
                                   exists exactly when its meta does
"""

from __future__ import annotations

import io
import json
import re
import secrets
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import BinaryIO

from adapters_store import bounded_json
from adapters_store.backends import StoreBackend
from adapters_store.errors import StoreError

FILES = "files/"
DEFAULT_FILENAME = "upload.jsonl"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
PURPOSE = "fine-tune"
RESULTS_PURPOSE = "fine-tune-results"  # a job's metrics CSV, written by its trainer
ROLES = ("system", "user", "assistant", "developer")
_MESSAGE_KEYS = {"role", "content", "name", "weight"}


class TrainingFileError(StoreError):
    """The file is not valid training data (the message names the line)."""


class TrainingFileTooLargeError(StoreError):
    """The file has more bytes or lines than the limits allow."""


class TrainingFileNotFoundError(StoreError):
    """No such file (or not the caller's)."""


@dataclass(frozen=True)
class FileLimits:
    max_bytes: int = 256 * 1024 * 1024
    max_lines: int = 1_000_000
    max_line_bytes: int = 1024 * 1024


@dataclass(frozen=True)
class TrainingFile:
    id: str
    filename: str
    bytes: int
    records: int
    purpose: str
    owner: str
    created_at: int

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> TrainingFile:
        data = json.loads(raw)
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})


def _bad(line: int, problem: str) -> TrainingFileError:
    return TrainingFileError(f"line {line}: {problem}", param="file")


def _check_messages(line: int, messages: object) -> None:
    if not isinstance(messages, list) or not messages:
        raise _bad(line, "'messages' must be a non-empty list")
    answered = False
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(line, f"{where} must be an object with 'role' and 'content'")
        extra = sorted(set(m) - _MESSAGE_KEYS)
        if extra:
            raise _bad(line, f"{where} has unknown keys {extra}")
        if m.get("role") not in ROLES:
            raise _bad(line, f"{where}.role must be one of {list(ROLES)}, got {m.get('role')!r}")
        if not isinstance(m.get("content"), str):
            raise _bad(line, f"{where}.content must be a string")
        if "weight" in m and m["weight"] not in (0, 1):
            raise _bad(line, f"{where}.weight must be 0 or 1")
        if m["role"] == "assistant" and m["content"] and m.get("weight", 1) == 1:
            answered = True
    if not answered:
        raise _bad(line, "no assistant message with content to learn from")


def check_record(line: int, record: object) -> dict:
    if not isinstance(record, dict):
        raise _bad(line, "a record must be a JSON object")
    keys = set(record)
    if keys == {"messages"}:
        _check_messages(line, record["messages"])
    elif keys == {"prompt", "completion"}:
        if not isinstance(record["prompt"], str) or not isinstance(record["completion"], str):
            raise _bad(line, "'prompt' and 'completion' must be strings")
        if not record["completion"]:
            raise _bad(line, "'completion' is empty")
    else:
        raise _bad(line, "a record has either 'prompt' and 'completion', or 'messages' "
                         f"(found keys {sorted(keys)})")
    return record


def parse_records(data: bytes, limits: FileLimits = FileLimits()) -> list[dict]:
    """Every record of a JSONL training file, each validated; raises on the first bad line."""
    if len(data) > limits.max_bytes:
        raise TrainingFileTooLargeError(f"the file is over {limits.max_bytes} bytes", param="file")
    return list(iter_records(data.split(b"\n"), limits))


def file_lines(f: BinaryIO, limits: FileLimits) -> Iterator[bytes]:
    """The lines of a file (without their newline) read one at a time, never more than one line's limit
    + 2 bytes at once; raises once the file passes `limits.max_bytes`."""
    total = 0
    while raw := f.readline(limits.max_line_bytes + 2):
        total += len(raw)
        if total > limits.max_bytes:
            raise TrainingFileTooLargeError(f"the file is over {limits.max_bytes} bytes", param="file")
        yield raw[:-1] if raw.endswith(b"\n") else raw


def iter_records(lines: Iterable[bytes], limits: FileLimits = FileLimits()) -> Iterator[dict]:
    """Each line's record, validated; raises on the first bad line, or at the end if there was none."""
    found = False
    for number, raw in enumerate(lines, start=1):
        if number > limits.max_lines and raw.strip():
            raise TrainingFileTooLargeError(f"the file has more than {limits.max_lines} lines", param="file")
        if len(raw) > limits.max_line_bytes:
            raise _bad(number, f"the line is over {limits.max_line_bytes} bytes")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _bad(number, f"not UTF-8 ({e.reason} at byte {e.start})") from e
        if not text.strip():
            continue
        try:
            record = bounded_json.loads(text)
        except json.JSONDecodeError as e:
            raise _bad(number, f"not valid JSON ({e.msg} at column {e.colno})") from e
        found = True
        yield check_record(number, record)
    if not found:
        raise TrainingFileError("the file has no records", param="file")


def safe_filename(name: str) -> str:
    """The name a file is kept under: its last path component (either slash), runs of anything but letters,
    digits, `.`, `_`, `-` as one `_`, no leading dots, at most 128 characters."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    cleaned = _UNSAFE.sub("_", base).lstrip(".")[:128]
    return cleaned if cleaned.strip("_") else DEFAULT_FILENAME


class TrainingFileStore:
    """Training files on a store backend. Blocking I/O: call off the event loop."""

    def __init__(self, backend: StoreBackend):
        self.backend = backend

    @staticmethod
    def _data_key(file_id: str) -> str:
        return f"{FILES}{file_id}/data.jsonl"

    @staticmethod
    def _meta_key(file_id: str) -> str:
        return f"{FILES}{file_id}/meta.json"

    @staticmethod
    def _valid_id(file_id: str) -> bool:
        return file_id.startswith("file-") and file_id[5:].isalnum() and len(file_id) <= 64

    def put(self, owner: str, filename: str, data: bytes, limits: FileLimits, purpose: str = PURPOSE) -> TrainingFile:
        return self.put_file(owner, filename, io.BytesIO(data), limits, purpose)

    def put_file(self, owner: str, filename: str, f: BinaryIO, limits: FileLimits,
                 purpose: str = PURPOSE) -> TrainingFile:
        """Validates `f` line by line from its position, then streams it to the backend: the file is never
        held whole in memory (an upload arrives spooled to disk)."""
        if purpose != PURPOSE:
            raise TrainingFileError(f"purpose must be {PURPOSE!r}, got {purpose!r}", param="purpose")
        start = f.tell()
        records = sum(1 for _ in iter_records(file_lines(f, limits), limits))
        size = f.tell() - start
        f.seek(start)
        meta = TrainingFile(id=f"file-{secrets.token_hex(12)}", filename=safe_filename(filename),
                            bytes=size, records=records, purpose=purpose, owner=owner, created_at=int(time.time()))
        self.backend.write_file(self._data_key(meta.id), f)
        self.backend.create(self._meta_key(meta.id), meta.to_json())
        return meta

    def put_result(self, owner: str, filename: str, data: bytes, rows: int) -> TrainingFile:
        """A job's result file (purpose `fine-tune-results`): stored as given, owned by the job's tenant."""
        meta = TrainingFile(id=f"file-{secrets.token_hex(12)}", filename=filename[:255], bytes=len(data),
                            records=rows, purpose=RESULTS_PURPOSE, owner=owner, created_at=int(time.time()))
        self.backend.write(self._data_key(meta.id), data)
        self.backend.create(self._meta_key(meta.id), meta.to_json())
        return meta

    def content(self, file_id: str, owner: str) -> tuple[TrainingFile, bytes]:
        """The file's bytes as stored (only the owner's)."""
        meta = self.get(file_id, owner)
        data = self.backend.read(self._data_key(file_id))
        if data is None:
            raise TrainingFileNotFoundError(f"no file {file_id!r}", param="file_id")
        return meta, data

    def find(self, file_id: str) -> TrainingFile | None:
        if not self._valid_id(file_id):
            return None
        raw = self.backend.read(self._meta_key(file_id))
        return TrainingFile.from_json(raw) if raw is not None else None

    def get(self, file_id: str, owner: str) -> TrainingFile:
        meta = self.find(file_id)
        if meta is None or meta.owner != owner:
            raise TrainingFileNotFoundError(f"no file {file_id!r}", param="file_id")
        return meta

    def list(self, owner: str) -> list[TrainingFile]:
        found = []
        for key in self.backend.list(FILES):
            if key.endswith("/meta.json"):
                raw = self.backend.read(key)
                meta = TrainingFile.from_json(raw) if raw is not None else None
                if meta is not None and meta.owner == owner:
                    found.append(meta)
        return sorted(found, key=lambda m: (m.created_at, m.id), reverse=True)

    def read_records(self, file_id: str, limits: FileLimits = FileLimits()) -> list[dict]:
        data = self.backend.read(self._data_key(file_id)) if self.find(file_id) else None
        if data is None:
            raise TrainingFileNotFoundError(f"no file {file_id!r}", param="file_id")
        return parse_records(data, limits)

    def delete(self, file_id: str, owner: str) -> TrainingFile:
        meta = self.get(file_id, owner)
        self.backend.delete(self._meta_key(file_id))
        self.backend.delete(self._data_key(file_id))
        return meta
