"""The safetensors format, read and written with numpy only (no torch, no pickle).

A file is: 8 bytes little-endian `N`, then `N` bytes of JSON header mapping each tensor name to
`{"dtype", "shape", "data_offsets": [begin, end]}` (offsets relative to the end of the header; an optional
`"__metadata__"` string map), then the data. We check every offset against the file before reading, and
that the tensors tile the data exactly, so a truncated or crafted file is refused rather than misread.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

import numpy as np

from adapters_store.errors import InvalidAdapterError
from adapters_store.mapped_files import Buffer

MAX_HEADER_BYTES = 16 * 1024 * 1024
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
_NUMPY = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
          "U8": "u1", "BOOL": "?"}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # offsets into the data section
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    tensors: dict[str, TensorInfo]
    data_start: int  # 8 + header length
    metadata: dict[str, str]


def _bad(what: str) -> InvalidAdapterError:
    return InvalidAdapterError(f"adapter_model.safetensors is not a valid safetensors file: {what}")


def read_header(data: Buffer) -> SafetensorsHeader:
    if len(data) < 8:
        raise _bad("shorter than the 8-byte header length (truncated?)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER_BYTES:
        raise _bad(f"header length {n} is over {MAX_HEADER_BYTES} bytes")
    if 8 + n > len(data):
        raise _bad(f"header of {n} bytes but the file has {len(data)} bytes (truncated?)")
    try:
        raw = json.loads(data[8 : 8 + n])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _bad(f"header is not JSON ({e})") from e
    if not isinstance(raw, dict):
        raise _bad("header is not a JSON object")
    metadata = raw.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise _bad("__metadata__ is not an object")
    tensors = {name: _tensor_info(name, entry) for name, entry in raw.items()}
    _check_layout(tensors, len(data) - 8 - n)
    return SafetensorsHeader(tensors, 8 + n, {str(k): str(v) for k, v in metadata.items()})


def _tensor_info(name: str, entry: object) -> TensorInfo:
    if not isinstance(entry, dict):
        raise _bad(f"entry {name!r} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in ITEMSIZE:
        raise _bad(f"{name}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise _bad(f"{name}: bad shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets) or not 0 <= offsets[0] <= offsets[1]):
        raise _bad(f"{name}: bad data_offsets {offsets!r}")
    info = TensorInfo(name, dtype, tuple(shape), offsets[0], offsets[1])
    if info.end - info.begin != info.numel * ITEMSIZE[dtype]:
        raise _bad(f"{name}: {info.end - info.begin} bytes for shape {list(shape)} of {dtype}")
    return info


def _check_layout(tensors: dict[str, TensorInfo], data_bytes: int) -> None:
    cursor = 0
    for info in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if info.begin != cursor:
            raise _bad(f"{info.name}: tensors overlap or leave a gap at byte {cursor}")
        cursor = info.end
    if cursor != data_bytes:
        what = "truncated" if cursor > data_bytes else "trailing bytes"
        raise _bad(f"the tensors need {cursor} data bytes but the file has {data_bytes} ({what})")


def tensor_array(data: Buffer, header: SafetensorsHeader, name: str) -> np.ndarray:
    """One tensor as a float32 (floating dtypes) or native numpy array; a copy, never a view of `data`."""
    info = header.tensors[name]
    raw = data[header.data_start + info.begin : header.data_start + info.end]
    if info.dtype == "BF16":
        return _floats(raw, "BF16").reshape(info.shape)
    arr = np.frombuffer(raw, dtype=_NUMPY[info.dtype]).reshape(info.shape)
    return arr.astype(np.float32) if info.dtype in FLOAT_DTYPES else arr.copy()


def all_finite(data: Buffer, header: SafetensorsHeader, piece_bytes: int = 4 * 1024 * 1024) -> bool:
    """No NaN or inf in any floating tensor, read `piece_bytes` at a time (a huge tensor is never copied
    whole); the same answer as `np.isfinite(tensor_array(...)).all()` over every tensor."""
    for info in header.tensors.values():
        if info.dtype not in FLOAT_DTYPES:
            continue
        step = piece_bytes - piece_bytes % ITEMSIZE[info.dtype]
        for begin in range(info.begin, info.end, step):
            raw = data[header.data_start + begin : header.data_start + min(begin + step, info.end)]
            if not np.isfinite(_floats(raw, info.dtype)).all():
                return False
    return True


def _floats(raw: bytes, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    return np.frombuffer(raw, dtype=_NUMPY[dtype])


def read_tensors(data: Buffer) -> dict[str, np.ndarray]:
    header = read_header(data)
    return {name: tensor_array(data, header, name) for name in header.tensors}


def write_tensors(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> bytes:
    """Safetensors bytes, names sorted: floating tensors as float32 (the dtype peft and our loader read back
    unchanged), integer tensors as int64."""
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    blobs, offset = [], 0
    for name in sorted(tensors):
        integer = np.asarray(tensors[name]).dtype.kind in "iu"
        arr = np.ascontiguousarray(tensors[name], dtype="<i8" if integer else "<f4")
        header[name] = {"dtype": "I64" if integer else "F32", "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        blobs.append(arr.tobytes())
        offset += arr.nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # keep the data 8-byte aligned, as the reference writer does
    return struct.pack("<Q", len(head)) + head + b"".join(blobs)
