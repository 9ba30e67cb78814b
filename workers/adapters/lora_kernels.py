"""The LoRA decode kernels and which one runs, measured per (in, out, decode rows, adapters in the batch,
dtype) on this machine like the base linears (workers.model.kernel_choice).

Decode rows (one token per sequence) each add `scale · B (A x)` for their own bank rows; two ways:
- `fast` (stacked): one shrink GEMM of all decode rows against every bank row in use, a 0/1 mask keeping
  each token's own rows, one expand GEMM (BGMV without gathering weights; cost grows with the rows in use);
- `grouped`: per adapter row range, gather its tokens, shrink and expand with that range only, and
  scatter-add (cost grows with the number of adapters, not with the rows the others use).
- `gathered`: `fast` on the decode rows that use an adapter only (gathered before the shrink GEMM, the
  expanded deltas index-added back), for batches that mix adapter and base rows.
- `bgmv`: each decode token's own bank rows gathered ([Bd, R, in] and [Bd, R, out], R its rank), a batched
  GEMV each way (BGMV with a gather copy): reads each token's adapter once and nothing else, computes no
  row against another token's adapter; its cost grows with the decode rows, not with the bank span.
- `native_bgmv` (x86 CPU with AVX2, a C compiler; fp32 or bf16): `bgmv` without the gathered copies, each decode row
  reading its own bank rows straight from the bank (workers/model/gemv.c, built as the native GEMV is).
- `native_bgmv_packed`: `native_bgmv` over copies of the banks packed by blocks of four rows (made once, kept
  beside each bank, made again after an adapter load, like `packed`): each block of an adapter's rows is read as
  one sequential stream (a rank-16 adapter: four streams instead of sixteen; the expand alone measured ~1.3x).
- `packed` (CPU): `fast` over the whole bank, A and Bᵀ packed by oneDNN once (again after a bank write, i.e.
  after an adapter load): both GEMMs stream the bank at oneDNN's packed rate, bank rows outside the batch's
  span are masked to zero; it pays for the whole bank, so it wins only where the bank is mostly in use. Every
  layer's view of a target's bank shares one version counter, so each adapter load re-packs every bank once
  at the next step; it is timed on a bank that does not change (loads are rare next to steps; under heavy
  churn the timing flatters it).
Prefill chunks (many tokens of one adapter) are two plain GEMMs per chunk in all.
Which candidates race depends on the batch: `gathered` only where some decode rows use no adapter (with all
rows active it is `fast` plus two copies); the key records which case was measured.
"""

from __future__ import annotations

import torch

from workers.adapters.ops import AdapterBatch, build_adapter_batch, lora_add_chunks, lora_add_fast
from workers.model import native_gemv
from workers.model.kernel_choice import KernelChooser, KernelTable, Timer
from workers.model.linear_kernels import MAX_WORKING_SET, MEASURED_ROWS, bucket_label, onednn_linear, row_bucket

ADAPTER_BUCKETS: tuple[tuple[int, int], ...] = ((1, 1), (2, 4), (5, 1 << 30))
MEASURED_ADAPTERS: tuple[int, ...] = (1, 4, 16)
MEASURED_RANK = 16
MAX_BANKS = 64  # banks a timed call cycles through (a step meets one per layer and target), as for the base


def lora_add_grouped(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, bt: torch.Tensor,
                     batch: AdapterBatch) -> None:
    """y: [N, out] += per token; x: [N, in]; a: [rows, in]; bt: [rows, out]."""
    for start, end, tokens in batch.decode_groups:  # tokens: [g] long
        y.index_add_(0, tokens, (x[tokens] @ a[start:end].T) @ bt[start:end])  # [g, r] @ [r, out]
    lora_add_chunks(y, x, a, bt, batch)


def lora_add_gathered(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, bt: torch.Tensor,
                      batch: AdapterBatch) -> None:
    """y: [N, out] += per token; x: [N, in]; a: [rows, in]; bt: [rows, out]."""
    if batch.decode_active is not None:
        lo, hi, active = batch.decode_lo, batch.decode_hi, batch.decode_active  # active: [Ba]
        h = torch.nn.functional.linear(x.index_select(0, active), a[lo:hi])  # [Ba, hi-lo]
        h.mul_(batch.decode_active_mask)
        y.index_add_(0, active, h @ bt[lo:hi])  # [Ba, out]
    lora_add_chunks(y, x, a, bt, batch)


def lora_add_packed(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, bt: torch.Tensor,
                    batch: AdapterBatch) -> None:
    """y: [N, out] += per token; x: [N, in]; a: [rows, in]; bt: [rows, out] (the whole bank)."""
    if batch.decode_mask is not None:
        lo, hi, bd = batch.decode_lo, batch.decode_hi, batch.num_decode
        h = onednn_linear(x[:bd], a)  # [Bd, rows]
        h[:, :lo] = 0
        h[:, hi:] = 0
        h[:, lo:hi].mul_(batch.decode_mask)
        y[:bd] += onednn_linear(h, bt, transposed=True)  # [Bd, out]
    lora_add_chunks(y, x, a, bt, batch)


def lora_add_bgmv(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, bt: torch.Tensor,
                  batch: AdapterBatch) -> None:
    """y: [N, out] += per token; x: [N, in]; a: [rows, in]; bt: [rows, out]."""
    if batch.decode_gather is not None:
        bd, width = batch.decode_gather.shape
        rows = batch.decode_gather.view(-1)  # [Bd * R]
        a_own = a.index_select(0, rows).view(bd, width, -1)  # [Bd, R, in]
        # [Bd, 1, in] @ [Bd, in, R]: the GEMV as a row times a matrix (as [R, in] @ [in, 1] it runs ~4x slower)
        h = torch.matmul(x[:bd, None, :], a_own.transpose(1, 2)).mul_(batch.decode_gather_mask)  # [Bd, 1, R]
        y[:bd] += torch.bmm(h, bt.index_select(0, rows).view(bd, width, -1)).squeeze(1)  # [Bd, out]
    lora_add_chunks(y, x, a, bt, batch)


