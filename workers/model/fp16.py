"""An fp16-weight base (`--quantize fp16`, weight-only): each linear keeps W in IEEE half precision and computes
with fp32 activations and fp32 sums — llama.cpp's f16 files on CPU do the same (the engine's dtype is float32
under this mode: `auto` resolves to it, another --dtype is refused, as bf16 would round the weights first).
Half of fp32's bytes per step at ~1e-4 relative weight error (fp16 keeps 10 mantissa bits, bf16 7), and it needs
no bf16 instructions: on a CPU without them (AVX2 only) it is the half-size base that is fast.

Kernels (each equals `fp16_reference` up to fp32 summation order):
- `fbgemm_fp16` (x86 CPU): FBGEMM's fp16-weight GEMM (torch.ops.quantized.linear_dynamic_fp16), AVX2/AVX-512
  vectorized, over W packed once into FBGEMM's layout and kept beside it (a second copy of each weight it
  serves, packed again when W is written); tokens in fp32 for the call.
- `native_gemv`, `native_gemv_prefetch` (x86 CPU with AVX2, a C compiler): our own few-row GEMM
  widening W with F16C as it streams (workers.model.native_gemv); `native_gemv_packed`, the same over a copy of W
  packed by blocks of rows (one sequential stream per block).
- `dequant_linear`: F.linear over W converted to the tokens' dtype for the call (any device).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workers.model import native_gemv
from workers.model.decoder import QuantizedLinear
from workers.model.kernel_choice import packed_beside
from workers.model.linear_kernels import RowKernels


def fp16_reference(x: torch.Tensor, w16: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """The oracle: the tokens through the fp16 weights widened to fp32, in fp32."""
    return F.linear(x.float(), w16.float(), None if b is None else b.float())


def fbgemm_pack(w16: torch.Tensor) -> object:
    if w16.device.type != "cpu" or "fbgemm" not in torch.backends.quantized.supported_engines:
        raise NotImplementedError("FBGEMM's fp16 GEMM is a kernel of x86 CPU builds")
    return torch.ops.quantized.linear_prepack_fp16(w16.float(), None)


def fbgemm_fp16(x: torch.Tensor, w16: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    packed = packed_beside(w16, "_fbgemm_packed", fbgemm_pack)
    y = torch.ops.quantized.linear_dynamic_fp16(x.float().contiguous(), packed)  # [N, out] fp32
    return (y if b is None else y.add_(b)).to(x.dtype)


def dequant_linear(x: torch.Tensor, w16: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, w16.to(x.dtype), b)  # the engine's tokens are fp32 (MODES): W widened, not rounded


CANDIDATES = {"fbgemm_fp16": fbgemm_fp16, "dequant_linear": dequant_linear, "native_gemv": native_gemv.fp16,
              "native_gemv_prefetch": native_gemv.fp16_prefetch, "native_gemv_packed": native_gemv.fp16_packed}


def fp16_weights(out_features: int, in_features: int, dtype: torch.dtype, device: torch.device,
                 gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    return ((torch.randn(out_features, in_features, generator=gen, device=device) * 0.02).half(),)


class Fp16Linear(QuantizedLinear):
    """A Linear's weight in fp16."""

    def __init__(self, w16: torch.Tensor, bias: torch.Tensor | None, kernels: RowKernels):
        super().__init__()
        self.register_buffer("weight16", w16)  # [out, in] fp16
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.kernels = kernels
        self.out_features, self.in_features = w16.shape

    @classmethod
    def from_linear(cls, linear: nn.Linear, kernels: RowKernels, smooth: torch.Tensor | None = None) -> Fp16Linear:
        if smooth is not None:
            raise ValueError("fp16 is weight-only: its tokens are not quantized, so there is nothing to smooth")
        w16 = linear.weight.detach().to(torch.float16)
        return cls(w16, None if linear.bias is None else linear.bias.detach(), kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat, w16 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1]), self.weight16  # [N, in]
        y = self.kernels.get(w16.shape, flat.shape[0], flat.dtype, flat.device)(flat, w16, self.bias)
        return y if x.dim() == 2 else y.view(*x.shape[:-1], self.out_features)
