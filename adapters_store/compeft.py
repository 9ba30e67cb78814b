"""ComPEFT: sparsify a PEFT update per tensor by top-k magnitude and ternarise it, in a compact binary format.

The update τ is every tensor of the adapter (for LoRA: the A and B matrices themselves, since their init
is not part of the update we store), taken in name order. Each tensor t is compressed on its own: it keeps
its `k_t = round(density · numel_t)` entries of largest magnitude (at least one), and each kept entry
becomes `sign(τ_i) · s_t` with `s_t = α · std(τ_t)`, the population standard deviation over the whole
dense tensor taken before sparsification (computed in float64, stored and applied as float32). Everything
else becomes 0. Decoding gives dense float32 tensors: a normal LoRA. (A tensor with std 0 — constant, e.g.
an untrained zero-init LoRA B — has s_t = 0: every kept entry would decode to 0, so none is stored.)

Why per tensor and not one global top-k with one scale (format 1): peft's LoRA B starts at zero and ends
~3× smaller than A, and magnitudes differ across layers and modules, so a global top-k keeps almost only
A entries and B·A vanishes. Per-tensor top-k and scale is the per-module variant of ComPEFT.

Binary format, version 2 (all integers little-endian):

    offset      size       field
    0           4          magic b"CPFT"
    4           1          format version = 2
    5           3          reserved, zero
    8           4          H: header length in bytes (uint32)
    12          8          P: positions length in bytes (uint64)
    20          H          header: a zlib stream (RFC 1950) of a UTF-8 JSON object:
                             "names":   [str, ...]         the T tensor names, unique, in tensor order
                                                        (the encoder writes them sorted)
                             "shapes":  [[int, ...], ...]  their shapes (≤ 2^48 entries in all)
                             "counts":  [int, ...]         k_t, kept entries per tensor, 0 ≤ k_t ≤ numel_t
                             "density": the requested density (informational)
                             "alpha":   α (informational)
    20+H        4·T        scales: T float32, s_t per tensor in tensor order; finite and ≥ 0. A kept entry
                           decodes to exactly ±s_t (bit for bit).
    20+H+4T     P          positions: n = Σ k_t unsigned LEB128 varints, tensor after tensor. Within each
                           tensor they are the gaps between its kept entries' row-major flat indices
                           (restarting at each tensor): the first is the first index, the rest are ≥ 1, and
                           every index is < numel_t
    20+H+4T+P   ⌈n/8⌉      signs: one bit per kept entry in the same order, 1 = positive, packed most
                           significant bit first (numpy.packbits), zero padding in the last byte

The file ends exactly there. A decoder refuses a bad magic, a version other than 2 (format 1 — global
top-k, one scale — had no released users and is refused with its own message), nonzero reserved bytes, a
header that is not the documented zlib-compressed JSON (or inflates past 16 MiB), non-finite or negative
scales, gaps that step out of their tensor or back, or any length mismatch.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from dataclasses import dataclass

import numpy as np

from adapters_store import bounded_json
from adapters_store.errors import InvalidAdapterError

MAGIC = b"CPFT"
FORMAT_VERSION = 2
FILENAME = "adapter_model.compeft"
_PREFIX = struct.Struct("<4sB3sIQ")
_MAX_HEADER_BYTES = 16 * 1024 * 1024  # inflated
_MAX_TOTAL = 2**48  # entries over all tensors: keeps every index and gap sum far from int64 overflow
_MAX_COUNT = 2**32 - 1
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
    """A ternary update. `positions` are flat indices into the tensors concatenated in layout order, sorted
    and unique; the first counts[0] lie in tensor 0, the next counts[1] in tensor 1, and so on. Each kept
    entry decodes to ±scales[t] of its tensor t."""

    layout: tuple[TensorLayout, ...]
    counts: np.ndarray  # [T] int64, kept entries per tensor
    positions: np.ndarray  # [n] int64, strictly increasing, each inside its tensor's range
    positive: np.ndarray  # [n] bool
    scales: np.ndarray  # [T] float32, ≥ 0
    density: float
    alpha: float

    @property
    def total(self) -> int:
        return sum(t.numel for t in self.layout)

    def offsets(self) -> np.ndarray:
        """[T] int64: where each tensor starts in the flat concatenation."""
        numel = np.array([t.numel for t in self.layout], dtype=np.int64)
        return np.cumsum(numel) - numel

    def to_dense(self) -> dict[str, np.ndarray]:
        flat = np.zeros(self.total, dtype=np.float32)  # flat: [total]
        magnitude = np.repeat(np.asarray(self.scales, dtype=np.float32), self.counts)  # [n]
        flat[self.positions] = np.where(self.positive, magnitude, -magnitude)
        out, start = {}, 0
        for t in self.layout:
            out[t.name] = flat[start : start + t.numel].reshape(t.shape).copy()
            start += t.numel
        return out

    def encode(self) -> bytes:
        counts = np.asarray(self.counts, dtype=np.int64)
        local = self.positions - np.repeat(self.offsets(), counts)  # [n] index within its tensor
        gaps = np.diff(local, prepend=0)
        firsts = _segment_starts(counts)
        gaps[firsts] = local[firsts]
        positions = _varints(gaps.astype(np.uint64))
        header = zlib.compress(json.dumps({
            "names": [t.name for t in self.layout], "shapes": [list(t.shape) for t in self.layout],
            "counts": [int(c) for c in counts], "density": float(self.density), "alpha": float(self.alpha),
        }, separators=(",", ":")).encode(), 9)
        scales = np.asarray(self.scales, dtype="<f4").tobytes()
        signs = np.packbits(self.positive.astype(np.uint8)).tobytes()
        prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, b"\0\0\0", len(header), len(positions))
        return prefix + header + scales + positions + signs


def compress(tensors: dict[str, np.ndarray], density: float, alpha: float = 1.0) -> CompeftTensors:
    """Per tensor (name order): top round(density · numel) by magnitude (≥ 1), ternarised at α · std(tensor)."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], not {density}")
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a positive finite number, not {alpha}")
    layout = _layout(tensors)
    if sum(t.numel for t in layout) == 0:
        raise ValueError("nothing to compress: the tensors are empty")
    kept_at = []
    for t in layout:
        x = np.asarray(tensors[t.name], dtype=np.float64).ravel()  # x: [numel]
        scale = np.float32(alpha * x.std()) if x.size else np.float32(0.0)
        if not np.isfinite(scale):
            raise ValueError(f"{t.name}: not finite")
        k = min(x.size, max(1, round(density * x.size))) if scale > 0 else 0
        kept = np.sort(np.argpartition(np.abs(x), x.size - k)[x.size - k :]).astype(np.int64) if k else \
            np.zeros(0, dtype=np.int64)
        kept_at.append((kept, x[kept] > 0, scale))
    return _assemble(layout, kept_at, density, alpha)


