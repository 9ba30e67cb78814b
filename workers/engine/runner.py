"""The model runner: the base decoder with every registered adapter kind's layers attached, its KV cache and
RoPE tables. `forward` turns one step's rows (`DecodeRow`, `PromptChunk`) into logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.adapters import kinds
from workers.adapters.kind import DeviceContext, KindDevice
from workers.adapters.residency import DevicePlacement
from workers.engine.config import EngineConfig
from workers.model.batch import TreeLayout, build_step_batch
from workers.model.kv_cache import KVCache
from workers.model.loader import ModelSpec, load_decoder
from workers.model.rope import rope_tables


@dataclass(frozen=True)
class DecodeRow:
    """One decoding sequence's token this step."""

    kv_slot: int
    position: int
    token: int
    placement: DevicePlacement  # what its adapter adds


@dataclass(frozen=True)
class PromptChunk:
    """Prompt tokens written at `start` (or a Medusa tree of candidates to verify, `tree` its layout)."""

    kv_slot: int
    start: int
    tokens: list[int]
    wants_logits: bool  # the chunk ends its prompt (a tree: logits for every node)
    placement: DevicePlacement
    tree: TreeLayout | None = None


class ModelRunner:
    def __init__(self, cfg: EngineConfig):
        self.device = torch.device(cfg.device)
        self.model = load_decoder(ModelSpec(cfg.model_path, cfg.device, cfg.dtype, cfg.quantize, cfg.linear_kernel))
        mc = self.model.config
        self.config = mc
        self.dtype = self.model.dtype
        self.max_seq = min(cfg.max_seq, mc.max_position_embeddings)
        self.kv = KVCache(mc.num_layers, cfg.max_batch, self.max_seq, mc.num_kv_heads, mc.head_dim,
                          self.dtype, self.device)
        cos, sin = rope_tables(mc, self.max_seq)
        self.cos, self.sin = cos.to(self.dtype), sin.to(self.dtype)
        self.devices: dict[str, KindDevice] = kinds.attach_devices(self.model, DeviceContext(
            mc, self.dtype, self.device, cfg.max_loras, cfg.max_rank, cfg.lora_targets, cfg.lora_kernel,
            medusa_depth=max(map(len, cfg.medusa_tree), default=0)))

    @torch.inference_mode()
    def forward(self, decode: list[DecodeRow], prefill: list[PromptChunk], with_hidden: bool = False):
        """Returns logits [rows, vocab] for the decode rows, then the chunks that want logits (every node of a
        tree); with_hidden: (logits, final hidden states [rows, hidden])."""
        batch = build_step_batch([(d.kv_slot, d.position, d.token) for d in decode],
                                 [(c.kv_slot, c.start, c.tokens, c.wants_logits, c.tree) for c in prefill],
                                 self.cos, self.sin, self.config.sliding_window, self.device)
        self.set_adapter_batches(decode, prefill)
        return self.model(batch, self.kv, with_hidden)

    def set_adapter_batches(self, decode: list[DecodeRow], prefill: list[PromptChunk]) -> None:
        """Each kind's batch view for this step: what every decode token and every chunk's tokens add."""
        spans, offset = [], len(decode)
        for chunk in prefill:
            spans.append((offset, offset + len(chunk.tokens), chunk.placement))
            offset += len(chunk.tokens)
        for kind, device in self.devices.items():
            device.set_batch([d.placement.of(kind) for d in decode], [(s, e, p.of(kind)) for s, e, p in spans])
