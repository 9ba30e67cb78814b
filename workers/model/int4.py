"""An int4 base (`--quantize int4`, weight-only, CPU): each linear keeps W as 4-bit codes in groups of 32
input channels, one scale and one offset per group (asymmetric min-max, the layout of llama.cpp's q4_1):
W[o, g·32 + j] ≈ (q - 8) · scale[o, g] + zero[o, g], q ∈ 0..15, zero = min + 8 · scale.

Kernel: `int4pack_mm`, ATen's weight-only int4 GEMM for CPUs (torch._weight_int4pack_mm_for_cpu, vectorized
for bf16 activations on AVX2 and AVX-512): a token's activations are rounded to bf16 for the call and its
result is returned in the compute dtype. It streams an eighth of fp32's bytes. Scales and offsets are kept
in bf16, as the kernel reads them. The default model ships as a q4_1 file, so its layers' weights are already
on such a grid: min-max per block of 32 finds the file's own scale and offset again. The lm_head stays in the
compute dtype (workers.model.quantized.MODES).
"""

from __future__ import annotations

import torch
from torch import nn

from workers.errors import UnsupportedModelError
from workers.model.decoder import QuantizedLinear
from workers.model.linear_kernels import RowKernels

GROUP = 32  # input channels per scale/offset (q4_1's block)
OUT_MULTIPLE = 16  # the CPU packing's granularity of output channels
LEVELS = 15  # q ∈ 0..15


def quantize_groups(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W [out, in] → (q [out, in] int32 in 0..15, scales [out, in/32] fp32, zeros [out, in/32] fp32)."""
    out_f, in_f = w.shape
    groups = w.float().view(out_f, in_f // GROUP, GROUP)  # [out, G, 32]
    lo, hi = groups.amin(-1), groups.amax(-1)  # [out, G]
    scales = ((hi - lo) / LEVELS).clamp(min=1e-8)
    q = torch.round((groups - lo[..., None]) / scales[..., None]).clamp_(0, LEVELS)
    return q.to(torch.int32).view(out_f, in_f), scales, lo + 8 * scales


def dequantize_groups(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """The weights the codes stand for: [out, in] fp32."""
    out_f, in_f = q.shape
    groups = (q.view(out_f, in_f // GROUP, GROUP).float() - 8) * scales[..., None] + zeros[..., None]
    return groups.view(out_f, in_f)


def pack(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes in the CPU kernel's packed layout [out, in/2] uint8, scales_and_zeros [in/32, out, 2] bf16)."""
    scales_and_zeros = torch.stack([scales.t(), zeros.t()], dim=-1).to(torch.bfloat16).contiguous()
    return torch._convert_weight_to_int4pack_for_cpu(q, 1), scales_and_zeros


def int4_reference(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   b: torch.Tensor | None) -> torch.Tensor:
    """The oracle of the int4 kernels: bf16-rounded tokens through the weights the codes stand for (with the
    scales and offsets rounded to bf16, as stored), in fp32."""
    xr = x.to(torch.bfloat16).float()
    w = dequantize_groups(q, scales.to(torch.bfloat16).float(), zeros.to(torch.bfloat16).float())
    y = xr @ w.t()
    return y if b is None else y + b.float()


def int4pack_mm(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor,
                b: torch.Tensor | None) -> torch.Tensor:
    y = torch._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16).contiguous(), packed, GROUP, scales_and_zeros)
    y = y.to(x.dtype)  # [N, out]
    return y if b is None else y.add_(b)


CANDIDATES = {"int4pack_mm": int4pack_mm}


def int4_weights(out_features: int, in_features: int, dtype: torch.dtype, device: torch.device,
                 gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Representative packed weights for timing the candidates."""
    return pack(*quantize_groups(torch.randn(out_features, in_features, generator=gen, device=device) * 0.02))


def check_shape(out_features: int, in_features: int, device: torch.device) -> None:
    if device.type != "cpu":
        raise UnsupportedModelError(f"--quantize int4 runs on CPU only (device {device.type}); use int8 or w8a8")
    if in_features % GROUP or out_features % OUT_MULTIPLE:
        raise UnsupportedModelError(f"--quantize int4 needs in_features % {GROUP} == 0 and out_features % "
                                    f"{OUT_MULTIPLE} == 0; this weight is [{out_features}, {in_features}]")


class Int4Linear(QuantizedLinear):
    """A Linear's weight as packed 4-bit codes + per-group bf16 scales and offsets."""

    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, in_features: int,
                 bias: torch.Tensor | None, kernels: RowKernels):
        super().__init__()
        self.register_buffer("packed", packed)  # [out, in/2] uint8, the kernel's layout
        self.register_buffer("scales_and_zeros", scales_and_zeros)  # [in/32, out, 2] bf16
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.kernels = kernels
        self.in_features, self.out_features = in_features, packed.shape[0]

    @classmethod
    def from_linear(cls, linear: nn.Linear, kernels: RowKernels, smooth: torch.Tensor | None = None) -> Int4Linear:
        if smooth is not None:
            raise ValueError("int4 is weight-only: its tokens are not quantized, so there is nothing to smooth")
        w = linear.weight.detach()
        check_shape(*w.shape, w.device)
        packed, scales_and_zeros = pack(*quantize_groups(w))
        return cls(packed, scales_and_zeros, w.shape[1], None if linear.bias is None else linear.bias.detach(),
                   kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # [N, in]
        fn = self.kernels.get((self.out_features, self.in_features), flat.shape[0], flat.dtype, flat.device)
        return fn(flat, self.packed, self.scales_and_zeros, self.bias).view(*x.shape[:-1], self.out_features)
