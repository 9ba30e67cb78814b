"""The small ops between a decoder layer's GEMMs, each as one native call or as torch's ops, whichever measures
faster per (shape, row bucket, dtype) on this machine (workers.model.kernel_choice), like the linears.

A one-token decode step runs ~60 RMSNorms and ~60 RoPEs besides its GEMMs; in torch each is a handful of small
ops (~20-40 µs on a 2-core CPU), which made them a fifth of a quantized base's step. Candidates:
- residual add + RMSNorm, (s, h) = (x + delta, RMSNorm(x + delta)): `torch` (an add, then RMSNorm.forward) or
  `native` (one pass over each row; workers/model/gemv.c; fp32 or bf16 on a CPU with AVX2 and a C compiler, bf16
  rounded where torch's bf16 ops round);
- RoPE on q and k + the KV cache write: `torch` (apply_rope twice, then two index copies) or `native` (q and k
  rotated in place, k and v copied into their cache rows).
Oracles: RMSNorm.reference, rope.apply_rope_reference and KVCache.write_reference (tests force each candidate).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from workers.model import native_gemv
from workers.model.kernel_choice import KernelChooser, KernelTable, Timer
from workers.model.linear_kernels import MEASURED_ROWS, bucket_label, row_bucket
from workers.model.rope import apply_rope

# (x [N, dim], delta [N, dim] or None, weight [dim], eps, plain RMSNorm) → (x + delta, its RMSNorm)
NormFn = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor, float, Callable], tuple[torch.Tensor, torch.Tensor]]
# (q [N, H, D], k and v [N, KVH, D], cos and signed sin [N, 1, D], k and v cache rows [R, D], rows [N · KVH]) → q
RopeFn = Callable[..., torch.Tensor]


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as transformers computes it: normalised in fp32, rounded to x's dtype, then scaled (in bf16 the fused
    op rounds once instead, so half precision keeps this form)."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def rms_norm_plain(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm's torch form (RMSNorm.forward): one fused op in fp32, equal to the reference; the reference otherwise."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return torch.nn.functional.rms_norm(x, weight.shape, weight, eps)
    return rms_norm_reference(x, weight, eps)


def norm_torch(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
               plain: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    s = x if delta is None else x + delta
    return s, plain(s)


def norm_native(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
                plain: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return native_gemv.add_rms_norm(x, delta, weight, eps)


def rope_write_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     k_rows: torch.Tensor, v_rows: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    dim = k.shape[-1]
    k_rows.index_copy_(0, rows, k.reshape(-1, dim))
    v_rows.index_copy_(0, rows, v.reshape(-1, dim))
    return q


NORM_CANDIDATES: dict[str, NormFn] = {"torch": norm_torch, "native": norm_native}
ROPE_CANDIDATES: dict[str, RopeFn] = {"torch": rope_write_torch, "native": native_gemv.rope_write}


class LayerKernels:
    """The residual-add + RMSNorm and the RoPE + cache write each layer runs, measured on first use of a key."""

    def __init__(self, table: KernelTable, override: str | None = None, timer: Timer | None = None):
        """override: a candidate name both ops run (tests force each in turn)."""
        self.norm_chooser = KernelChooser(tuple(NORM_CANDIDATES), table, override, timer)
        self.rope_chooser = KernelChooser(tuple(ROPE_CANDIDATES), table, override, timer)
        self._chosen: dict[tuple, Callable] = {}

    def norm(self, x: torch.Tensor, with_delta: bool) -> NormFn:
        key = ("norm", x.shape[1], row_bucket(x.shape[0]), with_delta, x.dtype, x.device)
        fn = self._chosen.get(key)
        if fn is None:
            fn = self._chosen[key] = NORM_CANDIDATES[self._choose_norm(*key[1:])]
        return fn

    def rope(self, q: torch.Tensor, k: torch.Tensor) -> RopeFn:
        key = ("rope", q.shape[1], k.shape[1], q.shape[2], row_bucket(q.shape[0]), q.dtype, q.device)
        fn = self._chosen.get(key)
        if fn is None:
            fn = self._chosen[key] = ROPE_CANDIDATES[self._choose_rope(*key[1:])]
        return fn

    def _choose_norm(self, dim: int, bucket: int, with_delta: bool, dtype: torch.dtype, device: torch.device) -> str:
        rows = MEASURED_ROWS[bucket]

        def calls():
            gen = torch.Generator(device=device).manual_seed(0)
            x, delta = (torch.randn(rows, dim, generator=gen, device=device).to(dtype) for _ in range(2))
            weight = torch.ones(dim, dtype=dtype, device=device)

            def plain(s: torch.Tensor) -> torch.Tensor:  # the model's own torch form (RMSNorm.forward)
                return rms_norm_plain(s, weight, 1e-5)

            return {name: (lambda fn=fn: fn(x, delta if with_delta else None, weight, 1e-5, plain))
                    for name, fn in NORM_CANDIDATES.items()}

        key = (f"add_rms_norm {dim} rows {bucket_label(bucket)}{'' if with_delta else ' no add'} "
               f"{str(dtype).removeprefix('torch.')} {device.type}")
        return self.norm_chooser.choose(key, calls, device, tuple(NORM_CANDIDATES))

    def _choose_rope(self, heads: int, kv_heads: int, dim: int, bucket: int, dtype: torch.dtype,
                     device: torch.device) -> str:
        rows = MEASURED_ROWS[bucket]

        def calls():
            gen = torch.Generator(device=device).manual_seed(0)
            q = torch.randn(rows, heads, dim, generator=gen, device=device).to(dtype)
            k, v = (torch.randn(rows, kv_heads, dim, generator=gen, device=device).to(dtype) for _ in range(2))
            angles = torch.rand(rows, 1, dim // 2, generator=gen, device=device).repeat(1, 1, 2) * 2 * math.pi
            cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)  # a rotation: repeated calls keep q's norm
            cache_rows = rows * kv_heads * 4
            k_rows, v_rows = (torch.zeros(cache_rows, dim, dtype=dtype, device=device) for _ in range(2))
            index = torch.randperm(cache_rows, generator=gen, device=device)[:rows * kv_heads]
            return {name: (lambda fn=fn: fn(q, k, v, cos, sin, k_rows, v_rows, index))
                    for name, fn in ROPE_CANDIDATES.items()}

        key = (f"rope_write {heads}x{kv_heads}x{dim} rows {bucket_label(bucket)} "
               f"{str(dtype).removeprefix('torch.')} {device.type}")
        return self.rope_chooser.choose(key, calls, device, tuple(ROPE_CANDIDATES))
