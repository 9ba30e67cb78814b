"""Kernel candidates of our own for the few-row GEMMs of a decode step (workers/model/gemv.c): fp32, fp16 and
int8 weights with fp32 tokens, or bf16 weights with bf16 tokens (summed in fp32), AVX2 + FMA + F16C, both threads
reading W once.

Why: a decode step is a stream of weight reads, and torch's kernels leave bandwidth unused on some CPUs — MKL's
one-row GEMV runs on one thread on AMD; ATen's weight-only int8 GEMM is vectorized for AVX-512 only (on AVX2 it
read 1-2 GB/s of a 15-20 GB/s memory); torch's one-row bf16 GEMMs read 12-19 GB/s of a ~50 GB/s memory on an
EPYC with AVX512-BF16, where widening bf16 to fp32 (a shift) as W streams read 34. These are candidates like any
other: raced per shape, row bucket and dtype against torch's (workers.model.kernel_choice), chosen only where they
measure faster, tested equal to F.linear.

The source is compiled on first use with the system C compiler (gcc or $CC, the one torch.compile uses) into
`{cache dir}/native/`, keyed by the source, the flags and the compiler, and loaded with ctypes (OpenMP binds to the
runtime torch has loaded: one thread pool). Where there is no compiler, no AVX2/FMA/F16C, tokens that are not fp32
(bf16 for bf16 weights) on a CPU, or an autograd graph to keep, a candidate raises NotImplementedError and the race
leaves it out.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

from workers.model.kernel_choice import cache_root, cpu_info, packed_beside

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("gemv.c")
FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC", "-lm")
CPU_FLAGS = {"avx2", "fma", "f16c"}
PREFETCH_BLOCKS = 4  # the prefetching variant asks for W's rows this many 4-row blocks ahead

_lock = threading.Lock()
_library: ctypes.CDLL | NotImplementedError | None = None  # loaded, or why it cannot be


def _compiler() -> tuple[str, str]:
    """(the compiler's path, its version line); NotImplementedError where there is none."""
    cc = shutil.which(os.environ.get("CC") or "gcc") or shutil.which("cc")
    if cc is None:
        raise NotImplementedError("no C compiler (gcc or $CC) to build the native GEMV with")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout
    return cc, version.partition("\n")[0]


def _build() -> ctypes.CDLL:
    missing = CPU_FLAGS - cpu_info()[1]
    if missing:
        raise NotImplementedError(f"the native GEMV needs {', '.join(sorted(missing))}, which this CPU lacks")
    cc, version = _compiler()
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join((*FLAGS, version)).encode()).hexdigest()[:16]
    target = cache_root() / "native" / f"gemv-{digest}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".gemv-", suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            done = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise NotImplementedError(f"building the native GEMV failed: {done.stderr.strip()[-500:]}")
            os.replace(tmp, target)  # atomic: another process may build the same file at once
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        log.info("built the native GEMV: %s", target)
    lib = ctypes.CDLL(str(target))
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    for name, pointers in (("gemv_f32", 4), ("gemv_f16", 4), ("gemv_i8", 5), ("gemv_bf16", 4), ("gemv_f32_packed", 5),
                           ("gemv_f16_packed", 5), ("gemv_i8_packed", 5), ("gemv_bf16_packed", 5)):
        getattr(lib, name).argtypes = [p] * pointers + [i64] * 4 + [ctypes.c_int]
        getattr(lib, name).restype = ctypes.c_int if name.startswith("gemv_bf16") else None
    for bgmv in (lib.lora_bgmv_f32, lib.lora_bgmv_bf16, lib.lora_bgmv_packed_f32, lib.lora_bgmv_packed_bf16):
        bgmv.argtypes, bgmv.restype = [p] * 6 + [i64] * 5 + [ctypes.c_int], i64
    for suffix in ("_f32", "_bf16"):
        norm, rope, attention = (getattr(lib, op + suffix) for op in ("add_rms_norm", "rope_write", "decode_attention"))
        norm.argtypes, norm.restype = [p] * 5 + [i64] * 2 + [ctypes.c_float, ctypes.c_int], None
        rope.argtypes, rope.restype = [p] * 8 + [i64] * 5, i64
        attention.argtypes, attention.restype = [p] * 5 + [i64] * 7 + [ctypes.c_int], None
    return lib


