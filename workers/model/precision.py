"""Which dtype the base weights are held in: `auto` on a CPU with native bf16 instructions (AVX512-BF16, AMX-BF16,
Arm's BF16) measures the model's own GEMM shapes in bfloat16 against float32 and keeps bfloat16 only where it is
faster; on a CPU without them `auto` is float32 (bf16 rounds every activation, and the native GEMV widens bf16
weights fast on any AVX2 CPU, so speed alone would pick it there too: `--quantize fp16` is the half-size base
that keeps fp32 activations); on CUDA `auto` is bfloat16. An explicit dtype is taken as given; None keeps the
oracle path (float32 on CPU, bfloat16 on CUDA)."""

from __future__ import annotations

import logging
from collections import Counter

import torch

from workers.errors import UnsupportedModelError
from workers.model.kernel_choice import KernelTable, Timer, cpu_info
from workers.model.linear_kernels import linear_kernels, row_bucket, weight_elements

log = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "bfloat16", "float16")
AUTO_ROWS = (1, 16)  # decode at batch 1 and at a full batch: both must not get slower on the whole
NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # /proc/cpuinfo: x86's, and Arm's ("Features")


def has_native_bf16() -> bool:
    return bool(NATIVE_BF16_FLAGS & cpu_info()[1])


def gemm_seconds(shapes: Counter, dtype: torch.dtype, device: torch.device, table: KernelTable,
                 timer: Timer | None = None) -> float:
    """Measured seconds of one forward's linears (each shape times its count) at AUTO_ROWS rows, each on
    its fastest kernel."""
    kernels = linear_kernels(table, timer=timer, working_set=weight_elements(shapes))
    return sum(count * kernels.best_seconds(out_f, in_f, row_bucket(rows), dtype, device)
               for (out_f, in_f), count in shapes.items() for rows in AUTO_ROWS)


def resolve_dtype(requested: str | None, device: torch.device, shapes: Counter, table: KernelTable,
                  timer: Timer | None = None, native_bf16: bool | None = None) -> torch.dtype:
    """shapes: (out, in) → how many linears of the model have that weight shape; native_bf16: whether the CPU has
    bf16 instructions (None: read from /proc/cpuinfo)."""
    if requested is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if requested not in DTYPES:
        raise UnsupportedModelError(f"unsupported dtype {requested!r}; supported: {', '.join(DTYPES)}")
    if requested != "auto":
        return getattr(torch, requested)
    if device.type == "cuda":
        return torch.bfloat16
    if not (has_native_bf16() if native_bf16 is None else native_bf16):
        log.info("dtype auto → float32 (this CPU has no bf16 instructions)")
        return torch.float32
    fp32 = gemm_seconds(shapes, torch.float32, device, table, timer)
    bf16 = gemm_seconds(shapes, torch.bfloat16, device, table, timer)
    chosen = torch.bfloat16 if bf16 < fp32 else torch.float32
    log.info("dtype auto → %s (the model's GEMMs at %s rows: bfloat16 %.2f ms, float32 %.2f ms)",
             str(chosen).removeprefix("torch."), "/".join(map(str, AUTO_ROWS)), bf16 * 1e3, fp32 * 1e3)
    return chosen
