"""The KV cache: one preallocated tensor for keys and one for values, indexed by (layer, slot, position).
A sequence owns one slot for its lifetime; nothing is allocated per step.

Writes go through one flat row index per step ((slot · kv_heads + head) · max_seq + position, computed once
and shared by every layer) and `index_copy_`: advanced indexing over (slot, :, position) took ~10 ms per
layer for 16 rows on a 2-core box against ~5 µs for the index copy. `write_reference` keeps the plain form.
"""

from __future__ import annotations

import heapq

import torch

from workers.model.batch import StepBatch


class KVCache:
    def __init__(self, num_layers: int, num_slots: int, max_seq: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (num_layers, num_slots, num_kv_heads, max_seq, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # [L, slots, kv_heads, max_seq, head_dim]
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_slots = num_slots
        self.max_seq = max_seq
        self._free = list(range(num_slots))  # min-heap: the lowest free slot first keeps slots dense
        self._heads = torch.arange(num_kv_heads, device=device)  # [kv_heads]
        self._indexed: tuple[StepBatch, torch.Tensor] | None = None  # the last step and its flat row index
        # each layer's keys and values, [slots, kv_heads, max_seq, D] and as rows [slots · kv_heads · max_seq, D]:
        # views made once, as a step asks for them ~4 times per layer
        self._layers = [(k, v, k.view(-1, head_dim), v.view(-1, head_dim)) for k, v in zip(self.k, self.v, strict=True)]

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        return heapq.heappop(self._free)

    def release(self, slot: int) -> None:
        heapq.heappush(self._free, slot)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, batch: StepBatch) -> None:
        """k, v: [N, kv_heads, head_dim] for the step's tokens, stored at (slot, position)."""
        rows = self.row_index(batch)  # [N · kv_heads]
        k_rows, v_rows = self.layer_rows(layer)
        k_rows.index_copy_(0, rows, k.reshape(-1, k_rows.shape[1]))
        v_rows.index_copy_(0, rows, v.reshape(-1, v_rows.shape[1]))

    def layer_rows(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's keys and values as rows: [slots · kv_heads · max_seq, head_dim] each (views)."""
        return self._layers[layer][2:]

    def write_reference(self, layer: int, k: torch.Tensor, v: torch.Tensor, batch: StepBatch) -> None:
        """What `write` computes, by advanced indexing (the oracle tests compare it with)."""
        self.k[layer][batch.cache_slots, :, batch.positions] = k
        self.v[layer][batch.cache_slots, :, batch.positions] = v

    def row_index(self, batch: StepBatch) -> torch.Tensor:
        """[N · kv_heads] long: each token's row in a layer's cache viewed as [slots · kv_heads · max_seq, D]."""
        if self._indexed is None or self._indexed[0] is not batch:
            kv_heads = self._heads.shape[0]
            rows = (batch.cache_slots[:, None] * kv_heads + self._heads[None, :]) * self.max_seq
            self._indexed = (batch, (rows + batch.positions[:, None]).reshape(-1))
        return self._indexed[1]

    def decode_view(self, layer: int, batch: StepBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the decoding sequences: [Bd, kv_heads, S, head_dim]."""
        s = batch.decode_kv_len
        k, v = self._layers[layer][:2]
        if batch.decode_slot_start is not None:  # consecutive slots: a view, no copy
            lo, n = batch.decode_slot_start, batch.num_decode
            return k.narrow(0, lo, n).narrow(2, 0, s), v.narrow(0, lo, n).narrow(2, 0, s)
        return k[batch.decode_slots, :, :s], v[batch.decode_slots, :, :s]

    def compact(self, slot: int, src_positions: list[int], dst_start: int) -> None:
        """Moves one sequence's entries at src_positions to dst_start, dst_start+1, … in every layer
        (a speculative tree's accepted path into consecutive positions). Gathered first, so overlap is safe."""
        src = torch.tensor(src_positions, dtype=torch.long, device=self.k.device)
        dst = slice(dst_start, dst_start + len(src_positions))
        for cache in (self.k, self.v):
            cache[:, slot, :, dst] = cache[:, slot, :, src]  # [L, kv_heads, n, head_dim]

    def copy_prefix(self, src_slot: int, dst_slot: int, length: int) -> None:
        """Copies one sequence's first `length` positions into another slot in every layer (forking a
        prefilled prompt into the slots of its other completions)."""
        for cache in (self.k, self.v):
            cache[:, dst_slot, :, :length] = cache[:, src_slot, :, :length]  # [L, kv_heads, length, head_dim]

    def prefix_view(self, layer: int, slot: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One sequence's first `length` cached positions: [1, kv_heads, length, head_dim]."""
        return self.k[layer, slot:slot + 1, :, :length], self.v[layer, slot:slot + 1, :, :length]
