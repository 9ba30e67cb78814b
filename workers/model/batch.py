"""Per-step batch metadata: what one forward pass needs to know about its tokens, built once per step.

A step's tokens are laid out flat: first one token for each decoding sequence, then the prefill chunks,
each a run of consecutive prompt tokens of one sequence. Layers read this; they never see requests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.model.rope import signed_sin


@dataclass(frozen=True)
class PrefillChunk:
    slot: int  # KV-cache slot of the sequence
    start: int  # position of the chunk's first token (tokens before it are already cached)
    length: int
    offset: int  # index of the chunk's first token in the flat batch
    mask: torch.Tensor  # [length, start + length] bool: causal (and sliding-window) visibility


@dataclass(frozen=True)
class TreeLayout:
    """A speculative tree verified as one chunk: node i is written at KV position start + i but sits at
    RoPE position start + depths[i], and sees the cached prefix plus its own ancestors."""

    depths: torch.Tensor  # [T] long, root 0
    ancestors: torch.Tensor  # [T, T] bool: node i sees node j (j is i or an ancestor of i)


@dataclass(frozen=True)
class StepBatch:
    input_ids: torch.Tensor  # [N] long
    positions: torch.Tensor  # [N] long: KV-cache position of each token (= RoPE position, except in trees)
    cache_slots: torch.Tensor  # [N] long: KV slot of each token
    cos: torch.Tensor  # [N, 1, head_dim]
    sin: torch.Tensor  # [N, 1, head_dim], first half negated (workers.model.rope.signed_sin)
    num_decode: int  # the first num_decode tokens are decode rows, one per sequence
    decode_slots: torch.Tensor  # [Bd] long
    decode_slot_start: int | None  # decode_slots == arange(start, start + Bd): attend over a view, no gather
    decode_kv_len: int  # S: the longest decoding sequence, counting the new token
    decode_mask: torch.Tensor | None  # [Bd, 1, 1, S] bool; None: every row sees all S positions
    prefill: tuple[PrefillChunk, ...]
    logits_rows: torch.Tensor  # [R] long: rows whose next-token logits are needed

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


def causal_mask(start: int, length: int, window: int | None) -> torch.Tensor:
    """[length, start + length] bool: query at position start+i sees keys at positions ≤ start+i
    (and, with a sliding window, > start+i-window)."""
    q_pos = torch.arange(start, start + length).unsqueeze(1)
    k_pos = torch.arange(start + length).unsqueeze(0)
    visible = k_pos <= q_pos
    if window is not None:
        visible &= k_pos > q_pos - window
    return visible


def tree_mask(start: int, tree: TreeLayout, window: int | None) -> torch.Tensor:
    """[T, start + T] bool: every node sees the cached prefix and its ancestors (within the window)."""
    t = tree.depths.shape[0]
    q_pos = (start + tree.depths).unsqueeze(1)  # [T, 1]: RoPE positions
    k_pos = torch.cat([torch.arange(start), start + tree.depths]).unsqueeze(0)  # [1, start + T]
    visible = torch.cat([torch.ones(t, start, dtype=torch.bool), tree.ancestors], dim=1)
    if window is not None:
        visible &= k_pos > q_pos - window
    return visible


def contiguous_start(slots: list[int]) -> int | None:
    """s when slots == [s, s+1, ..., s+n-1] (then the cache's slots form one view); None otherwise."""
    return slots[0] if slots and slots == list(range(slots[0], slots[0] + len(slots))) else None


def sees_everything(lengths: list[int], kv_len: int, window: int | None) -> bool:
    """Whether every decode row sees all kv_len positions, so attention needs no mask (the common case:
    one row, or rows of one length); SDPA without a mask is also the faster path."""
    return all(n == kv_len for n in lengths) and (window is None or kv_len <= window)


def build_step_batch(
    decode: list[tuple[int, int, int]],
    prefill: list[tuple],
    cos_table: torch.Tensor,
    sin_table: torch.Tensor,
    window: int | None,
    device: torch.device,
) -> StepBatch:
    """decode: (slot, position, token) per decoding sequence; prefill: (slot, start, tokens, wants_logits)
    or (slot, start, tokens, wants_logits, tree: TreeLayout | None) per chunk. Every decode row, and every
    chunk that ends its prompt, asks for logits at its last token; a tree chunk asks for all its nodes'."""
    ids: list[int] = [tok for _, _, tok in decode]
    pos: list[int] = [p for _, p, _ in decode]
    rope_pos: list[int] = list(pos)
    slots: list[int] = [s for s, _, _ in decode]
    chunks: list[PrefillChunk] = []
    logits_rows = list(range(len(decode)))
    for slot, start, tokens, wants_logits, *rest in prefill:
        tree: TreeLayout | None = rest[0] if rest else None
        offset = len(ids)
        ids.extend(tokens)
        pos.extend(range(start, start + len(tokens)))
        slots.extend([slot] * len(tokens))
        if tree is None:
            rope_pos.extend(range(start, start + len(tokens)))
            mask = causal_mask(start, len(tokens), window).to(device)
        else:
            assert tree.depths.shape[0] == len(tokens)
            rope_pos.extend((start + tree.depths).tolist())
            mask = tree_mask(start, tree, window).to(device)
        chunks.append(PrefillChunk(slot, start, len(tokens), offset, mask))
        if tree is not None:
            logits_rows.extend(range(offset, offset + len(tokens)))
        elif wants_logits:
            logits_rows.append(offset + len(tokens) - 1)
    positions = torch.tensor(pos, dtype=torch.long)
    rope_positions = torch.tensor(rope_pos, dtype=torch.long)
    decode_slots = [s for s, _, _ in decode]
    kv_len = max((p + 1 for _, p, _ in decode), default=0)
    decode_mask = None
    if decode and not sees_everything([p + 1 for _, p, _ in decode], kv_len, window):
        lengths = torch.tensor([p + 1 for _, p, _ in decode])
        k_pos = torch.arange(kv_len)
        visible = k_pos.unsqueeze(0) < lengths.unsqueeze(1)  # [Bd, S]
        if window is not None:
            visible &= k_pos.unsqueeze(0) > (lengths - 1 - window).unsqueeze(1)
        decode_mask = visible[:, None, None, :].to(device)
    return StepBatch(
        input_ids=torch.tensor(ids, dtype=torch.long, device=device),
        positions=positions.to(device),
        cache_slots=torch.tensor(slots, dtype=torch.long, device=device),
        cos=cos_table[rope_positions].unsqueeze(1).to(device),
        sin=signed_sin(sin_table[rope_positions]).unsqueeze(1).to(device),
        num_decode=len(decode),
        decode_slots=torch.tensor(decode_slots, dtype=torch.long, device=device),
        decode_slot_start=contiguous_start(decode_slots),
        decode_kv_len=kv_len,
        decode_mask=decode_mask,
        prefill=tuple(chunks),
        logits_rows=torch.tensor(logits_rows, dtype=torch.long, device=device),
    )
