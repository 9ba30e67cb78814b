"""A weight-only int8 base: each linear keeps W as int8 with one fp scale per output channel
(W ≈ q · s, q = round(W / s), s = max|W_row| / 127), activations stay in the compute dtype.

Kernels (torch's own ops, chosen per shape, row bucket and dtype by measurement like the dense ones):
- `int8pack_mm`: torch._weight_int8pack_mm(x, q, s), ATen's weight-only int8 GEMM;
- `dequant_linear`: F.linear(x, q · s) with the weights dequantized for the call.
Adapters (LoRA, S²FT) wrap these layers and add their deltas in the compute dtype, as over a dense base;
fusion (merging an adapter into the base weights) is off for an int8 base.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workers.model.decoder import Decoder, Linear
from workers.model.kernel_choice import KernelTable, Timer
from workers.model.linear_kernels import RowKernels

QUANTIZE_MODES = ("int8",)


def int8pack_mm(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    y = torch._weight_int8pack_mm(x.contiguous(), q, scales)  # [N, out]
    return y if b is None else y.add_(b)


def dequant_linear(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, q.to(x.dtype) * scales[:, None], b)


CANDIDATES = {"int8pack_mm": int8pack_mm, "dequant_linear": dequant_linear}


def quantize_rows(w: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """W [out, in] → (q [out, in] int8, scales [out] in `dtype`), symmetric per output channel."""
    w = w.float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # [out]
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales.to(dtype)


def int8_weights(out_features: int, in_features: int, dtype: torch.dtype, device: torch.device,
                 gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    return quantize_rows(torch.randn(out_features, in_features, generator=gen, device=device) * 0.02, dtype)


def int8_kernels(table: KernelTable, override: str | None = None, timer: Timer | None = None,
                 working_set: int = 0) -> RowKernels:
    return RowKernels("int8", CANDIDATES, table, override, timer, weights=int8_weights, working_set=working_set)


class Int8Linear(nn.Module):
    """A Linear's weight as int8 + per-channel scales; no `weight` attribute, so nothing (fusion, a
    training step) can write float values into it unnoticed."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, kernels: RowKernels):
        super().__init__()
        self.register_buffer("qweight", q)  # [out, in] int8
        self.register_buffer("scales", scales)  # [out]
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.kernels = kernels
        self.in_features, self.out_features = q.shape[1], q.shape[0]

    @classmethod
    def from_linear(cls, linear: nn.Linear, kernels: RowKernels) -> Int8Linear:
        dtype = linear.weight.dtype
        q, scales = quantize_rows(linear.weight.detach(), dtype)
        return cls(q, scales, None if linear.bias is None else linear.bias.detach(), kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # [N, in]
        fn = self.kernels.get(self.qweight.shape, flat.shape[0], flat.dtype, flat.device)
        return fn(flat, self.qweight, self.scales, self.bias).view(*x.shape[:-1], self.out_features)


def quantize_decoder(model: Decoder, kernels: RowKernels) -> None:
    """Every Linear of the decoder (lm_head included; the embedding table stays dense for lookups)
    becomes an Int8Linear, in place."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Linear):
                setattr(parent, name, Int8Linear.from_linear(child, kernels))
