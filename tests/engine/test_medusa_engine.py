"""Medusa tree speculative decoding in the engine: tree buffers against plain references, greedy outputs
token-identical to plain decoding (random heads; heads whose candidates are often right; batch 1 and
batches mixed with LoRA rows and rows without heads), KV compaction, sampling, details and metrics."""

import pytest
import torch
from tiny_models import make_lora, make_tiny_model

from workers.adapters.medusa import init_medusa, write_medusa
from workers.engine.config import DEFAULT_MEDUSA_TREE
from workers.engine.speculative import (
    accept_flags,
    best_path,
    build_tree,
    reference_best_path,
    reference_tree_mask,
    reference_tree_tokens,
    tree_tokens,
    typical_threshold,
)
from workers.engine.types import GenerationRequest, SamplingParams
from workers.errors import AdapterNotFoundError, AdapterValidationError
from workers.model.batch import TreeLayout, build_step_batch, tree_mask
from workers.model.kv_cache import KVCache

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


def prompts(n: int, seed: int = 0) -> list[tuple[int, ...]]:
    g = torch.Generator().manual_seed(seed)
    return [tuple(torch.randint(3, 256, (int(torch.randint(3, 16, (1,), generator=g)),), generator=g).tolist())
            for _ in range(n)]


def tokens(events) -> list[int]:
    return [e.token_id for e in events]


def heads_folder(tmp_path, core, name="heads", num_heads=3, version=2, seed=0):
    w = init_medusa(core.runner.config, num_heads, 1, version, std=0.3, generator=torch.Generator().manual_seed(seed))
    return write_medusa(tmp_path / name, w)


def plant_oracle(core, reference: dict[tuple[int, ...], list[int]], paths=((0,), (0, 0), (0, 0, 0))):
    """Makes candidates often right: for a sequence whose plain greedy output is known, the nodes on
    `paths` get the true next tokens (on alternate steps only the first ones, so accepted lengths vary)."""
    tree = core.speculator.tree
    node = {p: i + 1 for i, p in enumerate(tree.paths)}
    propose = core.speculator.propose
    calls = {"n": 0}

    def planted(seqs):
        drafts = propose(seqs)
        calls["n"] += 1
        for d in drafts:
            ref = reference.get(d.seq.prompt)
            if ref is None:
                continue
            n = len(d.seq.output)  # d.tokens[0] == ref[n - 1]
            upto = len(paths) if calls["n"] % 2 else 1 + calls["n"] % len(paths) // 2
            for depth, path in enumerate(paths[:upto]):
                if n + depth < len(ref):
                    d.tokens[node[path]] = ref[n + depth]
        return drafts

    core.speculator.propose = planted


# tree buffers against plain references ---------------------------------------------------------------
def test_tree_buffers_match_references():
    tree = build_tree(DEFAULT_MEDUSA_TREE)
    assert tree.size == len(DEFAULT_MEDUSA_TREE) + 1 and tree.depth == 3 and tree.topk == 3
    big = build_tree([(0,), (1,), (2,), (3,), (0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0), (0, 0, 0),
                      (0, 0, 1), (0, 1, 0), (1, 0, 0)])
    assert torch.equal(big.layout.ancestors, reference_tree_mask(big))
    assert torch.equal(tree.layout.ancestors, reference_tree_mask(tree))
    assert tree.layout.depths.tolist() == [0] + [len(p) for p in tree.paths]
    g = torch.Generator().manual_seed(0)
    topk = torch.randint(0, 1000, (3, 3, tree.topk), generator=g)
    roots = torch.tensor([1, 2, 3])
    assert tree_tokens(tree, roots, topk).tolist() == reference_tree_tokens(tree, roots.tolist(), topk.tolist())
    for _ in range(50):
        accepted = (torch.rand(tree.size, generator=g) < 0.5).tolist()
        accepted[0] = True
        assert best_path(tree, torch.tensor(accepted)) == reference_best_path(tree, accepted)


