"""Decode attention chosen by measurement: every candidate equals SDPA (grouped-query heads, with and without a
mask, fp32 and bf16), the chooser keeps what the timer says is fastest, and the decoder runs the chosen one."""

import pytest
import torch
from tiny_models import make_tiny_model

from workers.model.attention_kernels import CANDIDATES, AttentionKernels, kv_bucket, sdpa
from workers.model.kernel_choice import KernelTable
from workers.model.loader import ModelSpec, load_decoder

CPU = torch.device("cpu")


def inputs(bd: int, heads: int, kv_heads: int, length: int, masked: bool, dtype=torch.float32):
    gen = torch.Generator().manual_seed(bd * 31 + length)
    q = torch.randn(bd, heads, 1, 16, generator=gen).to(dtype)
    keys, values = (torch.randn(bd, kv_heads, length, 16, generator=gen).to(dtype) for _ in range(2))
    mask = None
    if masked:  # rows of unequal lengths; each sees at least its first position
        lengths = torch.randint(1, length + 1, (bd, 1), generator=gen)
        mask = (torch.arange(length) < lengths)[:, None, None, :]
    return q, keys, values, mask


@pytest.mark.parametrize("name", list(CANDIDATES))
@pytest.mark.parametrize(("bd", "heads", "kv_heads", "length"), [(1, 4, 4, 1), (3, 6, 2, 37), (16, 9, 3, 130)])
@pytest.mark.parametrize("masked", [False, True])
def test_every_candidate_equals_sdpa(name, bd, heads, kv_heads, length, masked):
    q, keys, values, mask = inputs(bd, heads, kv_heads, length, masked)
    out = CANDIDATES[name](q, keys, values, mask)
    assert out.shape == (bd, heads, 1, 16)
    torch.testing.assert_close(out, sdpa(q, keys, values, mask), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(CANDIDATES))
def test_every_candidate_in_bf16_stays_within_bf16_rounding(name):
    q, keys, values, mask = inputs(4, 6, 2, 50, True, torch.bfloat16)
    ref = sdpa(q.float(), keys.float(), values.float(), mask)
    out = CANDIDATES[name](q, keys, values, mask)
    assert out.dtype == torch.bfloat16
    assert ((out.float() - ref).abs().max() / ref.abs().max()).item() <= 2e-2


@pytest.mark.parametrize("name", ["native", "native_threads"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_native_attention_reads_cache_views_in_place(name, dtype):
    gen = torch.Generator().manual_seed(5)
    cache = torch.randn(2, 6, 3, 40, 20, generator=gen).to(dtype)  # [L, slots, KVH, max_seq, D], as KVCache keeps it
    keys, values = cache[0, 1:5, :, :29], cache[1, 1:5, :, :29]  # four consecutive slots, 29 positions: views
    q = torch.randn(4, 6, 1, 20, generator=gen).to(dtype)  # D = 20: a tail past the 8-wide loads
    mask = (torch.arange(29) < torch.tensor([[29], [3], [17], [1]]))[:, None, None, :]
    want = sdpa(q.float(), keys.float(), values.float(), mask)
    if dtype == torch.float32:
        torch.testing.assert_close(CANDIDATES[name](q, keys, values, mask), want, rtol=1e-5, atol=1e-6)
    else:  # fp32 sums of the same bf16 values, rounded once: within bf16's half ulp (2⁻⁹) and the sums' order
        torch.testing.assert_close(CANDIDATES[name](q, keys, values, mask).float(), want, rtol=2 ** -8, atol=1e-6)
    with pytest.raises(NotImplementedError):  # positions not contiguous: refused, not misread
        CANDIDATES[name](q, keys.transpose(2, 3).contiguous().transpose(2, 3), values, mask)


@pytest.mark.parametrize("fastest", list(CANDIDATES))
def test_the_chooser_keeps_what_the_timer_measures_fastest(fastest):
    def timer(name, call):
        call()
        return 0.001 if name == fastest else 0.005

    table = KernelTable(None)
    kernels = AttentionKernels(table, timer=timer)
    q, keys, _, mask = inputs(3, 6, 2, 200, True)
    assert kernels.get(q, keys, mask) is CANDIDATES[fastest]
    assert table.entries["attention 6x2x16 rows 2-4 kv 129-512 masked float32 cpu"]["choice"] == fastest
    assert [kv_bucket(n) for n in (1, 128, 129, 512, 513, 5000)] == [0, 0, 1, 1, 2, 3]


@pytest.mark.parametrize("name", list(CANDIDATES))
def test_the_decoder_runs_the_chosen_attention_and_gets_the_reference_logits(tmp_path, name):
    from test_decoder import run_logits

    folder, _ = make_tiny_model(tmp_path, "llama")
    forced = load_decoder(ModelSpec(str(folder)))
    reference = load_decoder(ModelSpec(str(folder)))
    chosen = AttentionKernels(KernelTable(None), override=name)
    for module in forced.modules():
        if hasattr(module, "self_attn"):
            module.self_attn.kernels = chosen
    for module in reference.modules():
        if hasattr(module, "self_attn"):
            module.self_attn.kernels = None  # SDPA
    ids = torch.randint(0, 256, (9,)).tolist()
    for ours, ref in zip(run_logits(forced, ids[:6], ids[6:]), run_logits(reference, ids[:6], ids[6:]), strict=True):
        assert ((ours - ref).abs().max() / ref.abs().max()).item() <= 1e-5
