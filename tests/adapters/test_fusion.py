"""Fusing adapters into the base weights: fused outputs equal the merged oracles, and unfusing restores
the base bit for bit, however many cycles."""

import copy

import pytest
import torch
from test_s2ft_engine import merged, random_s2ft
from tiny_models import make_lora, make_tiny_model

from workers.adapters.fusion import WeightFusion
from workers.adapters.manager import BASE_PLACEMENT


def last_logits(core, prompt):
    return core.runner.forward([], [(0, 0, prompt, True, BASE_PLACEMENT)])[0]


def hf_last_logits(model, prompt):
    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0, -1]


def close(ours, ref):
    return (ours - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max())


def test_fused_lora_and_s2ft_equal_merged_models_and_unfuse_is_bit_exact(tmp_path, make_core):
    from peft import PeftModel

    folder, hf = make_tiny_model(tmp_path / "base", "llama")
    lora_dir = make_lora(folder, tmp_path / "lora", r=4, targets=("q_proj", "v_proj", "down_proj"))
    s2ft_updates = random_s2ft(tmp_path / "s2ft", seed=3)
    core = make_core(folder, max_rank=4)
    lora = core.read_adapter(lora_dir)[1]
    s2ft = core.read_adapter(tmp_path / "s2ft")[1]
    snapshot = {k: v.clone() for k, v in core.runner.model.state_dict().items()}
    fusion = WeightFusion(core.runner.model)
    prompt = [5, 17, 99, 3, 42]

    fusion.fuse("lora", lora)
    lora_oracle = PeftModel.from_pretrained(copy.deepcopy(hf), lora_dir).merge_and_unload()
    assert close(last_logits(core, prompt), hf_last_logits(lora_oracle, prompt))
    with pytest.raises(RuntimeError):
        fusion.fuse("s2ft", s2ft)
    assert fusion.unfuse() == "lora"

    fusion.fuse("s2ft", s2ft)
    assert close(last_logits(core, prompt), hf_last_logits(merged(hf, s2ft_updates), prompt))
    fusion.unfuse()
    assert close(last_logits(core, prompt), hf_last_logits(hf, prompt))

    for cycle in range(100):
        fusion.fuse("x", lora if cycle % 2 else s2ft)
        fusion.unfuse()
    after = core.runner.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in snapshot.items())
    assert fusion.unfuse() is None and fusion.fused is None
