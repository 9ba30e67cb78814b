"""The fp16-weight base: every kernel against the fp32 oracle over the fp16 weights, FBGEMM's packed copy made
again after the weights are written, and the layer that holds the weights."""

import pytest
import torch
from torch import nn

from workers.model.fp16 import CANDIDATES, Fp16Linear, fp16_reference
from workers.model.kernel_choice import KernelTable
from workers.model.quantized import quantized_kernels

FBGEMM = "fbgemm" in torch.backends.quantized.supported_engines


def _candidates():
    return [pytest.param(n, marks=pytest.mark.skipif(n == "fbgemm_fp16" and not FBGEMM, reason="no FBGEMM (not x86)"))
            for n in CANDIDATES]


@pytest.mark.parametrize("name", _candidates())
@pytest.mark.parametrize("rows", [1, 3, 16, 70])
def test_every_fp16_candidate_equals_the_reference(name, rows):
    torch.manual_seed(rows)
    w16, x, b = torch.randn(96, 64).half(), torch.randn(rows, 64), torch.randn(96)
    out = CANDIDATES[name](x, w16, b)
    assert out.shape == (rows, 96) and out.dtype == torch.float32
    torch.testing.assert_close(out, fp16_reference(x, w16, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", _candidates())
def test_every_fp16_candidate_with_bf16_tokens_stays_within_bf16_rounding(name):
    torch.manual_seed(0)
    w16, x = torch.randn(48, 64).half(), torch.randn(5, 64).bfloat16()
    if name.startswith("native_gemv"):  # fp32 tokens only (the mode's own): refused, so a race leaves it out
        with pytest.raises(NotImplementedError):
            CANDIDATES[name](x, w16, None)
        return
    out = CANDIDATES[name](x, w16, None)
    ref = fp16_reference(x, w16, None)
    assert out.dtype == torch.bfloat16 and ((out.float() - ref).abs().max() / ref.abs().max()).item() <= 1e-2


@pytest.mark.skipif(not FBGEMM, reason="no FBGEMM (not x86)")
def test_fbgemm_packs_again_after_the_weights_are_written():
    w16, x = torch.randn(32, 64).half(), torch.randn(2, 64)
    before = CANDIDATES["fbgemm_fp16"](x, w16, None)
    w16.mul_(2)  # e.g. a write in place: the packed copy is stale
    torch.testing.assert_close(CANDIDATES["fbgemm_fp16"](x, w16, None), 2 * before)


def test_the_layer_keeps_fp16_weights_and_computes_like_the_reference():
    torch.manual_seed(1)
    linear = nn.Linear(64, 40)
    layer = Fp16Linear.from_linear(linear, quantized_kernels(KernelTable(None), override="dequant_linear",
                                                             mode="fp16"))
    assert layer.weight16.dtype == torch.float16 and not hasattr(layer, "weight")
    x = torch.randn(2, 3, 64)
    out = layer(x)  # any leading shape, as nn.Linear
    assert out.shape == (2, 3, 40)
    torch.testing.assert_close(out, linear(x), rtol=2e-3, atol=2e-3)  # fp16's rounding of the weights
    with pytest.raises(ValueError, match="weight-only"):
        Fp16Linear.from_linear(linear, layer.kernels, torch.ones(64))
