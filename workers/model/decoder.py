"""A compact decoder for the Llama family (llama, qwen2, mistral) as plain modules.

Parameter names follow Hugging Face (`model.layers.{i}.self_attn.q_proj.weight`, ...), so checkpoints
load by name. Activations are flat: x is [tokens, hidden] for every token of the step, whatever sequence
it belongs to; attention is the only place that looks at sequences (through the StepBatch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workers.model.attention_kernels import AttentionKernels, sdpa
from workers.model.batch import StepBatch
from workers.model.config import DecoderConfig
from workers.model.kv_cache import KVCache
from workers.model.layer_kernels import LayerKernels, norm_torch, rms_norm_plain, rms_norm_reference, rope_write_torch
from workers.model.linear_kernels import RowKernels


class Linear(nn.Linear):
    """nn.Linear whose 2-D forward runs the kernel measured fastest on this machine for its shape, row
    count and dtype (workers.model.linear_kernels); F.linear until the loader sets `kernels`."""

    kernels: RowKernels | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels is None or x.dim() != 2:
            return F.linear(x, self.weight, self.bias)
        w = self.weight
        return self.kernels.get(w.shape, x.shape[0], w.dtype, w.device)(x, w, self.bias)


class QuantizedLinear(nn.Module):
    """A base linear whose weight is stored quantized (workers.model.quantized, workers.model.int4): no `weight`
    attribute, so nothing (fusion, a training step) can write float values into it unnoticed. Adapter wrappers
    take it as they take a dense Linear."""

    in_features: int
    out_features: int


class RMSNorm(nn.Module):
    kernels: LayerKernels | None = None  # the measured residual add + norm; torch's ops until the loader sets it

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def add_forward(self, x: torch.Tensor, delta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, forward(x + delta)), x and delta [N, dim]; delta None: (x, forward(x))."""
        fn = norm_torch if self.kernels is None else self.kernels.norm(x, delta is not None)
        return fn(x, delta, self.weight, self.eps, self.forward)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm_plain(x, self.weight, self.eps)  # one fused op in fp32, equal to the reference

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm_reference(x, self.weight, self.eps)


class Attention(nn.Module):
    kernels: AttentionKernels | None = None  # the measured decode attention; SDPA until the loader sets it
    layer_kernels: LayerKernels | None = None  # the measured RoPE + cache write; torch's ops until the loader sets it

    def __init__(self, cfg: DecoderConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.q_proj = Linear(cfg.hidden_size, q_dim, bias=cfg.qkv_bias)
        self.k_proj = Linear(cfg.hidden_size, kv_dim, bias=cfg.qkv_bias)
        self.v_proj = Linear(cfg.hidden_size, kv_dim, bias=cfg.qkv_bias)
        self.o_proj = Linear(q_dim, cfg.hidden_size, bias=cfg.o_bias)

    def forward(self, x: torch.Tensor, batch: StepBatch, kv: KVCache) -> torch.Tensor:
        n = x.shape[0]
        q = self.q_proj(x).view(n, self.num_heads, self.head_dim)  # [N, H, D]
        k = self.k_proj(x).view(n, self.num_kv_heads, self.head_dim)  # [N, KVH, D]
        v = self.v_proj(x).view(n, self.num_kv_heads, self.head_dim)
        rope_write = rope_write_torch if self.layer_kernels is None else self.layer_kernels.rope(q, k)
        q = rope_write(q, k, v, batch.cos, batch.sin, *kv.layer_rows(self.layer), kv.row_index(batch))
        if not batch.prefill:  # decode rows only: attention's output is the whole step's
            return self.o_proj(self._decode_attention(q, batch, kv).reshape(n, -1))
        out = torch.empty_like(q)  # [N, H, D]
        if batch.num_decode:
            out[:batch.num_decode] = self._decode_attention(q, batch, kv)
        for chunk in batch.prefill:
            rows = slice(chunk.offset, chunk.offset + chunk.length)
            keys, values = kv.prefix_view(self.layer, chunk.slot, chunk.start + chunk.length)
            qc = q[rows].transpose(0, 1).unsqueeze(0)  # [1, H, T, D]
            o = F.scaled_dot_product_attention(qc, keys, values, attn_mask=chunk.mask, enable_gqa=True)
            out[rows] = o[0].transpose(0, 1)
        return self.o_proj(out.view(n, -1))

    def _decode_attention(self, q: torch.Tensor, batch: StepBatch, kv: KVCache) -> torch.Tensor:
        """[Bd, H, D]: each decode row's attention over its own sequence's cached keys and values."""
        keys, values = kv.decode_view(self.layer, batch)  # [Bd, KVH, S, D]
        qd = q[:batch.num_decode].unsqueeze(2)  # [Bd, H, 1, D]
        fn = sdpa if self.kernels is None else self.kernels.get(qd, keys, batch.decode_mask)
        return fn(qd, keys, values, batch.decode_mask).squeeze(2)


class MLP(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, delta: torch.Tensor | None, batch: StepBatch,
                kv: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, delta) → (x', delta'): the residual stream and what the previous layer adds to it, added here with
        the norm that reads the sum (one op where the measured kernel fuses them)."""
        x, h = self.input_layernorm.add_forward(x, delta)
        x, h = self.post_attention_layernorm.add_forward(x, self.self_attn(h, batch, kv))
        return x, self.mlp(h)


class DecoderBody(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Decoder(nn.Module):
    """Causal LM: `forward` returns next-token logits for the batch's `logits_rows` only."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.config = cfg
        self.model = DecoderBody(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def hidden_states(self, batch: StepBatch, kv: KVCache) -> torch.Tensor:
        x, delta = self.model.embed_tokens(batch.input_ids), None  # [N, hidden]
        for layer in self.model.layers:
            x, delta = layer(x, delta, batch, kv)
        return self.model.norm.add_forward(x, delta)[1]

    def forward(self, batch: StepBatch, kv: KVCache,
                with_hidden: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits [R, vocab] fp32; with_hidden: also the final hidden states [R, hidden] they came from
        (what Medusa heads read)."""
        h = self.hidden_states(batch, kv)[batch.logits_rows]  # [R, hidden]
        logits = self.lm_head(h).float()  # [R, vocab]
        return (logits, h) if with_hidden else logits

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (the embeddings'; a quantized base keeps its linears' weights in int8)."""
        return self.model.embed_tokens.weight.dtype
