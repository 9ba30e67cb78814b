"""The int4 base: its kernel against the dequantized oracle, the 4-bit grid found again from weights that lie
on one (the default model ships as q4_1), and the shapes and devices it refuses with a clear error."""

import pytest
import torch
from tiny_models import make_tiny_model

from workers.errors import UnsupportedModelError
from workers.model.int4 import CANDIDATES, GROUP, dequantize_groups, int4_reference, pack, quantize_groups
from workers.model.loader import ModelSpec, load_decoder

# The kernel returns bf16 (its tokens are rounded to bf16): 1 % of the largest |output| covers bf16's rounding.
TOLERANCE = 1e-2


@pytest.mark.parametrize("name", list(CANDIDATES))
@pytest.mark.parametrize("rows", [1, 3, 16, 70])
def test_every_int4_candidate_equals_the_dequantized_reference(name, rows):
    torch.manual_seed(rows)
    q, scales, zeros = quantize_groups(torch.randn(96, 64))
    x, b = torch.randn(rows, 64), torch.randn(96)
    ref = int4_reference(x, q, scales, zeros, b)
    out = CANDIDATES[name](x, *pack(q, scales, zeros), b)
    assert out.shape == (rows, 96) and out.dtype == x.dtype
    assert ((out - ref).abs().max() / ref.abs().max()).item() <= TOLERANCE


def test_the_reference_is_the_product_with_the_dequantized_weights():
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    q, scales, zeros = quantize_groups(w)
    assert q.min() >= 0 and q.max() <= 15
    assert (dequantize_groups(q, scales, zeros) - w).abs().max() <= scales.max() / 2 + 1e-6  # within half a step
    x = torch.randn(2, 64).bfloat16().float()
    exact = x @ dequantize_groups(q, scales.bfloat16().float(), zeros.bfloat16().float()).t()
    torch.testing.assert_close(int4_reference(x, q, scales, zeros, None), exact)


def test_weights_on_a_q4_1_grid_are_found_again():
    """Blocks of 32 written as d · q + m with q spanning 0..15 (what llama.cpp's q4_1 stores): min-max per
    group recovers d and m, so the codes reproduce the weights."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (48, 4, GROUP), generator=gen)
    q[..., 0], q[..., 1] = 0, 15
    d, m = torch.rand(48, 4, 1, generator=gen) * 0.01, torch.randn(48, 4, 1, generator=gen) * 0.05
    w = (d * q + m).view(48, 4 * GROUP)
    assert (dequantize_groups(*quantize_groups(w)) - w).abs().max() <= 1e-6


def test_int4_refuses_shapes_its_kernel_cannot_take(tmp_path):
    folder, _ = make_tiny_model(tmp_path, "llama", hidden_size=48, num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(UnsupportedModelError, match="in_features % 32"):
        load_decoder(ModelSpec(str(folder), quantize="int4"))
    ok, _ = make_tiny_model(tmp_path / "ok", "llama")
    with pytest.raises(UnsupportedModelError, match="CPU only"):
        load_decoder(ModelSpec(str(ok), device="meta", quantize="int4"))