def library() -> ctypes.CDLL:
    """The built library (built once per process; the file once per machine); NotImplementedError if it cannot be."""
    global _library
    if not isinstance(_library, ctypes.CDLL):
        with _lock:
            if _library is None:
                try:
                    _library = _build()
                except (NotImplementedError, OSError) as e:
                    _library = e if isinstance(e, NotImplementedError) else NotImplementedError(f"native GEMV: {e}")
                    log.info("native GEMV unavailable: %s", _library)
            if isinstance(_library, NotImplementedError):
                raise _library
    return _library


WEIGHT_DTYPES = {"gemv_f32": torch.float32, "gemv_f16": torch.float16, "gemv_i8": torch.int8,
                 "gemv_bf16": torch.bfloat16}
FLOAT_KERNELS = {torch.float32: "gemv_f32", torch.bfloat16: "gemv_bf16"}  # a dense weight's dtype → its kernel
PACKED_ROWS, PACKED_COLUMNS = 4, 8  # gemv.c's ROWS, and the weights of a row one load reads


def packed_shape(out_features: int, in_features: int) -> tuple[int, int, int, int]:
    return -(-out_features // PACKED_ROWS), -(-in_features // PACKED_COLUMNS), PACKED_ROWS, PACKED_COLUMNS


def pack_rows(w: torch.Tensor) -> torch.Tensor:
    """W [out, in] → [ceil(out/4), ceil(in/8), 4, 8], zero padded: each block of 4 rows as one sequential stream, 8
    weights of each row in turn (what the `*_packed` kernels read)."""
    out_f, in_f = w.shape
    padded = F.pad(w, (0, -in_f % PACKED_COLUMNS, 0, -out_f % PACKED_ROWS))  # [out', in']
    blocks = padded.view(padded.shape[0] // PACKED_ROWS, PACKED_ROWS, padded.shape[1] // PACKED_COLUMNS, PACKED_COLUMNS)
    return blocks.transpose(1, 2).contiguous()


def packed(w: torch.Tensor) -> torch.Tensor:
    """pack_rows(w), made once and kept beside w (made again when w has been written in place): the packed
    candidates cost a second copy of each weight they serve."""
    return packed_beside(w, "_gemv_packed", pack_rows)


def _run(fn_name: str, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, prefetch: int,
         scale: torch.Tensor | None = None, packed_w: torch.Tensor | None = None) -> torch.Tensor:
    """y [N, out] = scale · (x · Wᵀ) + b, x [N, in] on the CPU (fp32; bf16 for gemv_bf16, and y then bf16), W
    [out, in]; scale (gemv_i8 only) and b [out]; packed_w: pack_rows(W), which a `*_packed` kernel reads instead of W.
    A decode step calls this ~200 times: it is kept to what must be checked (~3 µs)."""
    weight_dtype = WEIGHT_DTYPES[fn_name.removesuffix("_packed")]
    token_dtype = torch.bfloat16 if weight_dtype == torch.bfloat16 else torch.float32
    if x.dtype != token_dtype or w.dtype != weight_dtype or not x.is_cpu:
        raise NotImplementedError(f"the native GEMV takes {token_dtype} tokens and {weight_dtype} weights on a CPU, "
                                  f"not {x.dtype} tokens and {w.dtype} weights on {x.device}")
    if (x.requires_grad or w.requires_grad) and torch.is_grad_enabled():
        raise NotImplementedError("the native GEMV keeps no autograd graph")
    x = x.contiguous()
    if packed_w is None:
        w = w.contiguous()
    elif packed_w.dtype != w.dtype or packed_w.shape != packed_shape(*w.shape) or not packed_w.is_contiguous():
        raise ValueError(f"weights {tuple(packed_w.shape)} {packed_w.dtype} are not pack_rows(W {tuple(w.shape)})")
    if b is not None:
        b = b.float().contiguous()
    (n, x_in), (out_f, in_f) = x.shape, w.shape
    if x_in != in_f or (b is not None and b.numel() != out_f) or (scale is not None and scale.numel() != out_f):
        raise ValueError(f"shapes do not fit: x {tuple(x.shape)}, W {tuple(w.shape)}, "  # C reads what they say
                         f"b {None if b is None else b.numel()}, scale {None if scale is None else scale.numel()}")
    y = torch.empty(n, out_f, dtype=token_dtype)  # [N, out]
    tail = (None if b is None else b.data_ptr(), y.data_ptr(), n, out_f, in_f, prefetch, torch.get_num_threads())
    scale = None if scale is None else scale.float().contiguous()
    # gemv_i8 and every packed kernel take a scale pointer (NULL for the float formats); gemv_f32/f16 none
    scale_arg = () if scale is None and packed_w is None else (None if scale is None else scale.data_ptr(),)
    weights = (w if packed_w is None else packed_w).data_ptr()
    if getattr(library(), fn_name)(x.data_ptr(), weights, *scale_arg, *tail):  # only the bf16 kernels return
        raise MemoryError(f"{fn_name}: no memory to widen {n}x{in_f} bf16 tokens")
    return y


def _float_kernel(w: torch.Tensor) -> str:
    kernel = FLOAT_KERNELS.get(w.dtype)
    if kernel is None:
        raise NotImplementedError(f"the native GEMV has no kernel for dense {w.dtype} weights")
    return kernel


def dense(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x Wᵀ + b, W fp32 (fp32 tokens) or bf16 (bf16 tokens)."""
    return _run(_float_kernel(w), x, w, b, 0)


def dense_prefetch(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return _run(_float_kernel(w), x, w, b, PREFETCH_BLOCKS)


def fp16(x: torch.Tensor, w16: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return _run("gemv_f16", x, w16, b, 0)


def fp16_prefetch(x: torch.Tensor, w16: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return _run("gemv_f16", x, w16, b, PREFETCH_BLOCKS)


def int8(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return _run("gemv_i8", x, q, b, 0, scales)


def int8_prefetch(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return _run("gemv_i8", x, q, b, PREFETCH_BLOCKS, scales)


def dense_packed(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return _run(_float_kernel(w) + "_packed", x, w, b, PREFETCH_BLOCKS, packed_w=packed(w))


def fp16_packed(x: torch.Tensor, w16: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return _run("gemv_f16_packed", x, w16, b, PREFETCH_BLOCKS, packed_w=packed(w16))


def int8_packed(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return _run("gemv_i8_packed", x, q, b, PREFETCH_BLOCKS, scales, packed(q))


LAYER_SUFFIX = {torch.float32: "_f32", torch.bfloat16: "_bf16"}  # the layer ops' C functions, by dtype


def _layer_op(name: str, *tensors: torch.Tensor) -> ctypes._CFuncPtr:
    """The C function `name` of the tensors' dtype; NotImplementedError unless they are all fp32 or all bf16, on a
    CPU, with no autograd graph to keep."""
    dtype = tensors[0].dtype
    if dtype not in LAYER_SUFFIX or any(t.dtype != dtype or not t.is_cpu for t in tensors):
        raise NotImplementedError("the native layer ops take fp32 or bf16 tensors (all of one dtype) on a CPU")
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise NotImplementedError("the native layer ops keep no autograd graph")
    return getattr(library(), name + LAYER_SUFFIX[dtype])


def lora_bgmv(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, rows: torch.Tensor,
              mask: torch.Tensor, packed_banks: bool = False) -> None:
    """y[:Bd] += each decode row's own LoRA, in place: y [N, out] and x [N, in], a [bank, in] and bt [bank, out], mask
    [Bd, 1, R] (0 on padding), all fp32 or all bf16 (sums in fp32, y rounded once); rows [Bd, R] long (bank rows of
    each decode row). packed_banks: read copies of a and bt packed by blocks of four rows (`packed`: made once, kept
    beside each bank view, made again after a write to the bank, i.e. after an adapter load), one sequential stream
    per block."""
    op = _layer_op("lora_bgmv_packed" if packed_banks else "lora_bgmv", y, x, a, bt, mask)
    if not (y.is_contiguous() and a.is_contiguous() and bt.is_contiguous()):
        raise NotImplementedError("the native BGMV writes a contiguous y from contiguous banks")
    bd, width = rows.shape
    if not (x.shape[1] == a.shape[1] and y.shape[1] == bt.shape[1] and a.shape[0] == bt.shape[0]
            and min(x.shape[0], y.shape[0]) >= bd and mask.numel() == bd * width and rows.dtype == torch.int64):
        raise ValueError(f"shapes do not fit: y {tuple(y.shape)}, x {tuple(x.shape)}, A {tuple(a.shape)}, "
                         f"Bt {tuple(bt.shape)}, rows {tuple(rows.shape)} {rows.dtype}, mask {tuple(mask.shape)}")
    x, rows, mask = x.contiguous(), rows.contiguous(), mask.contiguous()
    a_read, bt_read = (packed(a), packed(bt)) if packed_banks else (a, bt)
    outside = op(x.data_ptr(), a_read.data_ptr(), bt_read.data_ptr(), rows.data_ptr(), mask.data_ptr(), y.data_ptr(),
                 bd, width, a.shape[1], bt.shape[1], a.shape[0], torch.get_num_threads())
    if outside:
        raise IndexError(f"{outside} bank rows outside the bank's {a.shape[0]}")


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, RMSNorm(s) · weight) with s = x + delta (delta None: s = x), x and delta [N, dim], weight [dim], all fp32
    or all bf16 (rounded where RMSNorm.reference rounds). ~60 calls a decode step: kept to what must be checked."""
    op = _layer_op("add_rms_norm", x, weight) if delta is None else _layer_op("add_rms_norm", x, weight, delta)
    n, dim = x.shape
    if weight.shape[0] != dim or (delta is not None and delta.shape != x.shape):
        raise ValueError(f"shapes do not fit: x {tuple(x.shape)}, delta {None if delta is None else tuple(delta.shape)}"
                         f", weight {tuple(weight.shape)}")
    x, h = x.contiguous(), torch.empty(n, dim, dtype=x.dtype)
    s = x if delta is None else torch.empty(n, dim, dtype=x.dtype)
    op(x.data_ptr(), None if delta is None else delta.contiguous().data_ptr(),
       weight.contiguous().data_ptr(), s.data_ptr(), h.data_ptr(), n, dim, eps, torch.get_num_threads())
    return s, h


def rope_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               k_rows: torch.Tensor, v_rows: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """q [N, H, D] and k [N, KVH, D] rotated in place (cos, signed sin [N, 1, D]; workers.model.rope.apply_rope),
    k and v then written to rows `rows` [N · KVH] of k_rows and v_rows (a layer's cache as [cache rows, D]); returns
    q. All fp32 or all bf16 (rounded where apply_rope rounds). Rows outside the cache raise IndexError before anything
    is written or rotated."""
    op = _layer_op("rope_write", q, k, v, cos, sin, k_rows, v_rows)
    (n, hq, dim), hk = q.shape, k.shape[1]
    if not (q.is_contiguous() and k.is_contiguous() and k_rows.is_contiguous() and v_rows.is_contiguous()):
        raise NotImplementedError("the native RoPE rotates contiguous q and k in place into a contiguous cache")
    if not (k.shape == v.shape == (n, hk, dim) and cos.numel() == sin.numel() == n * dim and dim % 2 == 0
            and k_rows.shape == v_rows.shape and k_rows.shape[1] == dim and rows.shape == (n * hk,)
            and rows.dtype == torch.int64):
        raise ValueError(f"shapes do not fit: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, cos "
                         f"{tuple(cos.shape)}, cache {tuple(k_rows.shape)}, rows {tuple(rows.shape)} {rows.dtype}")
    v, cos, sin, rows = v.contiguous(), cos.contiguous(), sin.contiguous(), rows.contiguous()
    outside = op(q.data_ptr(), k.data_ptr(), v.data_ptr(), cos.data_ptr(), sin.data_ptr(), k_rows.data_ptr(),
                 v_rows.data_ptr(), rows.data_ptr(), n, hq, hk, dim, k_rows.shape[0])
    if outside:
        raise IndexError(f"{outside} cache rows outside the cache's {k_rows.shape[0]}")
    return q


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
                     threads: int) -> torch.Tensor:
    """SDPA of one query token per row, [Bd, H, 1, D], over keys and values [Bd, KVH, S, D] (views of the cache:
    positions contiguous, rows and heads strided alike) with a [Bd, 1, 1, S] bool mask or None; threads: 1 or
    torch's (the race picks). All fp32 or all bf16 (sums in fp32, the output rounded once)."""
    op = _layer_op("decode_attention", q, keys, values)
    bd, hq, _, dim = q.shape
    hk, length = keys.shape[1], keys.shape[2]
    if keys.stride() != values.stride() or keys.stride(3) != 1 or keys.stride(2) != dim:
        raise NotImplementedError("the native attention reads keys and values laid out as the cache's rows")
    if not (q.shape[2] == 1 and keys.shape == values.shape == (bd, hk, length, dim) and hq % hk == 0
            and (mask is None or (mask.dtype == torch.bool and mask.numel() == bd * length))):
        raise ValueError(f"shapes do not fit: q {tuple(q.shape)}, keys {tuple(keys.shape)}, values "
                         f"{tuple(values.shape)}, mask {None if mask is None else (tuple(mask.shape), mask.dtype)}")
    q, out = q.contiguous(), torch.empty(bd, hq, 1, dim, dtype=q.dtype)
    mask = None if mask is None else mask.contiguous()
    op(q.data_ptr(), keys.data_ptr(), values.data_ptr(), None if mask is None else mask.data_ptr(), out.data_ptr(), bd,
       hq, hk, length, dim, keys.stride(0), keys.stride(1), threads)
    return out
