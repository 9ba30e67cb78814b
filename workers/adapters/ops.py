"""Per-row LoRA deltas for a batch whose rows use different adapters.

Both functions have one signature: add `scale_s · B_s A_s x` to `y` for every row whose slot `s` is
non-zero, with the bank's A: [slots, R, in] and Bt: [slots, R, out] (B transposed, scale folded in, ranks
below R zero-padded). `lora_add_reference` loops over rows: the oracle. `lora_add_fast` does

- decode rows (one token per sequence, many adapters): one shrink GEMM against the stacked A of the slot
  range in use, a one-hot mask that keeps each row's own slot, one expand GEMM against the stacked Bt
  (BGMV without gathering any weights);
- prefill chunks (many tokens, one adapter): two plain GEMMs per chunk (SGMV's segments).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AdapterBatch:
    """Which adapter slot each token of the step uses, prepared once per step for every layer."""

    token_slots: torch.Tensor  # [N] long, 0 = base
    num_decode: int  # rows [0, num_decode) are decode rows
    decode_lo: int  # decode rows use slots in [decode_lo, decode_hi)
    decode_hi: int
    decode_mask: torch.Tensor | None  # [Bd, (hi - lo) * R]: 1 on the row's own slot's R columns
    segments: tuple[tuple[int, int, int], ...]  # (start, end, slot) of prefill chunks with an adapter

    @property
    def active(self) -> bool:
        return self.decode_mask is not None or bool(self.segments)


def build_adapter_batch(decode_slots: list[int], chunk_slots: list[tuple[int, int, int]], max_rank: int,
                        dtype: torch.dtype, device: torch.device) -> AdapterBatch:
    """decode_slots: adapter slot of each decode row; chunk_slots: (start, end, slot) of each prefill chunk."""
    token_slots = list(decode_slots)
    for start, end, slot in chunk_slots:
        token_slots.extend([slot] * (end - start))
    used = [s for s in decode_slots if s]
    lo, hi, mask = 0, 0, None
    if used:
        lo, hi = min(used), max(used) + 1
        rel = torch.tensor(decode_slots) - lo  # [Bd]
        onehot = torch.zeros(len(decode_slots), hi - lo, dtype=dtype)
        rows = torch.nonzero(torch.tensor(decode_slots) > 0).squeeze(1)
        onehot[rows, rel[rows]] = 1
        mask = onehot.repeat_interleave(max_rank, dim=1).to(device)  # [Bd, (hi-lo)*R]
    return AdapterBatch(
        token_slots=torch.tensor(token_slots, dtype=torch.long, device=device),
        num_decode=len(decode_slots),
        decode_lo=lo,
        decode_hi=hi,
        decode_mask=mask,
        segments=tuple(c for c in chunk_slots if c[2]),
    )


def lora_add_reference(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, bt: torch.Tensor,
                       batch: AdapterBatch) -> None:
    """y: [N, out] += per row; x: [N, in]; a: [slots, R, in]; bt: [slots, R, out]."""
    for row, slot in enumerate(batch.token_slots.tolist()):
        if slot:
            y[row] += (a[slot] @ x[row]) @ bt[slot]


def lora_add_fast(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, bt: torch.Tensor,
                  batch: AdapterBatch) -> None:
    if batch.decode_mask is not None:
        lo, hi, bd = batch.decode_lo, batch.decode_hi, batch.num_decode
        stacked_a = a[lo:hi].reshape(-1, a.shape[-1])  # [(hi-lo)*R, in], a view
        stacked_bt = bt[lo:hi].reshape(-1, bt.shape[-1])  # [(hi-lo)*R, out]
        h = torch.nn.functional.linear(x[:bd], stacked_a)  # [Bd, (hi-lo)*R]
        h.mul_(batch.decode_mask)
        y[:bd].addmm_(h, stacked_bt)
    for start, end, slot in batch.segments:
        y[start:end].addmm_(x[start:end] @ a[slot].T, bt[slot])
