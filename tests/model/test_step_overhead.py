"""Per-step fast paths against their plain references: the KV cache's flat index-copy write against
advanced indexing, the mask-free decode attention against the masked one, RoPE by one roll against
rotate_half, and the fused fp32 RMSNorm against its plain form."""

import dataclasses

import pytest
import torch
from tiny_models import make_tiny_model

from workers.model.batch import TreeLayout, build_step_batch, contiguous_start, sees_everything
from workers.model.config import DecoderConfig
from workers.model.decoder import RMSNorm
from workers.model.kv_cache import KVCache
from workers.model.loader import ModelSpec, load_decoder
from workers.model.rope import apply_rope, apply_rope_reference, rope_tables, signed_sin


def test_index_copy_write_equals_advanced_indexing():
    cos, sin = torch.zeros(64, 4), torch.zeros(64, 4)
    tree = TreeLayout(torch.tensor([0, 1, 1]), torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool))
    batch = build_step_batch([(3, 9, 1), (0, 20, 2), (5, 2, 3)], [(1, 4, [4, 5, 6, 7, 8], True),
                                                                 (2, 30, [1, 2, 3], False, tree)],
                             cos, sin, None, torch.device("cpu"))
    fast, ref = (KVCache(3, 6, 40, 2, 4, torch.float32, torch.device("cpu")) for _ in range(2))
    torch.manual_seed(0)
    for layer in range(3):
        k, v = torch.randn(batch.num_tokens, 2, 4), torch.randn(batch.num_tokens, 2, 4)
        fast.write(layer, k, v, batch)
        ref.write_reference(layer, k, v, batch)
    assert torch.equal(fast.k, ref.k) and torch.equal(fast.v, ref.v) and fast.k.abs().sum() > 0
    other = build_step_batch([(4, 11, 1)], [], cos, sin, None, torch.device("cpu"))  # a new step: a new index
    k = torch.ones(1, 2, 4)
    fast.write(0, k, k, other)
    ref.write_reference(0, k, k, other)
    assert torch.equal(fast.k, ref.k) and fast.k[0, 4, :, 11].eq(1).all()


def test_decode_mask_only_where_some_row_sees_less():
    assert sees_everything([7, 7], 7, None) and sees_everything([7], 7, 8)
    assert not sees_everything([7, 5], 7, None) and not sees_everything([9], 9, 8)
    cos, sin = torch.zeros(64, 4), torch.zeros(64, 4)
    same = build_step_batch([(0, 6, 1), (1, 6, 2)], [], cos, sin, None, torch.device("cpu"))
    ragged = build_step_batch([(0, 6, 1), (1, 3, 2)], [], cos, sin, None, torch.device("cpu"))
    windowed = build_step_batch([(0, 12, 1)], [], cos, sin, 8, torch.device("cpu"))
    assert same.decode_mask is None
    assert ragged.decode_mask[:, 0, 0].tolist() == [[True] * 7, [True] * 4 + [False] * 3]
    assert windowed.decode_mask[0, 0, 0].tolist() == [False] * 5 + [True] * 8


def test_unmasked_decode_equals_masked_decode(tmp_path):
    folder, _ = make_tiny_model(tmp_path, "llama")
    model = load_decoder(ModelSpec(str(folder)))
    cfg = model.config
    cos, sin = rope_tables(cfg, 64)
    logits = []
    for masked in (False, True):
        kv = KVCache(cfg.num_layers, 2, 64, cfg.num_kv_heads, cfg.head_dim, torch.float32, torch.device("cpu"))
        prompt = build_step_batch([], [(0, 0, list(range(3, 13)), False), (1, 0, list(range(20, 30)), False)],
                                  cos, sin, None, torch.device("cpu"))
        model(prompt, kv)
        step = build_step_batch([(0, 10, 5), (1, 10, 6)], [], cos, sin, None, torch.device("cpu"))
        assert step.decode_mask is None
        if masked:
            step = dataclasses.replace(step, decode_mask=torch.ones(2, 1, 1, 11, dtype=torch.bool))
        logits.append(model(step, kv))
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-5)


def test_consecutive_decode_slots_attend_over_a_view_others_gather():
    assert contiguous_start([3, 4, 5]) == 3 and contiguous_start([0]) == 0
    assert contiguous_start([3, 5]) is None and contiguous_start([4, 3]) is None and contiguous_start([]) is None
    cos, sin = torch.zeros(64, 4), torch.zeros(64, 4)
    kv = KVCache(2, 6, 16, 2, 4, torch.float32, torch.device("cpu"))
    torch.manual_seed(0)
    kv.k.normal_(), kv.v.normal_()
    for slots in ([2, 3, 4], [4, 1, 2]):
        batch = build_step_batch([(s, 5, 1) for s in slots], [], cos, sin, None, torch.device("cpu"))
        keys, values = kv.decode_view(1, batch)  # [Bd, kv_heads, S, D]
        assert torch.equal(keys, kv.k[1, slots, :, :6]) and torch.equal(values, kv.v[1, slots, :, :6])
        assert (keys.data_ptr() == kv.k[1, 2].data_ptr()) == (slots == [2, 3, 4])  # a view of the cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_by_roll_equals_rotate_half(dtype):
    cfg = DecoderConfig.from_hf_dict({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                                      "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
                                      "vocab_size": 32, "max_position_embeddings": 64})
    cos, sin = rope_tables(cfg, 64)
    positions = torch.tensor([0, 5, 17, 63])
    x = torch.randn(4, 3, cfg.head_dim, generator=torch.Generator().manual_seed(0)).to(dtype)
    c, s = cos[positions].unsqueeze(1).to(dtype), sin[positions].unsqueeze(1).to(dtype)
    fast = apply_rope(x, c, signed_sin(s))
    tol = {torch.float32: 1e-6, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(fast, apply_rope_reference(x, c, s), rtol=tol, atol=tol)
    assert not torch.equal(fast, x)  # positions other than 0 rotate
    batch = build_step_batch([(0, 5, 1)], [(1, 16, [2, 3], True)], cos, sin, None, torch.device("cpu"))
    assert torch.equal(batch.sin[:, 0], signed_sin(sin[[5, 16, 17]]))  # the step carries the signed sin


def test_fused_rms_norm_equals_reference_in_fp32_and_half_precision_keeps_the_reference():
    norm = RMSNorm(96, 1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(5, 96, generator=torch.Generator().manual_seed(1)) * 3
    torch.testing.assert_close(norm(x), norm.reference(x), rtol=1e-6, atol=1e-6)
    half = norm.to(torch.bfloat16)
    assert torch.equal(half(x.bfloat16()), half.reference(x.bfloat16()))