def lora_add_native_bgmv(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, bt: torch.Tensor,
                         batch: AdapterBatch) -> None:
    """y: [N, out] += per token; x: [N, in]; a: [rows, in]; bt: [rows, out]."""
    if batch.decode_gather is not None:
        native_gemv.lora_bgmv(y, x, a, bt, batch.decode_gather, batch.decode_gather_mask)
    lora_add_chunks(y, x, a, bt, batch)


def lora_add_native_bgmv_packed(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, bt: torch.Tensor,
                                batch: AdapterBatch) -> None:
    """y: [N, out] += per token; x: [N, in]; a: [rows, in]; bt: [rows, out]."""
    if batch.decode_gather is not None:
        native_gemv.lora_bgmv(y, x, a, bt, batch.decode_gather, batch.decode_gather_mask, packed_banks=True)
    lora_add_chunks(y, x, a, bt, batch)


CANDIDATES = {"fast": lora_add_fast, "grouped": lora_add_grouped, "gathered": lora_add_gathered,
              "bgmv": lora_add_bgmv, "packed": lora_add_packed, "native_bgmv": lora_add_native_bgmv,
              "native_bgmv_packed": lora_add_native_bgmv_packed}
MIXED_ONLY = ("gathered",)  # raced only where some decode rows use no adapter


def adapter_bucket(groups: int) -> int:
    return next(i for i, (_, last) in enumerate(ADAPTER_BUCKETS) if groups <= last)


class LoRAKernels:
    """Callable like a LoRA kernel; dispatches each call to the candidate measured fastest for its key."""

    def __init__(self, table: KernelTable | None = None, override: str | None = None, timer: Timer | None = None):
        self.table, self.override, self.timer = table, override, timer
        self._chooser: KernelChooser | None = None
        self._chosen: dict[tuple, object] = {}
        self._batch: tuple[AdapterBatch | None, tuple] = (None, ())  # the step's batch and its part of the key

    def __call__(self, y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, bt: torch.Tensor,
                 batch: AdapterBatch) -> None:
        seen, batch_key = self._batch
        if seen is not batch:  # once per step, not once per layer
            mixed = batch.decode_mask is not None and not batch.all_decode_active
            batch_key = (row_bucket(batch.num_decode), adapter_bucket(len(batch.decode_groups)), mixed)
            self._batch = (batch, batch_key)
        key = (a.shape[1], bt.shape[1], a.shape[0], *batch_key, y.dtype, y.device)
        fn = self._chosen.get(key)
        if fn is None:
            fn = self._chosen[key] = CANDIDATES[self.choose(*key)]
        fn(y, x, a, bt, batch)

    def choose(self, in_features: int, out_features: int, bank_rows: int, rows_bucket: int, groups_bucket: int,
               mixed: bool, dtype: torch.dtype, device: torch.device) -> str:
        """bank_rows: the bank's rows (the adapters in the batch use the first ones); mixed: some decode rows
        use no adapter (measured with every other row on the base)."""
        if self._chooser is None:
            self._chooser = KernelChooser(tuple(CANDIDATES), self.table or KernelTable.for_machine(device),
                                          self.override, self.timer)
        rows = MEASURED_ROWS[rows_bucket]
        groups = min(MEASURED_ADAPTERS[groups_bucket], rows)
        used = groups * MEASURED_RANK

        def calls():
            gen = torch.Generator(device=device).manual_seed(0)
            with torch.inference_mode(False):  # banks with version counters, like the real ones
                a = torch.randn(max(bank_rows, used), in_features, generator=gen, device=device).to(dtype)
                bt = torch.randn(max(bank_rows, used), out_features, generator=gen, device=device).to(dtype)
                banks = [(a, bt)] + [(a.clone(), bt.clone()) for _ in range(copies - 1)]
            x = torch.randn(rows, in_features, generator=gen, device=device).to(dtype)
            ranges = [(((i % groups) * MEASURED_RANK, (i % groups + 1) * MEASURED_RANK),) for i in range(rows)]
            if mixed:  # every other row on the base; adapters keep their count where the rows allow
                ranges = [() if i % 2 else ((i // 2 % groups * MEASURED_RANK, (i // 2 % groups + 1) * MEASURED_RANK),)
                          for i in range(rows)]
            batch = build_adapter_batch(ranges, [], dtype, device)
            y = torch.zeros(rows, out_features, dtype=dtype, device=device)
            return {name: (lambda fn=CANDIDATES[name]: [fn(y, x, a, bt, batch) for a, bt in banks]) for name in names}

        names = [n for n in CANDIDATES if mixed or n not in MIXED_ONLY]
        copies = min(MAX_BANKS, max(1, MAX_WORKING_SET // (max(bank_rows, used) * (in_features + out_features))))

        key = (f"lora {in_features}x{out_features} bank {bank_rows} rows {bucket_label(rows_bucket)} adapters "
               f"{_label(groups_bucket)}{' with base rows' if mixed else ''} "
               f"{str(dtype).removeprefix('torch.')} {device.type}")
        return self._chooser.choose(key, calls, device, names, per_call=copies)


def _label(bucket: int) -> str:
    first, last = ADAPTER_BUCKETS[bucket]
    return str(first) if first == last else (f"{first}-{last}" if last < 1 << 30 else f"{first}+")
