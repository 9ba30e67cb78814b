"""Per-row LoRA deltas for a batch whose rows use different adapters.

Both functions have one signature: add `scale · B (A x)` to `y` for every token and every bank row range
[start, end) it uses (none = base model), with the bank's A: [rows, in] and Bt: [rows, out] (B transposed,
scale folded in). A token uses one range for its adapter, and a second one while another adapter is fused
into the base (its negated copy, the correction). `lora_add_reference` loops over tokens: the oracle. `lora_add_fast`:

- decode rows (one token per sequence, many adapters): one shrink GEMM against the bank rows in use,
  a mask that keeps each token's own adapter rows, one expand GEMM (BGMV without gathering weights);
- prefill chunks (many tokens, one adapter): two plain GEMMs per chunk (SGMV's segments).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.adapters.slots import RowRange

RowRanges = tuple[RowRange, ...]  # the bank row ranges one token adds; () = base model


@dataclass(frozen=True)
class AdapterBatch:
    """Which adapter rows each token of the step uses, prepared once per step for every layer."""

    token_rows: tuple[RowRanges, ...]  # per token
    num_decode: int  # tokens [0, num_decode) are decode rows
    decode_lo: int  # decode rows use bank rows in [decode_lo, decode_hi)
    decode_hi: int
    decode_mask: torch.Tensor | None  # [Bd, hi - lo]: 1 on the token's own rows
    segments: tuple[tuple[int, int, int, int], ...]  # (token start, token end, row start, row end)
    decode_groups: tuple[tuple[int, int, torch.Tensor], ...] = ()  # (row start, row end, decode tokens [g])
    decode_active: torch.Tensor | None = None  # [Ba] long: the decode tokens that use any adapter row
    decode_active_mask: torch.Tensor | None = None  # [Ba, hi - lo]: decode_mask's rows of those tokens
    decode_gather: torch.Tensor | None = None  # [Bd, R] long: each decode token's own bank rows, 0-padded
    decode_gather_mask: torch.Tensor | None = None  # [Bd, 1, R]: 1 on real rows, 0 on the padding

    @property
    def all_decode_active(self) -> bool:
        return self.decode_active is not None and self.decode_active.shape[0] == self.num_decode

    @property
    def active(self) -> bool:
        return self.decode_mask is not None or bool(self.segments)


def build_adapter_batch(decode_rows: list[RowRanges], chunk_rows: list[tuple[int, int, RowRanges]],
                        dtype: torch.dtype, device: torch.device) -> AdapterBatch:
    """decode_rows: row ranges of each decode token; chunk_rows: (token start, end, ranges) per prefill chunk."""
    token_rows = list(decode_rows)
    for start, end, rows in chunk_rows:
        token_rows.extend([rows] * (end - start))
    used = [r for ranges in decode_rows for r in ranges if r[1] > r[0]]
    lo, hi, mask = 0, 0, None
    if used:
        lo, hi = min(r[0] for r in used), max(r[1] for r in used)
        mask = torch.zeros(len(decode_rows), hi - lo, dtype=dtype)
        for i, ranges in enumerate(decode_rows):
            for start, end in ranges:
                mask[i, start - lo:end - lo] = 1
        mask = mask.to(device)
    active = [i for i, ranges in enumerate(decode_rows) if any(r[1] > r[0] for r in ranges)]
    active_t = torch.tensor(active, dtype=torch.long, device=device) if used else None
    groups: dict[RowRange, list[int]] = {}
    for i, ranges in enumerate(decode_rows):
        for r in ranges:
            if r[1] > r[0]:
                groups.setdefault(r, []).append(i)
    gather, gather_mask = _decode_gather(decode_rows, dtype, device) if used else (None, None)
    return AdapterBatch(
        token_rows=tuple(token_rows),
        num_decode=len(decode_rows),
        decode_lo=lo,
        decode_hi=hi,
        decode_mask=mask,
        segments=tuple((s, e, r[0], r[1]) for s, e, ranges in chunk_rows for r in ranges if r[1] > r[0]),
        decode_groups=tuple((r[0], r[1], torch.tensor(t, dtype=torch.long, device=device)) for r, t in groups.items()),
        decode_active=active_t,
        decode_active_mask=None if mask is None else mask[active_t],
        decode_gather=gather,
        decode_gather_mask=gather_mask,
    )


def _decode_gather(decode_rows: list[RowRanges], dtype: torch.dtype,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Each decode token's bank rows (its ranges one after another), padded with row 0 to the longest."""
    own = [[row for start, end in ranges for row in range(start, end)] for ranges in decode_rows]
    width = max(len(rows) for rows in own)
    gather = torch.zeros(len(own), width, dtype=torch.long)
    mask = torch.zeros(len(own), 1, width, dtype=dtype)
    for i, rows in enumerate(own):
        gather[i, :len(rows)] = torch.tensor(rows, dtype=torch.long)
        mask[i, 0, :len(rows)] = 1
    return gather.to(device), mask.to(device)


def lora_add_reference(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, bt: torch.Tensor,
                       batch: AdapterBatch) -> None:
    """y: [N, out] += per token; x: [N, in]; a: [rows, in]; bt: [rows, out]."""
    for token, ranges in enumerate(batch.token_rows):
        for start, end in ranges:
            if end > start:
                y[token] += (a[start:end] @ x[token]) @ bt[start:end]


def lora_add_chunks(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, bt: torch.Tensor,
                    batch: AdapterBatch) -> None:
    """The prefill chunks' part of every kernel: two plain GEMMs per chunk (all its tokens use one adapter)."""
    for start, end, row_start, row_end in batch.segments:
        y[start:end].addmm_(x[start:end] @ a[row_start:row_end].T, bt[row_start:row_end])


def lora_add_fast(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, bt: torch.Tensor,
                  batch: AdapterBatch) -> None:
    if batch.decode_mask is not None:
        lo, hi, bd = batch.decode_lo, batch.decode_hi, batch.num_decode
        h = torch.nn.functional.linear(x[:bd], a[lo:hi])  # [Bd, hi-lo]
        h.mul_(batch.decode_mask)
        y[:bd].addmm_(h, bt[lo:hi])
    lora_add_chunks(y, x, a, bt, batch)
