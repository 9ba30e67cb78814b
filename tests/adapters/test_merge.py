"""Per-request merges (adapters_store.merge): LoRA merges equal peft's `add_weighted_adapter` (linear and
TIES), S²FT merges equal a per-entry hand computation in weight space, and bad merge requests are refused."""

import copy

import numpy as np
import pytest
import torch
from test_s2ft_engine import HEAD_DIM, random_s2ft
from tiny_models import make_lora, make_tiny_model

from adapters_store.errors import InvalidAdapterError
from adapters_store.merge import MergeSpec, merge_files
from adapters_store.safetensors_file import read_tensors
from workers.model.config import DecoderConfig

PARENT = {"q_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn", "down_proj": "mlp",
          "up_proj": "mlp"}


def folder_files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    folder, hf = make_tiny_model(root / "base", "llama")
    a = make_lora(folder, root / "a", r=4, seed=1, targets=("q_proj", "v_proj"))
    b = make_lora(folder, root / "b", r=4, seed=2, targets=("q_proj", "down_proj"))
    return folder, hf, a, b, DecoderConfig.from_hf_dict(__import__("json").loads((folder / "config.json").read_text()))


@pytest.mark.parametrize("strategy,density", [("linear", 1.0), ("ties", 0.5), ("ties", 1.0)])
def test_lora_merges_equal_peft_add_weighted_adapter(tiny, strategy, density):
    from peft import PeftModel

    _, hf, a, b, base = tiny
    weights = [0.7, -0.4]
    spec = MergeSpec(("a", "b"), tuple(weights), strategy, density)
    merged = merge_files([(folder_files(a), weights[0]), (folder_files(b), weights[1])], spec, base)
    assert set(merged) == {"lora"}
    ours = read_tensors(merged["lora"]["adapter_model.safetensors"])

    model = PeftModel.from_pretrained(copy.deepcopy(hf), a, adapter_name="a")
    model.load_adapter(b, adapter_name="b")
    model.add_weighted_adapter(["a", "b"], weights, "m", combination_type=strategy, density=density)
    checked = 0
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "m" in module.lora_A:
            key = name.replace("base_model.model.", "base_model.model.", 1)
            for which, peft_w in (("lora_A", module.lora_A["m"].weight), ("lora_B", module.lora_B["m"].weight)):
                mine = ours[f"{key}.{which}.weight"]
                np.testing.assert_allclose(mine, peft_w.detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=key)
                checked += 1
            assert module.scaling["m"] == 1.0
    assert checked == 2 * 2 * 3  # 2 layers × (q, v, down) × (A, B)


def s2ft_delta_w(updates, base, module_key):
    """The dense weight update [out, in] of one (layer, module) of an S²FT adapter written by random_s2ft."""
    layer, module = module_key
    out, fan_in = {"o_proj": (64, 64), "down_proj": (64, 128), "v_proj": (32, 64), "up_proj": (128, 64)}[module]
    w = torch.zeros(out, fan_in)
    if module_key not in updates:
        return w
    units, delta = updates[module_key]
    width = HEAD_DIM if module in ("o_proj", "v_proj") else 1
    lines = torch.cat([torch.arange(u * width, (u + 1) * width) for u in units])
    if module in ("o_proj", "down_proj"):
        w[:, lines] = delta
    else:
        w[lines, :] = delta
    return w


def ties_reference(tensors, weights, density):
    """TIES entry by entry: trim each task to its top density·numel magnitudes, elect the sign of the sum,
    average the weighted entries that agree with it."""
    trimmed = []
    for t in tensors:
        flat = t.flatten().clone()
        k = int(density * flat.numel())
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[flat.abs().argsort(descending=True)[:k]] = True
        trimmed.append(torch.where(keep, flat, torch.zeros_like(flat)).reshape(t.shape))
    stacked = torch.stack(trimmed)
    elected = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    agree = stacked.sign() == elected
    w = torch.tensor(weights).reshape(-1, *[1] * tensors[0].dim())
    return (stacked * w * agree).sum(0) / agree.sum(0).clamp(min=1)


