"""The small ops between a layer's GEMMs chosen by measurement (workers.model.layer_kernels): every candidate of the
residual add + RMSNorm equals RMSNorm.reference over x + delta, every RoPE + cache write equals
apply_rope_reference and KVCache.write_reference (in fp32; in bf16, the native ones equal torch's bf16 ops, which
round at the same steps), the native ones refuse what they cannot do (writing nothing),
the chooser keeps what the timer says is fastest, and a decoder forced onto each gets the reference's logits."""

import pytest
import torch
from tiny_models import make_tiny_model

from workers.model import native_gemv
from workers.model.decoder import RMSNorm
from workers.model.kernel_choice import KernelTable
from workers.model.layer_kernels import (
    NORM_CANDIDATES,
    ROPE_CANDIDATES,
    LayerKernels,
    norm_native,
    norm_torch,
    rope_write_torch,
)
from workers.model.loader import ModelSpec, load_decoder
from workers.model.rope import apply_rope_reference, signed_sin


def norm_inputs(rows: int, dim: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(rows * 13 + dim)
    norm = RMSNorm(dim, 1e-6).to(dtype).requires_grad_(False)  # as the loader leaves a served model
    with torch.no_grad():
        norm.weight.copy_(torch.rand(dim, generator=gen) + 0.5)
    x, delta = (torch.randn(rows, dim, generator=gen).to(dtype) for _ in range(2))
    return norm, x, delta


@pytest.mark.parametrize("name", list(NORM_CANDIDATES))
@pytest.mark.parametrize(("rows", "dim"), [(1, 576), (3, 100), (70, 64)])  # 100: a tail past 8-wide; 70: rows split
@pytest.mark.parametrize("with_delta", [False, True])
def test_every_norm_candidate_equals_the_reference_over_the_sum(name, rows, dim, with_delta):
    norm, x, delta = norm_inputs(rows, dim)
    x_before = x.clone()
    s, h = NORM_CANDIDATES[name](x, delta if with_delta else None, norm.weight, norm.eps, norm.forward)
    want = x + delta if with_delta else x
    torch.testing.assert_close(s, want, rtol=0, atol=0)
    torch.testing.assert_close(h, norm.reference(want), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x, x_before, rtol=0, atol=0)  # the residual it was given is not written


def rope_inputs(rows: int, heads: int, kv_heads: int, dim: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(rows * 7 + heads)
    q = torch.randn(rows, heads, dim, generator=gen).to(dtype)
    k, v = (torch.randn(rows, kv_heads, dim, generator=gen).to(dtype) for _ in range(2))
    angles = torch.rand(rows, 1, dim // 2, generator=gen).repeat(1, 1, 2) * 6.3
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    cache = (torch.randn(rows * kv_heads * 3, dim, generator=gen).to(dtype) for _ in range(2))
    index = torch.randperm(rows * kv_heads * 3, generator=gen)[:rows * kv_heads]
    return q, k, v, cos, sin, *cache, index


@pytest.mark.parametrize("name", list(ROPE_CANDIDATES))
@pytest.mark.parametrize(("rows", "heads", "kv_heads", "dim"), [(1, 9, 3, 64), (5, 4, 4, 16), (17, 6, 2, 10)])
def test_every_rope_candidate_rotates_q_and_writes_rotated_k_and_v_to_their_rows(name, rows, heads, kv_heads, dim):
    q, k, v, cos, sin_signed, k_rows, v_rows, index = rope_inputs(rows, heads, kv_heads, dim)
    sin = torch.cat([-sin_signed[..., :dim // 2], sin_signed[..., dim // 2:]], -1)  # signed_sin undone
    want_q, want_k = apply_rope_reference(q, cos, sin), apply_rope_reference(k, cos, sin)
    want_k_rows, want_v_rows = k_rows.clone(), v_rows.clone()
    want_k_rows[index], want_v_rows[index] = want_k.reshape(-1, dim), v.reshape(-1, dim)
    out = ROPE_CANDIDATES[name](q, k, v, cos, signed_sin(sin), k_rows, v_rows, index)
    torch.testing.assert_close(out, want_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_rows, want_k_rows, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v_rows, want_v_rows, rtol=0, atol=0)  # rows not in the index untouched


BF16_ULP = 2 ** -7  # one unit in bf16's last place, relative: where fp32 rsqrt and 1/sqrt round a tie apart


@pytest.mark.parametrize(("rows", "dim"), [(1, 576), (3, 100), (70, 64)])
@pytest.mark.parametrize("with_delta", [False, True])
def test_the_native_norm_in_bf16_rounds_where_torch_rounds(rows, dim, with_delta):
    norm, x, delta = norm_inputs(rows, dim, torch.bfloat16)
    s, h = norm_native(x, delta if with_delta else None, norm.weight, norm.eps, norm.forward)
    want_s, want_h = norm_torch(x, delta if with_delta else None, norm.weight, norm.eps, norm.forward)
    assert s.dtype == h.dtype == torch.bfloat16
    torch.testing.assert_close(s, want_s, rtol=0, atol=0)  # one bf16 add: the same rounding
    torch.testing.assert_close(h.float(), want_h.float(), rtol=BF16_ULP, atol=0)
    assert (h == want_h).float().mean().item() >= 0.99  # all but the rare tie


@pytest.mark.parametrize(("rows", "heads", "kv_heads", "dim"), [(1, 9, 3, 64), (17, 6, 2, 10)])
def test_the_native_rope_in_bf16_rounds_where_torch_rounds(rows, heads, kv_heads, dim):
    q, k, v, cos, sin, k_rows, v_rows, index = rope_inputs(rows, heads, kv_heads, dim, torch.bfloat16)
    want = [t.clone() for t in (q, k, k_rows, v_rows)]
    want_q = rope_write_torch(*want[:2], v, cos, sin, *want[2:], index)
    got_q = native_gemv.rope_write(q, k, v, cos, sin, k_rows, v_rows, index)
    assert got_q.dtype == torch.bfloat16
    for got, expected in ((got_q, want_q), (k_rows, want[2])):
        torch.testing.assert_close(got.float(), expected.float(), rtol=BF16_ULP, atol=1e-6)
    torch.testing.assert_close(v_rows, want[3], rtol=0, atol=0)


def test_the_native_ops_refuse_what_they_cannot_do_and_write_nothing():
    norm, x, delta = norm_inputs(2, 32, torch.float16)
    with pytest.raises(NotImplementedError):
        native_gemv.add_rms_norm(x, delta, norm.weight, norm.eps)
    with pytest.raises(NotImplementedError):  # dtypes mixed
        native_gemv.add_rms_norm(x.bfloat16(), delta.float(), norm.weight.bfloat16(), norm.eps)
    _, x, delta = norm_inputs(2, 32)
    with pytest.raises(ValueError):
        native_gemv.add_rms_norm(x, delta[:, :16], torch.ones(32), 1e-6)
    q, k, v, cos, sin, k_rows, v_rows, index = rope_inputs(3, 4, 2, 16)
    with pytest.raises(NotImplementedError):
        native_gemv.rope_write(q.bfloat16(), k, v, cos, sin, k_rows, v_rows, index)
    before = [t.clone() for t in (q, k, k_rows, v_rows)]
    index[2] = k_rows.shape[0]  # one row past the cache
    with pytest.raises(IndexError):
        native_gemv.rope_write(q, k, v, cos, sin, k_rows, v_rows, index)
    for t, b in zip((q, k, k_rows, v_rows), before, strict=True):
        torch.testing.assert_close(t, b, rtol=0, atol=0)


@pytest.mark.parametrize("fastest", ["torch", "native"])
def test_the_chooser_keeps_what_the_timer_measures_fastest(fastest):
    def timer(name, call):
        call()
        return 0.001 if name == fastest else 0.005

    table = KernelTable(None)
    kernels = LayerKernels(table, timer=timer)
    _, x, _ = norm_inputs(3, 48)
    q, k, *_ = rope_inputs(1, 9, 3, 64)
    assert kernels.norm(x, True) is NORM_CANDIDATES[fastest]
    assert kernels.rope(q, k) is ROPE_CANDIDATES[fastest]
    assert table.entries["add_rms_norm 48 rows 2-4 float32 cpu"]["choice"] == fastest
    assert table.entries["rope_write 9x3x64 rows 1 float32 cpu"]["choice"] == fastest
    _, x16, _ = norm_inputs(3, 48, torch.float16)  # the native op refuses fp16: left out of the race
    assert kernels.norm(x16, False) is norm_torch
    assert kernels.rope(q.half(), k.half()) is rope_write_torch


@pytest.mark.parametrize("name", list(NORM_CANDIDATES))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_decoder_forced_onto_each_gets_the_reference_logits(tmp_path, name, dtype):
    """fp32: to 1e-5; bf16: within 1e-2 of the largest logit (a tie rounded the other way moves what follows)."""
    from test_decoder import run_logits

    folder, _ = make_tiny_model(tmp_path, "llama")
    spec = ModelSpec(str(folder), dtype=dtype)
    forced, reference = load_decoder(spec), load_decoder(spec)
    chosen = LayerKernels(KernelTable(None), override=name)
    for module in forced.modules():
        if isinstance(module, RMSNorm):
            module.kernels = chosen
        elif hasattr(module, "layer_kernels"):
            module.layer_kernels = chosen
    for module in reference.modules():
        if isinstance(module, RMSNorm):
            module.kernels, module.forward = None, module.reference  # the plain forms
        elif hasattr(module, "layer_kernels"):
            module.layer_kernels = None
    ids = torch.randint(0, 256, (9,)).tolist()
    tolerance = 1e-5 if dtype == "float32" else 1e-2
    for ours, ref in zip(run_logits(forced, ids[:6], ids[6:]), run_logits(reference, ids[:6], ids[6:]), strict=True):
        assert ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item() <= tolerance
