"""An int8 base: each linear keeps W as int8 with one fp scale per output channel
(W ≈ q · s, q = round(W / s), s = max|W_row| / 127). Two modes:

- `int8`, weight-only: activations stay in the compute dtype. Kernels:
  `int8pack_mm`: torch._weight_int8pack_mm(x, q, s), ATen's weight-only int8 GEMM;
  `dequant_linear`: F.linear(x, q · s) with the weights dequantized for the call;
  `native_gemv`, `native_gemv_prefetch` (x86 CPU with AVX2, a C compiler; fp32 tokens): our own
  few-row GEMM widening q as it streams, the scale applied to each sum (workers.model.native_gemv);
  `native_gemv_packed`, the same over a copy of q packed by blocks of rows, one sequential stream per block.
- `w8a8`: activations too are quantized to int8 at run time, one symmetric scale per token (row), so a
  token's result does not depend on the rest of its batch; int8 × int8 products accumulate exactly in
  int32 (torch._int_mm), the output is scaled back by the token's and the channel's scales. It streams
  int8 weights through an int8 GEMM, where weight-only int8 has no fast kernel on many CPUs; its error is
  the weights' rounding plus the activations', which smoothing calibrated at load keeps down
  (workers.model.smoothing; README §Precision). Kernels: `int_mm`; `dequant_linear`, the same product in
  float with the weights dequantized for the call (faster for many rows where int8 GEMMs are slow); `native_gemv`,
  the quantized tokens through the native int8 GEMV.
Two more modes live in their own modules: `int4` (weight-only, 4-bit groups; workers.model.int4) and `fp16`
(weight-only, half precision; workers.model.fp16). `MODES` holds all four.
Every mode's kernels are chosen per shape, row bucket and dtype by measurement like the dense ones.
Adapters (LoRA, S²FT) wrap these layers and add their deltas in the compute dtype, as over a dense base;
fusion (merging an adapter into the base weights) is off for a quantized base.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from workers.errors import UnsupportedModelError
from workers.model import fp16, int4, native_gemv
from workers.model.decoder import Decoder, Linear, QuantizedLinear
from workers.model.kernel_choice import KernelTable, Timer
from workers.model.linear_kernels import RowKernels, WeightFactory
from workers.model.smoothing import activation_absmax, smoothing_factors


def int8pack_mm(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    y = torch._weight_int8pack_mm(x.contiguous(), q, scales)  # [N, out]
    return y if b is None else y.add_(b)


def dequant_linear(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, q.to(x.dtype) * scales[:, None], b)


CANDIDATES = {"int8pack_mm": int8pack_mm, "dequant_linear": dequant_linear, "native_gemv": native_gemv.int8,
              "native_gemv_prefetch": native_gemv.int8_prefetch, "native_gemv_packed": native_gemv.int8_packed}


def quantize_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, in] → (xq [N, in] int8, sx [N, 1] float32), symmetric per row: x ≈ xq · sx."""
    sx = x.abs().amax(dim=1, keepdim=True).float().clamp_(min=1e-12).div_(127.0)  # [N, 1]
    return torch.round(x / sx).to(torch.int8), sx


