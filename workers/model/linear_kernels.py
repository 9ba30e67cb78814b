"""The decoder's linear layers, y = x Wᵀ + b, and the interchangeable ways of computing them; which one
runs is measured per weight shape, row bucket and dtype on this machine (workers.model.kernel_choice).

Candidates (each equals F.linear up to float rounding; tests check every one):
- `linear`: F.linear, x · Wᵀ.
- `wxt`: (W · xᵀ)ᵀ, the same GEMM with the roles swapped (some BLAS stream W [out, in] better this way).
- `wxt_pair`: `wxt` with a single row computed as two (where the one-row GEMV path is slower than a GEMM);
  for more than one row it is `wxt`, so it is only a candidate for the one-row bucket.
- `native_gemv`, `native_gemv_prefetch` (x86 CPU with AVX2, a C compiler): our own few-row GEMM, both
  threads streaming W once (workers.model.native_gemv), for fp32 and for bf16 (bf16 widened as it streams, summed
  in fp32: no bf16 instructions needed); `native_gemv_packed`, the same over a copy of W packed by blocks of rows.
- `onednn_packed` (CPU): oneDNN's linear over W reordered once into its blocked layout (kept beside W, and
  packed again when W is written in place, e.g. by fusion). It streams W from memory up to 2-3x faster than
  F.linear on some CPUs, and costs a second copy of each weight it serves.

Candidates are timed as a decode step meets its weights: cycling through enough copies of W to stand for
the model's own weights (`working_set`), so that a weight that fits the caches alone is not timed hot
while the model's weights stream from memory every step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

from workers.model import native_gemv
from workers.model.kernel_choice import KernelChooser, KernelTable, Timer, packed_beside

LinearFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]  # (x, W, b) → y

# (first, last) rows of each bucket, and the rows a bucket is measured at
ROW_BUCKETS: tuple[tuple[int, int], ...] = ((1, 1), (2, 4), (5, 16), (17, 64), (65, 1 << 30))
MEASURED_ROWS: tuple[int, ...] = (1, 4, 16, 64, 128)
EAGER_BUCKETS = 3  # up to 16 rows: decode batches, measured at load
LAST_BUCKET = {"wxt_pair": 0}  # candidates raced only up to a row bucket: a one-row trick
MAX_WORKING_SET = 64 << 20  # weight elements cycled through when timing (256 MiB in fp32): bounds the time


def linear_f(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, w, b)


def linear_wxt(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    y = torch.mm(w, x.t()).t().contiguous()  # [N, out]
    return y if b is None else y.add_(b)


def linear_wxt_pair(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    n = x.shape[0]
    rows = x.expand(2, -1).contiguous() if n == 1 else x  # [max(N, 2), in]
    y = torch.mm(w, rows.t()).t()[:n].contiguous()  # [N, out]
    return y if b is None else y.add_(b)


def onednn_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None,
                  transposed: bool = False) -> torch.Tensor:
    """x Wᵀ + b through oneDNN, W [out, in] (transposed: W given as Wᵀ [in, out]) packed once into oneDNN's
    blocked layout and kept on the tensor object; packed again when W has been written (its version moved)."""
    if w.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        raise NotImplementedError("oneDNN packed linear is a CPU kernel of torch builds with oneDNN")

    def reorder(weight: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._reorder_linear_weight(weight.t().contiguous() if transposed else weight, None)

    packed = packed_beside(w, "_onednn_packed_t" if transposed else "_onednn_packed", reorder)
    return torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")


def linear_onednn_packed(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return onednn_linear(x, w, b)


CANDIDATES: dict[str, LinearFn] = {"linear": linear_f, "wxt": linear_wxt, "wxt_pair": linear_wxt_pair,
                                   "onednn_packed": linear_onednn_packed, "native_gemv": native_gemv.dense,
                                   "native_gemv_prefetch": native_gemv.dense_prefetch,
                                   "native_gemv_packed": native_gemv.dense_packed}


def weight_elements(shapes: Mapping[tuple[int, int], int]) -> int:
    """The weight elements one forward streams through its linears, from (out, in) → count."""
    return sum(out_f * in_f * count for (out_f, in_f), count in shapes.items())


def row_bucket(n: int) -> int:
    for i, (_, last) in enumerate(ROW_BUCKETS):
        if n <= last:
            return i
    return len(ROW_BUCKETS) - 1


def bucket_label(bucket: int) -> str:
    first, last = ROW_BUCKETS[bucket]
    return str(first) if first == last else (f"{first}-{last}" if last < 1 << 30 else f"{first}+")


WeightFactory = Callable[[int, int, torch.dtype, torch.device, torch.Generator], tuple[torch.Tensor, ...]]


def dense_weights(out_features: int, in_features: int, dtype: torch.dtype, device: torch.device,
                  gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    return ((torch.randn(out_features, in_features, generator=gen, device=device) * 0.02).to(dtype),)


class RowKernels:
    """The kernel each layer of one kind runs, by (out, in, row bucket, dtype, device), measured on first
    use. A candidate is called as fn(x, *weights, bias); `weights` builds representative weights to time."""

    def __init__(self, op: str, candidates: dict[str, Callable], table: KernelTable, override: str | None = None,
                 timer: Timer | None = None, weights: WeightFactory = dense_weights, working_set: int = 0):
        """working_set: weight elements a step streams (the model's linears); candidates are timed cycling
        through that many elements of weight copies (at most MAX_WORKING_SET), so as cold as the model's."""
        self.op, self.candidates, self.make_weights = op, candidates, weights
        self.working_set = min(working_set, MAX_WORKING_SET)
        self.chooser = KernelChooser(tuple(candidates), table, override, timer)
        self._chosen: dict[tuple, Callable] = {}

    def get(self, shape: torch.Size, rows: int, dtype: torch.dtype, device: torch.device) -> Callable:
        key = (shape[0], shape[1], row_bucket(rows), dtype, device)
        fn = self._chosen.get(key)
        if fn is None:
            fn = self._chosen[key] = self.candidates[self.choose(*key)]
        return fn

    def choose(self, out_features: int, in_features: int, bucket: int, dtype: torch.dtype,
               device: torch.device) -> str:
        names = [n for n in self.candidates if bucket <= LAST_BUCKET.get(n, bucket)]
        rows, copies = MEASURED_ROWS[bucket], self.copies(out_features, in_features)

        def calls():
            gen = torch.Generator(device=device).manual_seed(0)
            with torch.inference_mode(False):  # weights with version counters, like the model's
                weights = self.make_weights(out_features, in_features, dtype, device, gen)
                cycle = [weights] + [tuple(t.clone() for t in weights) for _ in range(copies - 1)]
            x = torch.randn(rows, in_features, generator=gen, device=device).to(dtype)
            return {name: (lambda fn=self.candidates[name]: [fn(x, *w, None) for w in cycle]) for name in names}

        key = self.key(out_features, in_features, bucket, dtype, device)
        return self.chooser.choose(key, calls, device, names, per_call=copies)

    def copies(self, out_features: int, in_features: int) -> int:
        """Copies of one weight a timed call cycles through (1: timed hot, for a model that fits the caches)."""
        return max(1, self.working_set // (out_features * in_features))

    def key(self, out_features: int, in_features: int, bucket: int, dtype: torch.dtype, device: torch.device) -> str:
        copies = self.copies(out_features, in_features)
        return (f"{self.op} {out_features}x{in_features} rows {bucket_label(bucket)} "
                f"{str(dtype).removeprefix('torch.')} {device.type}" + (f" cycling {copies}" if copies > 1 else ""))

    def prepare(self, shapes: set[tuple[int, int]], dtype: torch.dtype, device: torch.device,
                buckets: int = EAGER_BUCKETS) -> None:
        """Measures (or reads) the decode buckets of every shape now, so that no decode step pays for it;
        larger buckets (prefill chunks) are measured at their first use."""
        for out_features, in_features in sorted(shapes):
            for bucket in range(buckets):
                self.choose(out_features, in_features, bucket, dtype, device)

    def best_seconds(self, out_features: int, in_features: int, bucket: int, dtype: torch.dtype,
                     device: torch.device) -> float:
        """The chosen candidate's measured time (its fastest call; measuring first if needed); with an override, the
        override's own time is not known and the fastest measured one is reported."""
        self.choose(out_features, in_features, bucket, dtype, device)
        seconds = self.chooser.seconds(self.key(out_features, in_features, bucket, dtype, device))
        if seconds is None:
            raise LookupError("nothing measured (a kernel override is set)")
        return min(seconds.values())


def linear_kernels(table: KernelTable, override: str | None = None, timer: Timer | None = None,
                   working_set: int = 0) -> RowKernels:
    return RowKernels("linear", CANDIDATES, table, override, timer, working_set=working_set)
