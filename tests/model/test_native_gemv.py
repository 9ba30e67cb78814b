"""The native few-row GEMMs (workers/model/gemv.c) equal F.linear over the same weights, in each weight format
(bf16: bf16 tokens in and out, within bf16's rounding of the fp32 result),
at row counts and shapes that leave tails (out not a multiple of the 4-row block, in not a multiple of 8), on one
thread and on two, with and without prefetching; and they refuse what they cannot do, so the race leaves them out."""

import pytest
import torch
import torch.nn.functional as F

from workers.model import native_gemv
from workers.model.quantized import quantize_rows

SHAPES = [(80, 48), (70, 100), (3, 9), (1536, 576)]


def reference(kind: str, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None):
    """(the tokens, the weights and bias the kernel is given, extra args, the fp32 oracle)"""
    if kind == "dense":
        return x, w, b, (), F.linear(x, w, b)
    if kind == "bf16":
        x, w, b = x.bfloat16(), w.bfloat16(), b.bfloat16()
        return x, w, b, (), F.linear(x.float(), w.float(), b.float())
    if kind == "fp16":
        w16 = w.half()
        return x, w16, b, (), F.linear(x, w16.float(), b)
    q, scales = quantize_rows(w, torch.float32)
    return x, q, b, (scales,), F.linear(x, q.float() * scales[:, None], b)


@pytest.mark.parametrize("kind", ["dense", "bf16", "fp16", "int8"])
@pytest.mark.parametrize("prefetch", ["", "_prefetch", "_packed"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("threads", [1, 2])
def test_each_format_equals_f_linear(kind, prefetch, shape, rows, threads):
    torch.manual_seed(rows * 7 + shape[0])
    w, x, b = torch.randn(*shape), torch.randn(rows, shape[1]), torch.randn(shape[0])
    fn = getattr(native_gemv, ("dense" if kind == "bf16" else kind) + prefetch)  # bf16 weights: dense's kernel
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x, weights, b, extra, ref = reference(kind, x, w, b)
        out = fn(x, weights, *extra, b)
        no_bias = fn(x, weights, *extra, None)
    finally:
        torch.set_num_threads(before)
    assert out.shape == ref.shape and out.dtype == x.dtype and out.is_contiguous()
    if kind == "bf16":  # the fp32 sum rounded once to bf16 (to nearest: within 2⁻⁹ of it, 2⁻⁸ with sum order)
        torch.testing.assert_close(out.float(), ref, rtol=2 ** -8, atol=1e-6 * ref.abs().max().item())
        scale = ref.abs().max().item()
        torch.testing.assert_close(no_bias.float(), ref - b.float(), rtol=2 ** -8, atol=2 ** -8 * scale)
        return
    assert ((out - ref).abs().max() / ref.abs().max()).item() <= 1e-5
    torch.testing.assert_close(no_bias, ref - b, rtol=1e-5, atol=1e-4)


def test_packed_weights_are_kept_beside_w_and_packed_again_when_w_is_written():
    torch.manual_seed(1)
    w, x = torch.randn(70, 100), torch.randn(2, 100)
    packed = native_gemv.packed(w)
    assert packed.shape == native_gemv.packed_shape(70, 100) == (18, 13, 4, 8)
    assert native_gemv.packed(w) is packed  # made once
    assert packed[17, 12, 2:].abs().sum() == 0 and packed[0, 12, :, 4:].abs().sum() == 0  # the padding is zeros
    torch.testing.assert_close(packed[1, 2, 3], w[7, 16:24])  # block 1, weights 16..23 of its 4th row
    with torch.no_grad():
        w.mul_(2)  # written in place, as fusion writes a base weight
    torch.testing.assert_close(native_gemv.dense_packed(x, w, None), F.linear(x, w), rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError):  # packed weights of another shape are refused, not read out of bounds
        native_gemv._run("gemv_f32_packed", x, w, None, 0, packed_w=native_gemv.pack_rows(torch.randn(70, 90)))


def test_strided_tokens_are_read_as_their_values():
    torch.manual_seed(0)
    w, x = torch.randn(40, 24), torch.randn(24, 5).t()  # x [5, 24], not contiguous
    torch.testing.assert_close(native_gemv.dense(x, w, None), F.linear(x, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["bf16 tokens", "fp32 tokens to bf16 weights", "fp16 weights to the fp32 kernel",
                                  "a graph to keep"])
def test_what_it_cannot_do_is_refused_not_miscomputed(case):
    w, x = torch.randn(8, 16), torch.randn(2, 16)
    if case == "bf16 tokens":
        x = x.bfloat16()
    elif case == "fp32 tokens to bf16 weights":
        w = w.bfloat16()
    elif case == "fp16 weights to the fp32 kernel":
        w = w.half()
    else:
        w.requires_grad_(True)
    with pytest.raises(NotImplementedError):
        native_gemv.dense(x, w, None)


def test_no_compiler_leaves_the_candidates_out(monkeypatch, tmp_path):
    monkeypatch.setenv("ADAPTERD_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "no-such-compiler")
    monkeypatch.setenv("PATH", str(tmp_path))  # neither gcc nor cc
    monkeypatch.setattr(native_gemv, "_library", None)
    with pytest.raises(NotImplementedError, match="no C compiler"):
        native_gemv.dense(torch.randn(1, 8), torch.randn(8, 8), None)
    with pytest.raises(NotImplementedError, match="no C compiler"):  # the failure is remembered, not retried
        native_gemv.library()


def test_the_library_is_built_once_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("ADAPTERD_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native_gemv, "_library", None)
    native_gemv.library()
    built = list((tmp_path / "native").glob("gemv-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setattr(native_gemv, "_library", None)  # a new process: the file is loaded, not rebuilt
    native_gemv.library()
    assert built[0].stat().st_mtime_ns == stamp and len(list((tmp_path / "native").iterdir())) == 1


def test_shapes_that_do_not_fit_are_refused_before_any_memory_is_read():
    x, w = torch.randn(2, 16), torch.randn(8, 16)
    with pytest.raises(ValueError, match="do not fit"):
        native_gemv.dense(torch.randn(2, 15), w, None)
    with pytest.raises(ValueError, match="do not fit"):
        native_gemv.dense(x, w, torch.randn(7))
    q, scales = quantize_rows(w, torch.float32)
    with pytest.raises(ValueError, match="do not fit"):
        native_gemv.int8(x, q, scales[:4], None)


@pytest.mark.parametrize("packed_banks", [False, True])
def test_the_lora_kernel_refuses_bank_rows_outside_the_bank(packed_banks):
    a, bt, x, y = torch.randn(16, 8), torch.randn(16, 4), torch.randn(2, 8), torch.zeros(2, 4)
    rows, mask = torch.tensor([[0, 1], [15, 16]]), torch.ones(2, 1, 2)
    with pytest.raises(IndexError, match="outside the bank"):
        native_gemv.lora_bgmv(y, x, a, bt, rows, mask, packed_banks)
    assert not y.any()  # nothing written
    assert not y.any()  # nothing written
    with pytest.raises(ValueError, match="do not fit"):
        native_gemv.lora_bgmv(y, torch.randn(2, 7), a, bt, rows.clamp(max=15), mask)
