"""Fusing adapters into the base weights: fused outputs equal the merged oracles, and unfusing restores
the base bit for bit, however many cycles."""

import copy

import pytest
import torch
from test_s2ft_engine import merged, random_s2ft
from tiny_models import make_lora, make_tiny_model

from workers.adapters.fusion import WeightFusion
from workers.adapters.residency import BASE_PLACEMENT
from workers.engine.runner import PromptChunk


def last_logits(core, prompt):
    return core.runner.forward([], [PromptChunk(0, 0, prompt, True, BASE_PLACEMENT)])[0]


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


# the policy ----------------------------------------------------------------------------------------
def test_policy_fuses_a_dominant_adapter_after_a_full_window_with_hysteresis():
    from workers.adapters.fusion import FusionConfig, FusionPolicy

    policy = FusionPolicy(FusionConfig(window=3, fuse_share=0.75, unfuse_share=0.5))
    hot = ["a", "a", "a", None]  # a: 3/4 of the rows
    assert policy.decide(hot, None) is None and policy.decide(hot, None) is None  # window not full yet
    assert policy.decide([], None) is None  # idle steps do not count
    assert policy.decide(hot, None) == "a"
    assert len(policy.window) == 0  # a change waits a full window again
    mixed = ["a", "b", None]  # a: 1/3, under unfuse_share
    assert [policy.decide(["a", "b"], "a") for _ in range(3)] == ["a", "a", "a"]  # 1/2: kept (hysteresis)
    assert policy.decide(mixed, "a") is None  # the sliding window: a holds 3 of 7 rows now
    assert [policy.decide(["b"] * 4, None) for _ in range(3)] == [None, None, "b"]
    off = FusionPolicy(FusionConfig(enabled=False, window=1))
    assert off.decide(["a"], None) is None and off.decide(["b"], "a") == "a"  # only by hand


# fused serving in mixed batches ------------------------------------------------------------------
ROWS = ["hot", "hot", "hot", "hot", "hot", None, "other", "s2ft"]


def serve(core, prompts, rows):
    from workers.engine.types import GenerationRequest, SamplingParams

    requests = [GenerationRequest(tuple(p), SamplingParams(max_tokens=6 if a == "hot" else 14, temperature=0,
                                                           ignore_eos=True, logprobs=True), adapter=a)
                for p, a in zip(prompts, rows, strict=True)]
    return core.generate(requests)


@pytest.mark.parametrize("hot_kind", ["lora", "s2ft"])
def test_fused_and_unfused_serving_agree_for_every_row_kind(tmp_path, make_core, hot_kind):
    from workers.adapters.fusion import FusionConfig

    folder, _ = make_tiny_model(tmp_path / "base", "llama")
    paths = {"other": make_lora(folder, tmp_path / "other", r=4, seed=2, targets=("q_proj", "o_proj", "up_proj")),
             "s2ft": tmp_path / "s2"}
    random_s2ft(tmp_path / "s2", seed=5)
    if hot_kind == "lora":
        paths["hot"] = make_lora(folder, tmp_path / "hot", r=4, seed=1, targets=("q_proj", "v_proj", "down_proj"))
    else:
        random_s2ft(tmp_path / "hot", seed=6)
        paths["hot"] = tmp_path / "hot"
    prompts = [[(17 * i + 5 * j) % 250 + 3 for j in range(3 + i)] for i in range(len(ROWS))]
    eager = FusionConfig(window=2, fuse_share=0.55, unfuse_share=0.5)
    results = {}
    for mode, fusion in (("plain", FusionConfig(enabled=False)), ("fused", eager)):
        core = make_core(folder, max_batch=8, max_loras=3, max_rank=4, fusion=fusion)
        for name, path in paths.items():
            core.load_adapter(name, path)
        snapshot = {k: v.clone() for k, v in core.runner.model.state_dict().items()}
        results[mode] = serve(core, prompts, ROWS)
        stats = core.fusion.stats()
        if mode == "fused":  # fused while the hot rows ran, unfused once they finished and the mix changed
            assert stats["fusions"] == 1 and stats["unfusions"] == 1 and stats["fused_adapter"] is None
            assert stats["fused_seconds"] > 0
        else:
            assert stats["fusions"] == 0
        after = core.runner.model.state_dict()
        assert all(torch.equal(after[k], v) for k, v in snapshot.items())  # the base is back, bit for bit
        bank = core.adapters.devices["lora"].bank
        assert bank.free_rows == bank.num_rows - 4 * (hot_kind == "lora") - 4
    for row, (plain, fused) in enumerate(zip(results["plain"], results["fused"], strict=True)):
        assert [e.token_id for e in fused] == [e.token_id for e in plain], ROWS[row]
        for a, b in zip(plain, fused, strict=True):
            assert abs(a.logprob - b.logprob) <= 1e-4, ROWS[row]


