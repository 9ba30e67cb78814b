"""The w8a8 base: int8 weights and per-token int8 activations, its kernels against their oracle, per-token
scales (a token's result does not depend on its batch), and the smoothing calibrated at load."""

import pytest
import torch
import torch.nn.functional as F
from tiny_models import make_tiny_model

from workers.model.decoder import Linear
from workers.model.kernel_choice import KernelTable
from workers.model.loader import ModelSpec, load_decoder
from workers.model.quantized import W8A8_CANDIDATES, Int8Linear, quantize_rows, quantized_kernels, w8a8_reference
from workers.model.smoothing import activation_absmax, smoothing_factors


@pytest.mark.parametrize("name", list(W8A8_CANDIDATES))
@pytest.mark.parametrize("rows", [1, 3, 16, 70])
def test_every_w8a8_candidate_equals_the_fake_quantized_reference(name, rows):
    torch.manual_seed(rows)
    q, scales = quantize_rows(torch.randn(80, 48), torch.float32)
    x, b = torch.randn(rows, 48), torch.randn(80)
    ref = w8a8_reference(x, q, scales, b)
    assert ((W8A8_CANDIDATES[name](x, q, scales, b) - ref).abs().max() / ref.abs().max()).item() <= 1e-5


@pytest.mark.parametrize("name", list(W8A8_CANDIDATES))
def test_every_w8a8_candidate_in_bf16_stays_within_bf16_rounding_of_the_reference(name):
    torch.manual_seed(1)
    q, scales = quantize_rows(torch.randn(80, 48), torch.bfloat16)
    x = torch.randn(16, 48).bfloat16()
    ref = w8a8_reference(x.float(), q, scales.float(), None)
    out = W8A8_CANDIDATES[name](x, q, scales, None)
    assert out.dtype == torch.bfloat16
    assert ((out.float() - ref).abs().max() / ref.abs().max()).item() <= 1e-2


@pytest.mark.parametrize("name", list(W8A8_CANDIDATES))
def test_a_tokens_result_does_not_depend_on_its_batch(name):
    torch.manual_seed(0)
    q, scales = quantize_rows(torch.randn(64, 32), torch.float32)
    x = torch.randn(8, 32)
    x[3] *= 100  # one loud token: a scale shared with the batch would flatten the others
    batched = W8A8_CANDIDATES[name](x, q, scales, None)
    alone = torch.cat([W8A8_CANDIDATES[name](x[i:i + 1], q, scales, None) for i in range(8)])
    # int_mm's int32 sums are exact; a float GEMM's rounding may follow the batch's size (~1e-4 here), while a
    # scale shared with the loud token would move the others by whole quantization steps
    tolerance = 1e-6 if name == "int_mm" else 1e-3
    torch.testing.assert_close(batched, alone, rtol=tolerance, atol=tolerance)


def test_smoothing_keeps_the_product_and_shrinks_the_error_of_an_outlier_channel():
    torch.manual_seed(0)
    linear = Linear(64, 96, bias=False)
    torch.nn.init.normal_(linear.weight, std=0.05)
    x = torch.randn(32, 64)
    x[:, 5] *= 60  # an outlier input channel, as LLM activations have
    kernels = quantized_kernels(KernelTable(None), override="int_mm", mode="w8a8")
    ref = F.linear(x, linear.weight)
    s = smoothing_factors(x.abs().amax(0), linear.weight)
    torch.testing.assert_close(F.linear(x / s, linear.weight * s), ref, rtol=1e-4, atol=1e-4)  # same product
    plain, smoothed = Int8Linear.from_linear(linear, kernels), Int8Linear.from_linear(linear, kernels, smooth=s)
    plain_err = ((plain(x) - ref).abs().max() / ref.abs().max()).item()
    smoothed_err = ((smoothed(x) - ref).abs().max() / ref.abs().max()).item()
    assert smoothed_err < plain_err / 2, (smoothed_err, plain_err)


def test_calibration_sees_every_linear_of_the_float_model(tmp_path):
    folder, _ = make_tiny_model(tmp_path, "llama")
    model = load_decoder(ModelSpec(str(folder), dtype="float32"))
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    absmax = activation_absmax(model)
    assert set(absmax) == set(linears)
    assert all(a.shape == (m.in_features,) and bool((a > 0).all()) for m, a in absmax.items())
    assert all(not m._forward_pre_hooks for m in linears)  # the hooks are gone
    again = activation_absmax(model)  # seeded: the same factors on every load
    assert all(torch.equal(absmax[m], again[m]) for m in linears)
