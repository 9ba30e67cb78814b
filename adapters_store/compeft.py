"""ComPEFT: sparsify a PEFT update by global top-k magnitude and ternarise it, in a compact binary format.

The update τ is every tensor of the adapter (for LoRA: the A and B matrices themselves, since their
init is not part of the update we store) flattened and concatenated in name order. We keep the
`k = round(density · |τ|)` entries of largest magnitude (at least one); each kept entry becomes
`sign(τ_i) · α · std(τ)` where std is the population standard deviation over the whole dense τ, taken
before sparsification. Everything else becomes 0. Decoding gives dense float32 tensors: a normal LoRA.

Binary format, version 1 (all integers little-endian):

    offset   size      field
    0        4         magic b"CPFT"
    4        1         format version = 1
    5        3         reserved, zero
    8        4         H: header length (uint32)
    12       H         header, UTF-8 JSON object:
                         "tensors":   [{"name": str, "shape": [int, ...]}, ...]  (the concatenation order)
                         "count":     n, the number of kept entries
                         "scale":     α · std(τ) as a JSON number (float64, exact round trip)
                         "density":   the requested density (informational)
                         "alpha":     α (informational)
                         "positions_bytes": P
    12+H     P         positions: n unsigned LEB128 varints, the gaps between the kept entries' indices in
                       the flat concatenation: the first is the first index, the rest are ≥ 1
    12+H+P   ⌈n/8⌉     signs: one bit per kept entry in position order, 1 = positive, packed most
                       significant bit first (numpy.packbits), zero padding in the last byte

The file ends exactly there. A decoder refuses a bad magic, an unknown version, a header that is not the
documented JSON, gaps that step out of range or back, or any length mismatch.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

import numpy as np

from adapters_store.errors import InvalidAdapterError

MAGIC = b"CPFT"
FORMAT_VERSION = 1
FILENAME = "adapter_model.compeft"
_PREFIX = struct.Struct("<4sB3xI")
_MAX_HEADER_BYTES = 16 * 1024 * 1024
_MAX_VARINT_BYTES = 10  # enough for any uint64


@dataclass(frozen=True)
class TensorLayout:
    name: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class CompeftTensors:
    """A ternary update: kept flat positions (sorted, unique), their signs, and one scale."""

    layout: tuple[TensorLayout, ...]
    positions: np.ndarray  # [n] int64, strictly increasing, < total
    positive: np.ndarray  # [n] bool
    scale: float
    density: float
    alpha: float

    @property
    def total(self) -> int:
        return sum(t.numel for t in self.layout)

    def to_dense(self) -> dict[str, np.ndarray]:
        flat = np.zeros(self.total, dtype=np.float32)  # flat: [total]
        magnitude = np.float32(self.scale)
        flat[self.positions] = np.where(self.positive, magnitude, -magnitude)
        out, start = {}, 0
        for t in self.layout:
            out[t.name] = flat[start : start + t.numel].reshape(t.shape).copy()
            start += t.numel
        return out

    def encode(self) -> bytes:
        gaps = np.diff(self.positions, prepend=0).astype(np.uint64)
        positions = _varints(gaps)
        header = json.dumps({
            "tensors": [{"name": t.name, "shape": list(t.shape)} for t in self.layout],
            "count": int(self.positions.size), "scale": float(self.scale), "density": float(self.density),
            "alpha": float(self.alpha), "positions_bytes": len(positions),
        }, separators=(",", ":")).encode()
        signs = np.packbits(self.positive.astype(np.uint8)).tobytes()
        return _PREFIX.pack(MAGIC, FORMAT_VERSION, len(header)) + header + positions + signs


def compress(tensors: dict[str, np.ndarray], density: float, alpha: float = 1.0) -> CompeftTensors:
    """Global top-k by magnitude over all tensors (name order), ternarised at α · std(dense τ)."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], not {density}")
    layout = tuple(TensorLayout(n, tuple(int(d) for d in tensors[n].shape)) for n in sorted(tensors))
    tau = np.concatenate([np.asarray(tensors[t.name], dtype=np.float64).ravel() for t in layout])  # [total]
    if tau.size == 0:
        raise ValueError("nothing to compress: the tensors are empty")
    k = min(tau.size, max(1, round(density * tau.size)))
    kept = np.sort(np.argpartition(np.abs(tau), tau.size - k)[tau.size - k :]).astype(np.int64)
    scale = float(alpha * tau.std())
    return CompeftTensors(layout, kept, tau[kept] > 0, scale, density, alpha)