def test_unloading_or_replacing_the_fused_adapter_unfuses_first(tmp_path, make_core):
    folder, _ = make_tiny_model(tmp_path / "base", "llama")
    lora = make_lora(folder, tmp_path / "lora", r=4, targets=("q_proj", "v_proj"))
    core = make_core(folder, max_loras=2, max_rank=4)
    core.load_adapter("a", lora)
    snapshot = {k: v.clone() for k, v in core.runner.model.state_dict().items()}
    free = core.adapters.devices["lora"].bank.free_rows
    for drop in (lambda: core.adapters.unload("a"), lambda: core.load_adapter("a", lora)):
        if "a" not in core.adapters.host:
            core.load_adapter("a", lora)
        assert core.fusion.fuse("a") and core.adapters.fused == "a"
        assert core.adapters.devices["lora"].bank.free_rows == free - 4  # the correction's rows
        assert not torch.equal(core.runner.model.state_dict()["model.layers.0.self_attn.q_proj.base.weight"],
                               snapshot["model.layers.0.self_attn.q_proj.base.weight"])
        drop()
        assert core.adapters.fused is None and core.adapters.devices["lora"].bank.free_rows == free
        after = core.runner.model.state_dict()
        assert all(torch.equal(after[k], v) for k, v in snapshot.items())


def test_fusion_metrics_are_exported():
    from prometheus_client import generate_latest
    from prometheus_client.registry import CollectorRegistry

    from workers.service.residency_metrics import FusionCollector

    registry = CollectorRegistry(auto_describe=False)
    registry.register(FusionCollector(lambda: {"fused_adapter": "hot", "fusions": 3, "unfusions": 2,
                                               "fused_seconds": 1.5, "fusion_seconds": 0.25}))
    text = generate_latest(registry).decode()
    assert 'adapterd_worker_fusion_events_total{event="fuse"} 3.0' in text
    assert 'adapterd_worker_fusion_events_total{event="unfuse"} 2.0' in text
    assert "adapterd_worker_fused_seconds_total 1.5" in text
    assert 'adapterd_worker_fused_adapter{adapter="hot"} 1.0' in text


def test_the_fused_adapter_is_pinned_and_unloading_it_waits_for_the_step_in_flight(tmp_path, make_core):
    import threading

    folder, _ = make_tiny_model(tmp_path / "base", "llama")
    lora = make_lora(folder, tmp_path / "lora", r=4, targets=("q_proj", "v_proj"))
    core = make_core(folder, max_loras=2, max_rank=4)
    core.load_adapter("a", lora)
    assert core.fusion.fuse("a") and core.adapters.pins["a"] == 1  # pinned while fused
    unloaded = threading.Event()
    with core.step_lock:  # a step is in flight: its forward reads the fused weights
        t = threading.Thread(target=lambda: (core.unload_adapter("a"), unloaded.set()))
        t.start()
        assert not unloaded.wait(0.3)
        assert core.adapters.fused == "a"  # not unfused under the step
    t.join(30)
    assert unloaded.is_set() and core.adapters.fused is None and "a" not in core.adapters.host
    assert core.adapters.pins["a"] == 0
