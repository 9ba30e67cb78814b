"""The model runner: the base decoder with adapter layers attached, its KV cache and RoPE tables.
`forward` turns one step's plan into logits."""

from __future__ import annotations

import torch

from workers.adapters.layers import AdapterContext, attach_adapter_layers
from workers.adapters.manager import DevicePlacement
from workers.adapters.ops import build_adapter_batch
from workers.adapters.s2ft_ops import S2FTContext, S2FTDeviceStore, attach_s2ft_layers, build_s2ft_batch
from workers.adapters.slots import LoRARowBank
from workers.engine.config import EngineConfig
from workers.model.batch import build_step_batch
from workers.model.kv_cache import KVCache
from workers.model.loader import ModelSpec, load_decoder
from workers.model.rope import rope_tables


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
        self.bank = LoRARowBank(mc, cfg.max_loras * cfg.max_rank, self.dtype, self.device, cfg.lora_targets)
        self.adapter_ctx = AdapterContext(cfg.lora_kernel)
        attach_adapter_layers(self.model, self.bank, self.adapter_ctx)
        self.s2ft = S2FTDeviceStore(mc.num_layers, self.dtype, self.device)
        self.s2ft_ctx = S2FTContext(cfg.lora_kernel)
        attach_s2ft_layers(self.model, self.s2ft, self.s2ft_ctx)  # outermost: over the LoRA wrappers

    @torch.inference_mode()
    def forward(self, decode: list[tuple[int, int, int, DevicePlacement]],
                prefill: list[tuple], with_hidden: bool = False):
        """decode: (kv_slot, position, token, adapter placement) per decoding sequence;
        prefill: (kv_slot, start, tokens, wants_logits, adapter placement[, tree layout]) per chunk (a tree:
        a Medusa tree to verify). Returns logits [rows, vocab] for the decode rows, then the chunks that want
        logits (every node of a tree); with_hidden: (logits, final hidden states [rows, hidden])."""
        batch = build_step_batch([d[:3] for d in decode], [(*p[:4], *p[5:6]) for p in prefill], self.cos,
                                 self.sin, self.config.sliding_window, self.device)
        chunks, offset = [], len(decode)
        for _, _, tokens, _, placement, *_ in prefill:
            chunks.append((offset, offset + len(tokens), placement))
            offset += len(tokens)
        self.adapter_ctx.batch = build_adapter_batch(
            [d[3].lora_rows for d in decode], [(s, e, p.lora_rows) for s, e, p in chunks], self.dtype, self.device)
        self.s2ft_ctx.batch = build_s2ft_batch(
            [d[3].s2ft_ids for d in decode], [(s, e, p.s2ft_ids) for s, e, p in chunks], self.device)
        return self.model(batch, self.kv, with_hidden)