def from_ternary(tensors: dict[str, np.ndarray]) -> CompeftTensors:
    """Exact encoding of tensors already in {-s, 0, +s} (one s for all): what `decode(...).to_dense()`
    gives back bit for bit."""
    layout = tuple(TensorLayout(n, tuple(int(d) for d in tensors[n].shape)) for n in sorted(tensors))
    flat = np.concatenate([np.asarray(tensors[t.name], dtype=np.float32).ravel() for t in layout])
    kept = np.flatnonzero(flat).astype(np.int64)
    magnitudes = np.unique(np.abs(flat[kept]))
    if magnitudes.size > 1:
        raise ValueError(f"not ternary: {magnitudes.size} distinct non-zero magnitudes")
    scale = float(magnitudes[0]) if magnitudes.size else 0.0
    density = kept.size / flat.size if flat.size else 0.0
    return CompeftTensors(layout, kept, flat[kept] > 0, scale, density, 1.0)


def decode(data: bytes) -> CompeftTensors:
    if len(data) < _PREFIX.size:
        raise _bad("shorter than its fixed prefix (truncated?)")
    magic, version, header_len = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise _bad(f"bad magic {magic!r}, expected {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise _bad(f"format version {version} is not supported (only {FORMAT_VERSION})")
    if header_len > _MAX_HEADER_BYTES or _PREFIX.size + header_len > len(data):
        raise _bad("header length runs past the end of the file (truncated?)")
    header = _header(data[_PREFIX.size : _PREFIX.size + header_len])
    layout, count, positions_len = header["layout"], header["count"], header["positions_bytes"]
    start = _PREFIX.size + header_len
    signs_len = (count + 7) // 8
    if start + positions_len + signs_len != len(data):
        raise _bad(f"{len(data)} bytes, but the header describes {start + positions_len + signs_len}")
    gaps = _read_varints(data[start : start + positions_len], count)
    total = sum(t.numel for t in layout)
    if count and ((gaps[1:] == 0).any() or int(gaps.sum(dtype=np.uint64)) >= total or gaps.max() >= total):
        raise _bad("positions are not strictly increasing within the tensors")
    positions = np.cumsum(gaps, dtype=np.uint64).astype(np.int64)
    bits = np.unpackbits(np.frombuffer(data, np.uint8, signs_len, start + positions_len))[:count]
    return CompeftTensors(layout, positions, bits.astype(bool), header["scale"], header["density"],
                          header["alpha"])


def _header(raw: bytes) -> dict:
    try:
        h = json.loads(raw)
        layout = tuple(TensorLayout(str(t["name"]), tuple(int(d) for d in t["shape"])) for t in h["tensors"])
        parsed = {"layout": layout, "count": int(h["count"]), "scale": float(h["scale"]),
                  "density": float(h.get("density", 0.0)), "alpha": float(h.get("alpha", 1.0)),
                  "positions_bytes": int(h["positions_bytes"])}
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise _bad(f"header is not the documented JSON ({e})") from e
    if any(d < 0 for t in layout for d in t.shape) or len({t.name for t in layout}) != len(layout):
        raise _bad("header has negative dimensions or repeated tensor names")
    if not 0 <= parsed["count"] <= sum(t.numel for t in layout) or parsed["positions_bytes"] < 0:
        raise _bad("header count or positions_bytes out of range")
    if not math.isfinite(parsed["scale"]):
        raise _bad("scale is not finite")
    return parsed


def _bad(what: str) -> InvalidAdapterError:
    return InvalidAdapterError(f"{FILENAME} is not a valid ComPEFT file: {what}")


def _varints(values: np.ndarray) -> bytes:
    """Unsigned LEB128 of each value, concatenated (vectorised)."""
    values = values.astype(np.uint64)
    if values.size == 0:
        return b""
    bit_length = np.zeros(values.size, dtype=np.int64)
    v = values.copy()
    while v.any():
        bit_length += v > 0
        v >>= np.uint64(1)
    nbytes = np.maximum(1, -(-bit_length // 7))  # [n] bytes per value
    starts = np.cumsum(nbytes) - nbytes
    out = np.zeros(int(nbytes.sum()), dtype=np.uint8)
    for k in range(int(nbytes.max())):
        has = nbytes > k
        chunk = (values[has] >> np.uint64(7 * k)) & np.uint64(0x7F)
        more = (nbytes[has] > k + 1).astype(np.uint64) << np.uint64(7)
        out[starts[has] + k] = (chunk | more).astype(np.uint8)
    return out.tobytes()


def _read_varints(raw: bytes, count: int) -> np.ndarray:
    b = np.frombuffer(raw, dtype=np.uint8)
    ends = np.flatnonzero(b < 0x80)  # the last byte of each varint
    if ends.size != count or (b.size and ends[-1] != b.size - 1):
        raise _bad(f"positions hold {ends.size} complete varints, expected {count}")
    if count == 0:
        return np.zeros(0, dtype=np.uint64)
    starts = np.concatenate([[0], ends[:-1] + 1])
    lengths = ends - starts + 1
    if lengths.max() > _MAX_VARINT_BYTES:
        raise _bad("a position varint is longer than 10 bytes")
    owner = np.repeat(np.arange(count), lengths)
    shift = (np.arange(b.size) - starts[owner]).astype(np.uint64) * np.uint64(7)
    parts = (b & 0x7F).astype(np.uint64) << shift
    return np.add.reduceat(parts, starts)