def test_bad_trees_are_refused():
    for bad in ([], [()], [(0,), (0,)], [(0, 1)], [(-1,)], [(0,), (0, 99)]):
        with pytest.raises(ValueError):
            build_tree(bad)


def test_tree_mask_and_positions_in_the_step_batch(device):
    tree = build_tree([(0,), (1,), (0, 0)])
    cos = torch.arange(64.0, device=device).unsqueeze(1).expand(64, 8)
    batch = build_step_batch([(0, 9, 5)], [(1, 6, [1, 2, 3, 4], True, tree.layout)], cos, cos, None, device)
    assert batch.positions.tolist() == [9, 6, 7, 8, 9]  # KV positions: consecutive
    assert batch.cos[:, 0, 0].tolist() == [9, 6, 7, 7, 8]  # RoPE positions: start + depth
    assert batch.logits_rows.tolist() == [0, 1, 2, 3, 4]  # every tree node
    mask = batch.prefill[0].mask.cpu()  # [4, 6 + 4]
    assert mask[:, :6].all()
    assert mask[:, 6:].tolist() == reference_tree_mask(tree).tolist()
    windowed = tree_mask(6, TreeLayout(tree.layout.depths, tree.layout.ancestors), window=3)
    assert windowed[3].tolist() == [False] * 6 + [True, True, False, True]  # node (0,0): RoPE position 8


def test_kv_compact_moves_the_accepted_path(device):
    kv = KVCache(2, 2, 16, 1, 2, torch.float32, device)
    kv.k.copy_(torch.arange(kv.k.numel(), dtype=torch.float32, device=device).view_as(kv.k))
    before = kv.k.clone()
    kv.compact(1, [5, 7, 9], 4)
    assert torch.equal(kv.k[:, 1, :, 4:7], before[:, 1, :, [5, 7, 9]])
    assert torch.equal(kv.k[:, 0], before[:, 0]) and torch.equal(kv.k[:, 1, :, :4], before[:, 1, :, :4])


def test_typical_acceptance_matches_its_definition():
    tree = build_tree(DEFAULT_MEDUSA_TREE)
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(tree.size, 50, generator=g) * 3
    toks = torch.randint(0, 50, (tree.size,), generator=g)
    flags = accept_flags(tree, toks, logits, 0.7, 0.09, 0.3)
    for i in range(1, tree.size):
        p = torch.softmax(logits[tree.parents[i]] / 0.7, -1)
        entropy = -(p * p.log()).sum()
        assert bool(flags[i]) == bool(p[toks[i]] > min(0.09, 0.3 * float(torch.exp(-entropy))))
    p = torch.softmax(logits, -1)
    assert typical_threshold(p, 0.09, 0.3).shape == (tree.size,)
    greedy = accept_flags(tree, toks, logits, 0.0, 0.09, 0.3)
    assert greedy[1:].tolist() == [bool(logits[tree.parents[i]].argmax() == toks[i]) for i in range(1, tree.size)]


# generation ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,version", [("llama", 2), ("mistral", 1), ("qwen2", 2)])
def test_greedy_with_random_heads_equals_plain(tmp_path, make_core, arch, version):
    folder, _ = make_tiny_model(tmp_path / "m", arch)
    core = make_core(folder, medusa_policy="always")
    ps = prompts(3)
    plain = [tokens(e) for e in core.generate([GenerationRequest(p, GREEDY) for p in ps])]
    core.load_medusa(heads_folder(tmp_path, core, version=version))
    alone = tokens(core.generate([GenerationRequest(ps[0], GREEDY)])[0])
    batched = core.generate([GenerationRequest(p, GREEDY) for p in ps])
    assert alone == plain[0]
    assert [tokens(e) for e in batched] == plain
    assert core.speculator.stats[None].steps > 0
    assert core.runner.kv.free_slots == 4