@pytest.mark.parametrize("strategy", ["linear", "ties"])
def test_s2ft_merges_equal_a_hand_computed_merge_in_weight_space(tiny, tmp_path, strategy):
    *_, base = tiny
    u1 = random_s2ft(tmp_path / "s1", seed=1)
    u2 = random_s2ft(tmp_path / "s2", seed=2)
    u2 = {k: v for k, v in u2.items() if k[1] != "up_proj"}  # s2 lacks up_proj: only s1 merges there
    for key in list(u2):  # s2 selects other heads/channels, overlapping s1's partly
        units, delta = u2[key]
        u2[key] = ([1, 3], torch.randn(64, 2 * HEAD_DIM)) if key[1] == "o_proj" else (units, delta)
    from workers.adapters.s2ft import write_s2ft

    write_s2ft(tmp_path / "s2", u2)
    weights = [0.6, 0.9]
    spec = MergeSpec(("s1", "s2"), tuple(weights), strategy, 0.5 if strategy == "ties" else 1.0)
    merged = merge_files([(folder_files(tmp_path / "s1"), 0.6), (folder_files(tmp_path / "s2"), 0.9)], spec, base)
    assert set(merged) == {"s2ft"}
    (tmp_path / "m").mkdir()
    for name, data in merged["s2ft"].items():
        (tmp_path / "m" / name).write_bytes(data)
    from workers.adapters.s2ft import read_s2ft

    _, ours = read_s2ft(tmp_path / "m", base)
    for key in sorted(set(u1) | set(u2)):
        present = [(w, u) for w, u in zip(weights, (u1, u2), strict=True) if key in u]
        dense = [s2ft_delta_w(u, base, key) for _, u in present]
        support = torch.zeros_like(dense[0], dtype=torch.bool)
        for d in dense:  # the union of the members' selected lines: where the merged update lives
            support |= d != 0
        if strategy == "linear":
            expected = sum(w * d for (w, _), d in zip(present, dense, strict=True))
        else:  # TIES over each member's update placed on the union of lines (its own entries there)
            update = ours.modules[key]
            cols = update.kind == "col"
            aligned = [d[:, update.index] if cols else d[update.index, :] for d in dense]
            merged_sub = ties_reference(aligned, [w for w, _ in present], 0.5)
            expected = torch.zeros_like(dense[0])
            if cols:
                expected[:, update.index] = merged_sub
            else:
                expected[update.index, :] = merged_sub
        got = s2ft_delta_w({key: (ours.modules[key].index[:: HEAD_DIM if key[1] in ("o_proj", "v_proj") else 1]
                                  // (HEAD_DIM if key[1] in ("o_proj", "v_proj") else 1),
                                  ours.modules[key].delta)}, base, key)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_a_lora_and_an_s2ft_member_give_a_lora_part_and_an_s2ft_part(tiny, tmp_path):
    _, _, a, _, base = tiny
    random_s2ft(tmp_path / "s", seed=3)
    spec = MergeSpec(("a", "s"), (0.5, 2.0))
    merged = merge_files([(folder_files(a), 0.5), (folder_files(tmp_path / "s"), 2.0)], spec, base)
    assert set(merged) == {"lora", "s2ft"}
    delta = read_tensors(merged["s2ft"]["adapter_model.safetensors"])["model.layers.0.mlp.down_proj.delta"]
    original = read_tensors((tmp_path / "s" / "adapter_model.safetensors").read_bytes())
    np.testing.assert_allclose(delta, 2.0 * original["model.layers.0.mlp.down_proj.delta"][:, np.argsort([5, 77, 12])],
                               rtol=1e-6)


BAD_SPECS = {
    "no ids": ({"ids": []}, "non-empty"),
    "weights length": ({"ids": ["a", "b"], "weights": [1.0]}, "one per id"),
    "strategy": ({"ids": ["a"], "strategy": "slerp"}, "strategy"),
    "density": ({"ids": ["a"], "strategy": "ties", "density": 0}, "density"),
    "duplicate ids": ({"ids": ["a", "a"]}, "unique"),
    "unknown key": ({"ids": ["a"], "mode": "x"}, "keys"),
    "nan weight": ({"ids": ["a"], "weights": [float("nan")]}, "finite"),
}


@pytest.mark.parametrize("case", list(BAD_SPECS))
def test_bad_merge_requests_are_refused(case):
    raw, message = BAD_SPECS[case]
    with pytest.raises(InvalidAdapterError, match=message) as e:
        MergeSpec.from_dict(raw)
    assert e.value.param == "merged_adapters"


def test_merge_keys_name_the_members_and_parameters():
    spec = MergeSpec.from_dict({"ids": ["a", "b"], "weights": [1, 2]})
    assert spec.key(["x", "y"]) == MergeSpec.from_dict({"ids": ["a", "b"], "weights": [1.0, 2.0]}).key(["x", "y"])
    assert spec.key(["x", "y"]) != spec.key(["x", "z"])
    assert spec.key(["x", "y"]) != MergeSpec.from_dict({"ids": ["a", "b"], "strategy": "ties"}).key(["x", "y"])


@pytest.mark.parametrize("strategy,sign",
                         [("dare_linear", "total"), ("dare_ties", "total"), ("dare_ties", "frequency")])
def test_dare_equals_peft_given_the_same_random_masks(monkeypatch, strategy, sign):
    """DARE's only freedom is its random masks: with ours fed to peft's random pruning, peft's dare_linear /
    dare_ties give the same tensor."""
    import peft.utils.merge_utils as mu

    from adapters_store.merge import combine, dare_masks

    rng = np.random.default_rng(0)
    tensors = [rng.standard_normal((8, 16)).astype(np.float32) for _ in range(3)]
    weights = [0.7, -0.4, 1.2]
    spec = MergeSpec(("a", "b", "c"), tuple(weights), strategy, 0.4, sign)
    ours = combine(tensors, weights, spec)
    masks = iter(dare_masks(tensors, 0.4))
    monkeypatch.setattr(mu, "random_pruning", lambda t, density, rescale: t * torch.from_numpy(next(masks)) / density)
    task = [torch.from_numpy(t).double() for t in tensors]
    if strategy == "dare_linear":
        ref = mu.dare_linear(task, torch.tensor(weights, dtype=torch.float64), 0.4)
    else:
        ref = mu.dare_ties(task, torch.tensor(weights, dtype=torch.float64), 0.4, sign)
    np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-5, atol=1e-6)
    assert 0.2 < float((np.stack(dare_masks(tensors, 0.4)) > 0).mean()) < 0.6  # density ≈ 0.4


@pytest.mark.parametrize("strategy", ["dare_linear", "dare_ties"])
def test_dare_lora_merges_are_deterministic(tiny, strategy):
    _, _, a, b, base = tiny
    spec = MergeSpec.from_dict({"ids": ["a", "b"], "weights": [0.6, 0.4], "merge_strategy": strategy, "density": 0.5,
                                "majority_sign_method": None})
    members = [(folder_files(a), 0.6), (folder_files(b), 0.4)]
    first, again = merge_files(members, spec, base), merge_files(members, spec, base)
    assert first["lora"]["adapter_model.safetensors"] == again["lora"]["adapter_model.safetensors"]
    linear = merge_files(members, MergeSpec(("a", "b"), (0.6, 0.4)), base)
    assert first["lora"]["adapter_model.safetensors"] != linear["lora"]["adapter_model.safetensors"]