def from_ternary(tensors: dict[str, np.ndarray]) -> CompeftTensors:
    """Exact encoding of tensors each already in {-s_t, 0, +s_t} (one s_t per tensor): what
    `decode(...).to_dense()` gives back bit for bit (up to the sign of zero)."""
    layout = _layout(tensors)
    kept_at = []
    for t in layout:
        flat = np.asarray(tensors[t.name], dtype=np.float32).ravel()
        kept = np.flatnonzero(flat).astype(np.int64)
        magnitudes = np.unique(np.abs(flat[kept]))
        if magnitudes.size > 1:
            raise ValueError(f"{t.name}: not ternary: {magnitudes.size} distinct non-zero magnitudes")
        if magnitudes.size and not np.isfinite(magnitudes[0]):
            raise ValueError(f"{t.name}: not finite")
        kept_at.append((kept, flat[kept] > 0, magnitudes[0] if magnitudes.size else np.float32(0.0)))
    total, n = sum(t.numel for t in layout), sum(k.size for k, _, _ in kept_at)
    return _assemble(layout, kept_at, n / total if total else 0.0, 1.0)


def decode(data: bytes) -> CompeftTensors:
    if len(data) >= 5:  # magic and version first: they say what kind of file this is at all
        magic, version = bytes(data[:4]), data[4]
        if magic != MAGIC:
            raise _bad(f"bad magic {magic!r}, expected {MAGIC!r}")
        if version == 1:
            raise _bad("format version 1 (one global top-k and scale) is no longer supported: re-compress "
                       f"the adapter (format {FORMAT_VERSION})")
        if version != FORMAT_VERSION:
            raise _bad(f"format version {version} is not supported (only {FORMAT_VERSION})")
    if len(data) < _PREFIX.size:
        raise _bad("shorter than its fixed prefix (truncated?)")
    _, _, reserved, header_len, positions_len = _PREFIX.unpack_from(data)
    if reserved != b"\0\0\0":
        raise _bad("reserved bytes are not zero")
    start = _PREFIX.size
    if start + header_len > len(data):
        raise _bad("header length runs past the end of the file (truncated?)")
    layout, counts, density, alpha = _header(data[start : start + header_len])
    start += header_len
    n = int(counts.sum())
    scales_len, signs_len = 4 * len(layout), (n + 7) // 8
    expected = start + scales_len + positions_len + signs_len
    if expected != len(data):
        raise _bad(f"{len(data)} bytes, but the header describes {expected}")
    scales = np.frombuffer(data, "<f4", len(layout), start).astype(np.float32)
    if not (np.isfinite(scales).all() and (scales >= 0).all()):
        raise _bad("a scale is not finite or is negative")
    start += scales_len
    gaps = _read_varints(data[start : start + positions_len], n)
    positions = _flat_positions(gaps, counts, layout)
    start += positions_len
    bits = np.unpackbits(np.frombuffer(data, np.uint8, signs_len, start))[:n]
    return CompeftTensors(layout, counts, positions, bits.astype(bool), scales, density, alpha)


