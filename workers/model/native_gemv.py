"""Kernel candidates of our own for the few-row GEMMs of a decode step (workers/model/gemv.c): fp32, fp16 and
int8 weights, fp32 tokens, AVX2 + FMA + F16C, both threads reading W once.

Why: a decode step is a stream of weight reads, and torch's kernels leave bandwidth unused on some CPUs — MKL's
one-row GEMV runs on one thread on AMD, and ATen's weight-only int8 GEMM is vectorized for AVX-512 only (on AVX2
it read 1-2 GB/s of a 15-20 GB/s memory). These are candidates like any other: raced per shape, row bucket and
dtype against torch's (workers.model.kernel_choice), chosen only where they measure faster, tested equal to
F.linear.

The source is compiled on first use with the system C compiler (gcc or $CC, the one torch.compile uses) into
`{cache dir}/native/`, keyed by the source, the flags and the compiler, and loaded with ctypes (OpenMP binds to the
runtime torch has loaded: one thread pool). Where there is no compiler, no AVX2/FMA/F16C, tokens that are not
fp32 on a CPU, or an autograd graph to keep, a candidate raises NotImplementedError and the race leaves it out.
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

from workers.model.kernel_choice import cache_root, cpu_info

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("gemv.c")
FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC")
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
    for name, pointers in (("gemv_f32", 4), ("gemv_f16", 4), ("gemv_i8", 5)):
        getattr(lib, name).argtypes = [p] * pointers + [i64] * 4 + [ctypes.c_int]
        getattr(lib, name).restype = None
    lib.lora_bgmv_f32.argtypes = [p] * 6 + [i64] * 5 + [ctypes.c_int]
    lib.lora_bgmv_f32.restype = i64
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


WEIGHT_DTYPES = {"gemv_f32": torch.float32, "gemv_f16": torch.float16, "gemv_i8": torch.int8}


def _run(fn_name: str, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, prefetch: int,
         scale: torch.Tensor | None = None) -> torch.Tensor:
    """y [N, out] = scale · (x · Wᵀ) + b, x [N, in] fp32 on the CPU, W [out, in]; scale (gemv_i8 only) and b [out].
    A decode step calls this ~200 times: it is kept to what must be checked (~3 µs)."""
    if x.dtype != torch.float32 or w.dtype != WEIGHT_DTYPES[fn_name] or not x.is_cpu:
        raise NotImplementedError(f"the native GEMV takes fp32 tokens and {WEIGHT_DTYPES[fn_name]} weights on a CPU, "
                                  f"not {x.dtype} tokens and {w.dtype} weights on {x.device}")
    if (x.requires_grad or w.requires_grad) and torch.is_grad_enabled():
        raise NotImplementedError("the native GEMV keeps no autograd graph")
    x, w = x.contiguous(), w.contiguous()
    if b is not None:
        b = b.float().contiguous()
    (n, x_in), (out_f, in_f) = x.shape, w.shape
    if x_in != in_f or (b is not None and b.numel() != out_f) or (scale is not None and scale.numel() != out_f):
        raise ValueError(f"shapes do not fit: x {tuple(x.shape)}, W {tuple(w.shape)}, "  # C reads what they say
                         f"b {None if b is None else b.numel()}, scale {None if scale is None else scale.numel()}")
    y = torch.empty(n, out_f)  # [N, out]
    tail = (None if b is None else b.data_ptr(), y.data_ptr(), n, out_f, in_f, prefetch, torch.get_num_threads())
    if scale is None:
        getattr(library(), fn_name)(x.data_ptr(), w.data_ptr(), *tail)
    else:
        scale = scale.float().contiguous()
        getattr(library(), fn_name)(x.data_ptr(), w.data_ptr(), scale.data_ptr(), *tail)
    return y


def dense(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return _run("gemv_f32", x, w, b, 0)


def dense_prefetch(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return _run("gemv_f32", x, w, b, PREFETCH_BLOCKS)


def fp16(x: torch.Tensor, w16: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return _run("gemv_f16", x, w16, b, 0)


def fp16_prefetch(x: torch.Tensor, w16: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return _run("gemv_f16", x, w16, b, PREFETCH_BLOCKS)


def int8(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return _run("gemv_i8", x, q, b, 0, scales)


def int8_prefetch(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return _run("gemv_i8", x, q, b, PREFETCH_BLOCKS, scales)


def lora_bgmv(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, rows: torch.Tensor,
              mask: torch.Tensor) -> None:
    """y[:Bd] += each decode row's own LoRA, in place: y [N, out] and x [N, in] fp32, a [bank, in] and bt [bank, out]
    fp32, rows [Bd, R] long (bank rows of each decode row), mask [Bd, 1, R] (0 on padding)."""
    if not (y.dtype == x.dtype == a.dtype == bt.dtype == mask.dtype == torch.float32 and y.is_cpu):
        raise NotImplementedError(f"the native BGMV takes fp32 tokens and banks on a CPU, not {y.dtype} on {y.device}")
    if not (y.is_contiguous() and a.is_contiguous() and bt.is_contiguous()):
        raise NotImplementedError("the native BGMV writes a contiguous y from contiguous banks")
    if (x.requires_grad or a.requires_grad or bt.requires_grad) and torch.is_grad_enabled():
        raise NotImplementedError("the native BGMV keeps no autograd graph")
    bd, width = rows.shape
    if not (x.shape[1] == a.shape[1] and y.shape[1] == bt.shape[1] and a.shape[0] == bt.shape[0]
            and min(x.shape[0], y.shape[0]) >= bd and mask.numel() == bd * width and rows.dtype == torch.int64):
        raise ValueError(f"shapes do not fit: y {tuple(y.shape)}, x {tuple(x.shape)}, A {tuple(a.shape)}, "
                         f"Bt {tuple(bt.shape)}, rows {tuple(rows.shape)} {rows.dtype}, mask {tuple(mask.shape)}")
    x, rows, mask = x.contiguous(), rows.contiguous(), mask.contiguous()
    outside = library().lora_bgmv_f32(x.data_ptr(), a.data_ptr(), bt.data_ptr(), rows.data_ptr(), mask.data_ptr(),
                                      y.data_ptr(), bd, width, a.shape[1], bt.shape[1], a.shape[0],
                                      torch.get_num_threads())
    if outside:
        raise IndexError(f"{outside} bank rows outside the bank's {a.shape[0]}")
