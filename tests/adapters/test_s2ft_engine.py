"""S²FT adapters served by the engine, in mixed batches with LoRA and base rows, against transformers
models whose weights have the deltas added (the paper's definition)."""

import copy

import torch
from tiny_models import make_lora, make_tiny_model

from workers.adapters.s2ft import write_s2ft
from workers.engine.types import GenerationRequest, SamplingParams

HEAD_DIM = 16  # tiny model: hidden 64, 4 heads, 2 kv heads, intermediate 128


def random_s2ft(folder, seed):
    g = torch.Generator().manual_seed(seed)
    updates = {}
    for layer in range(2):
        heads, channels, kv_heads = [3, 0], [5, 77, 12], [1]
        updates[(layer, "o_proj")] = (heads, torch.randn(64, len(heads) * HEAD_DIM, generator=g) * 0.2)
        updates[(layer, "down_proj")] = (channels, torch.randn(64, len(channels), generator=g) * 0.2)
        updates[(layer, "v_proj")] = (kv_heads, torch.randn(len(kv_heads) * HEAD_DIM, 64, generator=g) * 0.2)
        updates[(layer, "up_proj")] = (channels, torch.randn(len(channels), 64, generator=g) * 0.2)
    write_s2ft(folder, updates)
    return updates


def merged(hf, updates):
    """A copy of the transformers model with W[:, cols] += C (o, down) and W[rows, :] += C (v, up)."""
    model = copy.deepcopy(hf)
    with torch.no_grad():
        for (layer, module), (units, delta) in updates.items():
            block = model.model.layers[layer]
            linear = getattr(block.self_attn if module in ("o_proj", "v_proj") else block.mlp, module)
            width = HEAD_DIM if module in ("o_proj", "v_proj") else 1
            idx = torch.cat([torch.arange(u * width, (u + 1) * width) for u in units])
            if module in ("o_proj", "down_proj"):
                linear.weight[:, idx] += delta
            else:
                linear.weight[idx, :] += delta
    return model


def greedy(model, prompt, n):
    ids = torch.tensor([prompt])
    model.generation_config.eos_token_id = None
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_s2ft_rows_beside_lora_and_base_rows_equal_merged_transformers(tmp_path, make_core):
    folder, hf = make_tiny_model(tmp_path / "base", "llama")
    s2ft = {name: random_s2ft(tmp_path / name, seed) for seed, name in enumerate(("s1", "s2"))}
    lora = make_lora(folder, tmp_path / "lora", r=4, targets=("q_proj", "down_proj"))
    core = make_core(folder, max_batch=6, max_loras=2, max_rank=4)
    for name in s2ft:
        core.load_adapter(name, tmp_path / name)
    core.load_adapter("lora", lora)
    rows = ["s1", None, "lora", "s2", "s1"]
    prompts = [[(13 * i + j) % 250 + 3 for j in range(4 + i)] for i in range(len(rows))]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    outs = core.generate([GenerationRequest(tuple(p), params, adapter=a) for p, a in zip(prompts, rows)])
    from peft import PeftModel

    oracles = {name: merged(hf, updates) for name, updates in s2ft.items()}
    oracles[None] = hf
    oracles["lora"] = PeftModel.from_pretrained(copy.deepcopy(hf), lora).merge_and_unload()
    for prompt, adapter, events in zip(prompts, rows, outs):
        assert [e.token_id for e in events] == greedy(oracles[adapter], prompt, 8), adapter
    assert greedy(oracles["s1"], prompts[0], 8) != greedy(hf, prompts[0], 8)  # the adapter matters
    stats = core.adapters.stats()
    assert stats["device_adapters"] == 3 and stats["device_s2ft_bytes"] > 0 and not core.adapters.pins
