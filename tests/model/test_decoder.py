"""The runner's logits against transformers on the same weights (the oracle)."""

import dataclasses
import json

import pytest
import torch
from tiny_models import make_tiny_model

from workers.errors import UnsupportedModelError
from workers.model.batch import build_step_batch
from workers.model.config import DecoderConfig
from workers.model.kv_cache import KVCache
from workers.model.loader import ModelSpec, load_decoder
from workers.model.rope import rope_tables


def run_logits(model, prompt: list[int], steps: list[int]) -> list[torch.Tensor]:
    """Prefill `prompt` (all positions' logits), then decode `steps` one token at a time."""
    cfg = model.config
    kv = KVCache(cfg.num_layers, 2, 128, cfg.num_kv_heads, cfg.head_dim, model.dtype, torch.device("cpu"))
    cos, sin = (t.to(model.dtype) for t in rope_tables(cfg, 128))
    batch = build_step_batch([], [(1, 0, prompt, True)], cos, sin, cfg.sliding_window, torch.device("cpu"))
    batch = dataclasses.replace(batch, logits_rows=torch.arange(len(prompt)))
    out = [model(batch, kv)]
    for i, tok in enumerate(steps):
        b = build_step_batch([(1, len(prompt) + i, tok)], [], cos, sin, cfg.sliding_window, torch.device("cpu"))
        out.append(model(b, kv))
    return out


def assert_close_to_scale(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert (ours - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_logits_match_transformers_prefill_and_decode(tmp_path, arch):
    folder, hf = make_tiny_model(tmp_path, arch)
    model = load_decoder(ModelSpec(str(folder)))
    torch.manual_seed(1)
    ids = torch.randint(0, 256, (24,))  # longer than mistral's sliding window of 8
    prompt, steps = ids[:16].tolist(), ids[16:].tolist()
    ours = run_logits(model, prompt, steps)
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    assert_close_to_scale(ours[0], ref[:16])
    for i in range(len(steps)):
        assert_close_to_scale(ours[i + 1][0], ref[16 + i])


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
])
def test_rope_scaling_variants_match_transformers(tmp_path, rope):
    folder, hf = make_tiny_model(tmp_path, "llama", rope_parameters={"rope_theta": 10000.0, **rope})
    model = load_decoder(ModelSpec(str(folder)))
    ids = torch.randint(0, 256, (40,))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    assert_close_to_scale(run_logits(model, ids.tolist(), [])[0], ref)


def test_sharded_checkpoint_and_bf16(tmp_path):
    folder, hf = make_tiny_model(tmp_path / "m", "llama")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    model = load_decoder(ModelSpec(str(tmp_path / "sharded")))
    ids = torch.randint(0, 256, (10,))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    assert_close_to_scale(run_logits(model, ids.tolist(), [])[0], ref)
    bf16 = load_decoder(ModelSpec(str(folder), dtype="bfloat16"))
    assert bf16.lm_head.weight.dtype == torch.bfloat16


def test_unsupported_architecture_and_options_are_named(tmp_path):
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        DecoderConfig.from_hf_dict({"model_type": "gpt2"})
    folder, _ = make_tiny_model(tmp_path, "llama")
    cfg = json.loads((folder / "config.json").read_text())
    with pytest.raises(UnsupportedModelError, match="longrope"):
        DecoderConfig.from_hf_dict({**cfg, "rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}})
    with pytest.raises(UnsupportedModelError, match="hidden_act"):
        DecoderConfig.from_hf_dict({**cfg, "hidden_act": "gelu"})
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(UnsupportedModelError, match="pickle"):
        load_decoder(ModelSpec(str(folder)))


def test_smollm2_logits_match_transformers(smollm2_path):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    model = load_decoder(ModelSpec(str(smollm2_path)))
    ids = torch.tensor([1, 504, 3458, 282, 4649, 314, 2, 198, 30, 1000, 42, 77])
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    ours = run_logits(model, ids[:8].tolist(), ids[8:].tolist())
    assert_close_to_scale(ours[0], ref[:8])
    for i in range(4):
        assert_close_to_scale(ours[i + 1][0], ref[8 + i])


@pytest.mark.parametrize("rows", [1, 2, 16, 100])
@pytest.mark.parametrize("bias", [False, True])
def test_fast_linear_equals_reference(rows, bias):
    from workers.model.decoder import Linear

    torch.manual_seed(rows)
    layer = Linear(48, 80, bias=bias)
    x = torch.randn(rows, 48)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias),
                               rtol=1e-5, atol=1e-5)