def test_greedy_with_often_right_candidates_equals_plain_and_compacts(tmp_path, make_core):
    folder, _ = make_tiny_model(tmp_path / "m", "mistral")  # sliding window 8: trees cross the window
    core = make_core(folder, medusa_policy="always")
    ps = prompts(3, seed=4)
    long = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    plain = [tokens(e) for e in core.generate([GenerationRequest(p, long) for p in ps])]
    core.load_medusa(heads_folder(tmp_path, core))
    plant_oracle(core, dict(zip(ps, plain, strict=True)))
    alone = core.generate([GenerationRequest(ps[0], long)])[0]
    assert tokens(alone) == plain[0]
    steps = alone[-1].details["tokens_per_step"]
    assert sum(steps) == 39 and len(steps) < 20 and max(steps) == 4
    batched = core.generate([GenerationRequest(p, long) for p in ps])
    assert [tokens(e) for e in batched] == plain
    metrics = core.speculator.metrics()[""]
    assert metrics["mean_tokens_per_step"] > 2 and metrics["acceptance_by_head"][0] > 0.5


def test_mixed_batch_with_lora_rows_and_adapter_heads_equals_plain(tmp_path, make_core):
    folder, _ = make_tiny_model(tmp_path / "m", "llama")
    lora = make_lora(folder, tmp_path / "lora", r=4)
    core = make_core(folder, medusa_policy="always")
    core.load_adapter("plain-lora", lora)
    ps = prompts(4, seed=2)
    reqs = [GenerationRequest(ps[0], GREEDY), GenerationRequest(ps[1], GREEDY, adapter="plain-lora"),
            GenerationRequest(ps[2], GREEDY, adapter="spec-lora"), GenerationRequest(ps[3], GREEDY)]
    core.load_adapter("spec-lora", lora)
    plain = [tokens(e) for e in core.generate(reqs)]
    # both names hold the same weights (same tokens on the same prompt), and they change the output
    [same] = core.generate([GenerationRequest(ps[1], GREEDY, adapter="spec-lora")])
    assert tokens(same) == plain[1]
    base = [tokens(e) for e in core.generate([GenerationRequest(ps[1], GREEDY), GenerationRequest(ps[2], GREEDY)])]
    assert base != [plain[1], plain[2]]
    core.load_medusa(heads_folder(tmp_path, core, "base-heads"))
    # heads inside an adapter folder's medusa/ subfolder attach to that adapter
    write_medusa(lora / "medusa", init_medusa(core.runner.config, 3, 1, 2, 0.3, torch.Generator().manual_seed(5)))
    core.load_adapter("spec-lora", lora)
    assert set(core.speculator.medusa.heads) == {None, "spec-lora"}
    reference = {ps[0]: plain[0], ps[2]: plain[2]}
    plant_oracle(core, reference)
    outs = core.generate(reqs)
    assert [tokens(e) for e in outs] == plain
    assert outs[1][-1].details is None  # an adapter without heads decodes plainly
    assert outs[2][-1].details["mean_tokens_per_step"] > 1.5
    metrics = core.speculator.metrics()
    assert set(metrics) == {"", "spec-lora"} and metrics["spec-lora"]["mean_tokens_per_step"] > 1.5


def test_above_max_batch_decodes_plainly(tmp_path, make_core):
    folder, _ = make_tiny_model(tmp_path / "m", "llama")
    core = make_core(folder, medusa_max_batch=2, medusa_policy="always")
    ps = prompts(3, seed=6)
    plain = [tokens(e) for e in core.generate([GenerationRequest(p, GREEDY) for p in ps])]
    core.load_medusa(heads_folder(tmp_path, core))
    plant_oracle(core, dict(zip(ps, plain, strict=True)))
    outs = core.generate([GenerationRequest(p, GREEDY) for p in ps])
    assert [tokens(e) for e in outs] == plain
    for events in outs:  # three rows decode plainly until one finishes
        assert events[-1].details["tokens_per_step"][0] == 1