def _layout(tensors: dict[str, np.ndarray]) -> tuple[TensorLayout, ...]:
    layout = tuple(TensorLayout(n, tuple(int(d) for d in tensors[n].shape)) for n in sorted(tensors))
    if sum(t.numel for t in layout) > _MAX_TOTAL:
        raise ValueError(f"more than the format's {_MAX_TOTAL} entries")
    return layout


def _assemble(layout: tuple[TensorLayout, ...], kept_at: list[tuple[np.ndarray, np.ndarray, np.float32]],
              density: float, alpha: float) -> CompeftTensors:
    """Per tensor (its kept local indices, their signs, its scale) → a CompeftTensors with flat positions."""
    numel = np.array([t.numel for t in layout], dtype=np.int64)
    offsets = np.cumsum(numel) - numel
    flat = [kept.astype(np.int64) + off for (kept, _, _), off in zip(kept_at, offsets, strict=True)]
    return CompeftTensors(
        layout, np.array([k.size for k, _, _ in kept_at], dtype=np.int64),
        np.concatenate([np.zeros(0, np.int64), *flat]),
        np.concatenate([np.zeros(0, bool), *(p for _, p, _ in kept_at)]).astype(bool),
        np.array([s for _, _, s in kept_at], dtype=np.float32), density, alpha)


def _segment_starts(counts: np.ndarray) -> np.ndarray:
    """Indices (into the n kept entries) of the first entry of each non-empty tensor."""
    starts = np.cumsum(counts) - counts
    return starts[counts > 0]


def _flat_positions(gaps: np.ndarray, counts: np.ndarray, layout: tuple[TensorLayout, ...]) -> np.ndarray:
    """Per-tensor gaps → flat indices into the concatenation, refusing any that leave their tensor."""
    if gaps.size == 0:
        return np.zeros(0, dtype=np.int64)
    numel = np.array([t.numel for t in layout], dtype=np.int64)
    limit = np.repeat(numel, counts).astype(np.uint64)  # [n] numel of each entry's tensor
    firsts = _segment_starts(counts)
    later = np.ones(gaps.size, dtype=bool)
    later[firsts] = False
    if (gaps >= limit).any() or (gaps[later] == 0).any():
        raise _bad("positions are not strictly increasing within their tensors")
    # A valid file's gaps sum to less than Σ numel ≤ 2^48; checked in float64 first, so that the exact
    # running sum below cannot wrap around.
    if float(gaps.sum(dtype=np.float64)) > 2.0 * float(numel.sum()) + 1.0:
        raise _bad("positions are not strictly increasing within their tensors")
    running = np.cumsum(gaps, dtype=np.uint64).astype(np.int64)  # [n]
    base = running[firsts] - gaps[firsts].astype(np.int64)  # running sum before each tensor
    local = running - np.repeat(base, counts[counts > 0])
    if (local >= limit.astype(np.int64)).any():
        raise _bad("positions are not strictly increasing within their tensors")
    return local + np.repeat(np.cumsum(numel) - numel, counts)


def _header(raw: bytes) -> tuple[tuple[TensorLayout, ...], np.ndarray, float, float]:
    inflater = zlib.decompressobj()
    try:
        text = inflater.decompress(raw, _MAX_HEADER_BYTES)
    except zlib.error as e:
        raise _bad(f"header is not a zlib stream ({e})") from e
    if inflater.unconsumed_tail:
        raise _bad(f"header inflates past {_MAX_HEADER_BYTES} bytes")
    if not inflater.eof or inflater.unused_data:
        raise _bad("header zlib stream is truncated or has trailing bytes")
    try:
        h = bounded_json.loads(text)
        names, shapes, counts = h["names"], h["shapes"], h["counts"]
        if not (isinstance(names, list) and isinstance(shapes, list) and isinstance(counts, list)):
            raise TypeError("names, shapes and counts must be lists")
        if not all(isinstance(n, str) for n in names):
            raise TypeError("names must be strings")
        if not (len(names) == len(shapes) == len(counts)):
            raise ValueError("names, shapes and counts differ in length")
        layout = tuple(TensorLayout(n, tuple(_int(d) for d in s)) for n, s in zip(names, shapes, strict=True))
        counts = [_int(c) for c in counts]
        density, alpha = float(h.get("density", 0.0)), float(h.get("alpha", 1.0))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise _bad(f"header is not the documented JSON ({e})") from e
    if any(d < 0 for t in layout for d in t.shape) or len(set(names)) != len(names):
        raise _bad("header has negative dimensions or repeated tensor names")
    if sum(t.numel for t in layout) > _MAX_TOTAL:
        raise _bad(f"the tensors hold more than {_MAX_TOTAL} entries")
    if any(not 0 <= c <= min(t.numel, _MAX_COUNT) for c, t in zip(counts, layout, strict=True)):
        raise _bad("a tensor's count is out of range")
    return layout, np.array(counts, dtype=np.int64), density, alpha


def _int(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{value!r} is not an integer")
    return value


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