def w8a8_reference(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """The oracle of the w8a8 kernels: the dequantized GEMM of the fake-quantized tokens, in fp32."""
    xq, sx = quantize_tokens(x)
    return F.linear(xq.float() * sx, q.float() * scales.float()[:, None], None if b is None else b.float())


def w8a8_int_mm(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    xq, sx = quantize_tokens(x)
    y = torch._int_mm(xq, q.t()).mul(sx).mul_(scales).to(x.dtype)  # [N, out] int32 → scaled
    return y if b is None else y.add_(b)


def w8a8_dequant_linear(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor,
                        b: torch.Tensor | None) -> torch.Tensor:
    """The same product in float (fake-quantized tokens through the dequantized weights): where the CPU has no
    fast int8 GEMM (no VNNI), for many rows."""
    xq, sx = quantize_tokens(x)
    y = F.linear(xq.float(), q.float()).mul_(sx).mul_(scales).to(x.dtype)  # [N, out]: int products, fp32 sums
    return y if b is None else y.add_(b)


def w8a8_native_gemv(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """The same product through the native int8 GEMV (int8 weights widened as they stream, fp32 sums): the
    token's integers are exact in fp32, so only the summation order differs from `int_mm`."""
    xq, sx = quantize_tokens(x)
    y = native_gemv.int8(xq.float(), q, scales, None).mul_(sx).to(x.dtype)  # [N, out]
    return y if b is None else y.add_(b)


W8A8_CANDIDATES = {"int_mm": w8a8_int_mm, "dequant_linear": w8a8_dequant_linear, "native_gemv": w8a8_native_gemv}


def quantize_rows(w: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """W [out, in] → (q [out, in] int8, scales [out] in `dtype`), symmetric per output channel."""
    w = w.float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # [out]
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales.to(dtype)


def int8_weights(out_features: int, in_features: int, dtype: torch.dtype, device: torch.device,
                 gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    return quantize_rows(torch.randn(out_features, in_features, generator=gen, device=device) * 0.02, dtype)


class Int8Linear(QuantizedLinear):
    """A Linear's weight as int8 + per-channel scales."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, kernels: RowKernels,
                 inv_smooth: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("qweight", q)  # [out, in] int8
        self.register_buffer("scales", scales)  # [out]
        self.register_buffer("inv_smooth", inv_smooth)  # [in] or None: inputs are divided by the smoothing s
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.kernels = kernels
        self.in_features, self.out_features = q.shape[1], q.shape[0]

    @classmethod
    def from_linear(cls, linear: nn.Linear, kernels: RowKernels, smooth: torch.Tensor | None = None) -> Int8Linear:
        """smooth: [in] factors s (W · s is quantized, inputs are divided by s), or None."""
        dtype, w = linear.weight.dtype, linear.weight.detach()
        q, scales = quantize_rows(w if smooth is None else w.float() * smooth, dtype)
        inv = None if smooth is None else (1 / smooth).to(dtype)
        return cls(q, scales, None if linear.bias is None else linear.bias.detach(), kernels, inv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])  # [N, in]
        if self.inv_smooth is not None:
            flat = flat * self.inv_smooth
        q = self.qweight
        y = self.kernels.get(q.shape, flat.shape[0], flat.dtype, flat.device)(flat, q, self.scales, self.bias)
        return y if x.dim() == 2 else y.view(*x.shape[:-1], self.out_features)


@dataclass(frozen=True)
class QuantizeMode:
    """What one --quantize mode is made of."""

    candidates: dict[str, Callable]  # its kernels, raced per shape, row bucket and dtype
    weights: WeightFactory  # representative quantized weights to time them on
    # (linear, kernels, smoothing factors or None) → layer
    layer: Callable[[nn.Linear, RowKernels, torch.Tensor | None], QuantizedLinear]
    smoothed: bool = False  # calibrate SmoothQuant factors on the float model first (activations quantized)
    dense_lm_head: bool = False  # the lm_head stays in the compute dtype
    fp32_tokens: bool = False  # the compute dtype is fp32 (auto resolves to it; another dtype is refused)


MODES = {  # --quantize mode → how
    "int8": QuantizeMode(CANDIDATES, int8_weights, Int8Linear.from_linear),
    "w8a8": QuantizeMode(W8A8_CANDIDATES, int8_weights, Int8Linear.from_linear, smoothed=True),
    # int4 keeps the lm_head dense, as 4-bit schemes (AWQ, GPTQ, llama.cpp's q4 files) keep their output layer
    # wider: the default model's lm_head (its tied embedding) ships as q8_0, and 4 bits cost it 9 % RMS error
    "int4": QuantizeMode(int4.CANDIDATES, int4.int4_weights, int4.Int4Linear.from_linear, dense_lm_head=True),
    # fp16 weights need fp32 tokens: loaded in bf16 first, or multiplied in bf16, they would keep bf16's precision
    "fp16": QuantizeMode(fp16.CANDIDATES, fp16.fp16_weights, fp16.Fp16Linear.from_linear, fp32_tokens=True),
}


def quantized_kernels(table: KernelTable, override: str | None = None, timer: Timer | None = None,
                      working_set: int = 0, mode: str = "int8") -> RowKernels:
    how = MODES[mode]
    return RowKernels(mode, how.candidates, table, override, timer, weights=how.weights, working_set=working_set)


def quantize_decoder(model: Decoder, kernels: RowKernels) -> None:
    """Every Linear of the decoder (the lm_head too unless the mode keeps it dense; the embedding table stays
    dense for lookups) becomes the quantized layer of its mode (kernels.op), in place; w8a8's smoothed by
    factors calibrated on the float model."""
    how = MODES[kernels.op]
    absmax = activation_absmax(model) if how.smoothed else {}
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, Linear) or (how.dense_lm_head and child is model.lm_head):
                continue
            smooth = smoothing_factors(absmax[child], child.weight) if how.smoothed else None
            try:
                setattr(parent, name, how.layer(child, kernels, smooth))
            except UnsupportedModelError as e:  # name the layer the mode cannot take
                raise UnsupportedModelError(f"{parent_name}.{name}: {e}") from e