def test_sampling_is_reproducible_and_accepts(tmp_path, make_core):
    folder, _ = make_tiny_model(tmp_path / "m", "llama")
    core = make_core(folder, medusa_policy="always")
    core.load_medusa(heads_folder(tmp_path, core))
    p = prompts(1, seed=3)[0]
    params = SamplingParams(max_tokens=20, temperature=0.8, top_p=0.95, seed=11, ignore_eos=True, logprobs=True)
    alone = core.generate([GenerationRequest(p, params)])[0]
    batched = core.generate([GenerationRequest(p, params), GenerationRequest(prompts(1, 8)[0], params)])[0]
    assert tokens(alone) == tokens(batched) and len(alone) == 20
    assert all(e.logprob is not None and e.logprob <= 0 for e in alone)
    # candidates equal to what the model itself finds likely are typically accepted
    plain = tokens(core.generate([GenerationRequest(p, SamplingParams(max_tokens=30, temperature=0,
                                                                      ignore_eos=True))])[0])
    plant_oracle(core, {p: plain})
    cold = SamplingParams(max_tokens=30, temperature=0.05, seed=3, ignore_eos=True)
    events = core.generate([GenerationRequest(p, cold)])[0]
    assert events[-1].details["mean_tokens_per_step"] > 1.5


def test_stops_inside_an_accepted_path(tmp_path, make_core):
    folder, _ = make_tiny_model(tmp_path / "m", "llama")
    core = make_core(folder, medusa_policy="always")
    p = prompts(1, seed=9)[0]
    plain = tokens(core.generate([GenerationRequest(p, GREEDY)])[0])
    core.load_medusa(heads_folder(tmp_path, core))
    plant_oracle(core, {p: plain})
    for n in (5, 6, 7):
        out = core.generate([GenerationRequest(p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))])[0]
        assert tokens(out) == plain[:n] and out[-1].finish_reason == "length"
    stop = plain[9]
    out = core.generate([GenerationRequest(p, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True,
                                                             stop_token_ids=(stop,)))])[0]
    assert tokens(out) == plain[:plain.index(stop) + 1]
    assert core.runner.kv.free_slots == 4


def test_heads_that_do_not_fit_the_tree_or_base_are_refused(tmp_path, make_core):
    folder, _ = make_tiny_model(tmp_path / "m", "llama")
    core = make_core(folder, medusa_policy="always")
    with pytest.raises(AdapterValidationError, match="needs 3 heads"):
        core.load_medusa(heads_folder(tmp_path, core, "two", num_heads=2))
    with pytest.raises(AdapterNotFoundError):
        core.load_medusa(heads_folder(tmp_path, core), attach_to="not-loaded")
    assert core.speculator.medusa.heads == {}
    shallow = make_core(folder, medusa_tree=((0,), (1,), (0, 0)))
    shallow.load_medusa(heads_folder(tmp_path, core, "two", num_heads=2))
    assert set(shallow.speculator.medusa.heads) == {None}


def test_an_adapters_heads_leave_with_it(tmp_path, make_core):
    """Heads attached to an adapter's name go when that adapter is unloaded, replaced or evicted: a new
    version of the name never speculates with the old version's heads."""
    folder, _ = make_tiny_model(tmp_path / "m", "llama")
    with_heads = make_lora(folder, tmp_path / "with", r=4)
    write_medusa(with_heads / "medusa", init_medusa(make_core(folder).runner.config, 3, 1, 2, 0.3))
    without = make_lora(folder, tmp_path / "without", r=4)
    core = make_core(folder, medusa_policy="always")
    core.load_medusa(heads_folder(tmp_path, core, "base-heads"))
    attached = core.speculator.medusa.heads
    core.load_adapter("a", with_heads)
    assert set(attached) == {None, "a"}
    core.load_adapter("a", without)  # a new version of the name, without heads
    assert set(attached) == {None}
    core.load_adapter("a", with_heads)
    core.unload_adapter("a")
    assert set(attached) == {None}
    one = core.read_adapter(with_heads)[0].nbytes
    small = make_core(folder, medusa_policy="always", host_cache_bytes=one + one // 2)  # room for one adapter
    small.load_adapter("a", with_heads)
    assert set(small.speculator.medusa.heads) == {"a"}
    small.load_adapter("b", without)  # evicts "a"
    assert small.adapters.resident() == ["b"] and small.speculator.medusa.heads == {}
