"""Decode attention (one new query per sequence over its cached keys and values) and which way runs, measured
per (heads, kv heads, head dim, decode rows, cached length, masked or not, dtype) on this machine like the linears
(workers.model.kernel_choice).

Candidates (each equals `sdpa`; tests check them):
- `sdpa`: F.scaled_dot_product_attention with grouped-query heads (torch's fused kernel; its setup is sized for
  long queries and costs ~50-80 µs a call on a 2-core CPU for a one-token query).
- `matmul`: the same product as two batched matmuls and a softmax, each query head grouped with the heads that
  share its key head ([Bd, KVH, G, D] · [Bd, KVH, D, S]): a handful of small ops for a one-token query.
- `native`, `native_threads` (fp32 or bf16 on a CPU with AVX2 and a C compiler; workers/model/gemv.c): one call
  reading the cache's rows in place, on one thread or on torch's threads split by (row, kv head).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from workers.model import native_gemv
from workers.model.kernel_choice import KernelChooser, KernelTable, Timer
from workers.model.linear_kernels import MEASURED_ROWS, bucket_label, row_bucket

# [Bd, H, 1, D] query, [Bd, KVH, S, D] keys and values, [Bd, 1, 1, S] bool mask or None → [Bd, H, 1, D]
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]

KV_BUCKETS: tuple[tuple[int, int], ...] = ((1, 128), (129, 512), (513, 2048), (2049, 1 << 30))
MEASURED_KV: tuple[int, ...] = (96, 384, 1536, 4096)


def sdpa(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)


def grouped_matmul(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                   mask: torch.Tensor | None) -> torch.Tensor:
    bd, heads, _, dim = q.shape
    kv_heads = keys.shape[1]
    grouped = q.reshape(bd, kv_heads, heads // kv_heads, dim)  # query head h reads key head h // G, as in SDPA
    scores = torch.matmul(grouped, keys.transpose(-1, -2)).mul_(1 / math.sqrt(dim))  # [Bd, KVH, G, S]
    if mask is not None:
        scores.masked_fill_(mask.logical_not(), float("-inf"))
    out = torch.matmul(scores.softmax(-1), values)  # [Bd, KVH, G, D]
    return out.view(bd, heads, 1, dim)


def native_one_thread(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                      mask: torch.Tensor | None) -> torch.Tensor:
    return native_gemv.decode_attention(q, keys, values, mask, 1)


def native_threads(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                   mask: torch.Tensor | None) -> torch.Tensor:
    return native_gemv.decode_attention(q, keys, values, mask, torch.get_num_threads())


CANDIDATES: dict[str, AttentionFn] = {"sdpa": sdpa, "matmul": grouped_matmul, "native": native_one_thread,
                                      "native_threads": native_threads}


def kv_bucket(length: int) -> int:
    return next((i for i, (_, last) in enumerate(KV_BUCKETS) if length <= last), len(KV_BUCKETS) - 1)


class AttentionKernels:
    """The decode attention each layer runs, measured on first use of its key."""

    def __init__(self, table: KernelTable, override: str | None = None, timer: Timer | None = None):
        self.chooser = KernelChooser(tuple(CANDIDATES), table, override, timer)
        self._chosen: dict[tuple, AttentionFn] = {}

    def get(self, q: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor | None) -> AttentionFn:
        bd, heads, _, dim = q.shape
        key = (heads, keys.shape[1], dim, row_bucket(bd), kv_bucket(keys.shape[2]), mask is not None, q.dtype,
               q.device)
        fn = self._chosen.get(key)
        if fn is None:
            fn = self._chosen[key] = CANDIDATES[self.choose(*key)]
        return fn

    def choose(self, heads: int, kv_heads: int, dim: int, rows_bucket: int, length_bucket: int, masked: bool,
               dtype: torch.dtype, device: torch.device) -> str:
        bd, length = MEASURED_ROWS[rows_bucket], MEASURED_KV[length_bucket]

        def calls():
            gen = torch.Generator(device=device).manual_seed(0)
            q = torch.randn(bd, heads, 1, dim, generator=gen, device=device).to(dtype)
            keys, values = (torch.randn(bd, kv_heads, length, dim, generator=gen, device=device).to(dtype)
                            for _ in range(2))
            mask = None
            if masked:  # each row sees a different prefix, as rows of unequal lengths do
                lengths = torch.randint(1, length + 1, (bd, 1), generator=gen, device=device)
                mask = (torch.arange(length, device=device) < lengths)[:, None, None, :]
            return {name: (lambda fn=fn: fn(q, keys, values, mask)) for name, fn in CANDIDATES.items()}

        first, last = KV_BUCKETS[length_bucket]
        key = (f"attention {heads}x{kv_heads}x{dim} rows {bucket_label(rows_bucket)} kv "
               f"{first}-{last if last < 1 << 30 else ''}{' masked' if masked else ''} "
               f"{str(dtype).removeprefix('torch.')} {device.type}")
        return self.chooser.choose(key, calls, device, tuple(CANDIDATES))
