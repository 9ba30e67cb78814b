"""Medusa's cost model (issue 14, item 5): the decision against hand-computed cases, acceptance tracking and
probing, and end to end: random heads end up decoding plainly (same output, `details.speculative.used` false),
heads whose candidates are right speculate with a tree the model sizes."""

import math
from types import SimpleNamespace

import pytest
import torch
from tiny_models import make_tiny_model

from workers.adapters.medusa import init_medusa, write_medusa
from workers.engine.speculation_policy import (
    PolicyConfig,
    SpeculationPolicy,
    choose_size,
    measure_step_seconds,
    monotone_costs,
    path_probabilities,
    value_order,
)
from workers.engine.types import GenerationRequest, SamplingParams

PATHS = ((0,), (1,), (0, 0))
GREEDY = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)


# the decision, by hand ---------------------------------------------------------------------------------
def test_choose_size_by_hand():
    # E(1) = 1.8 at 1.05 → 1.714; E(2) = 2.3 at 1.1 → 2.091; E(3) = 2.4 at 1.5 → 1.6: two nodes
    assert choose_size([0.8, 0.5, 0.1], [0, 1, 1.05, 1.1, 1.5], 0.03) == (2, pytest.approx(2.3), 1.1)
    # E(1) = 1.3 at 1.2 → 1.083; E(2) = 1.32 at 2.0 → 0.66: one node
    assert choose_size([0.3, 0.02], [0, 1, 1.2, 2.0], 0.03) == (1, pytest.approx(1.3), 1.2)
    # 1.05 / 1.05 = 1.0: no better than plain → plain
    assert choose_size([0.05], [0, 1, 1.05], 0.03) == (0, 1.0, 1.0)
    # within the margin: 1.02 / 1.0 does not beat 1.03
    assert choose_size([0.02], [0, 1, 1.0], 0.03) == (0, 1.0, 1.0)
    assert choose_size([0.0, 0.0, 0.0], [0, 1, 1, 1, 1], 0.03) == (0, 1.0, 1.0)  # worthless heads, free trees
    # a costly machine (GPU-like flat costs are cheap; a CPU where 4 tokens cost 3 steps is not)
    assert choose_size([0.6, 0.3, 0.2], [0, 1, 1.9, 2.5, 3.0], 0.03) == (0, 1.0, 1.0)


def test_path_probabilities_and_order_by_hand():
    hits = {(0,): 3.0, (0, 0): 1.0}
    trials = {(0,): 3.0, (1,): 1.0, (0, 0): 3.0}
    # r(0) = 3/4, r(1) = 0/2, r(0,0) = 1/4 → P(0,0) = 3/4 · 1/4
    assert path_probabilities(PATHS, hits, trials) == pytest.approx([0.75, 0.0, 0.1875])
    assert value_order(PATHS, [0.75, 0.0, 0.1875]) == [0, 2, 1]
    assert value_order(PATHS, [0.0, 0.0, 0.0]) == [0, 1, 2]  # ties: a parent before its child
    assert path_probabilities(PATHS, {}, {}) == [0.0, 0.0, 0.0]  # unseen heads are worth nothing


def test_costs_are_relative_monotone_and_at_least_one():
    assert monotone_costs([0.0, 2.0, 1.8, 3.0, 2.9]) == [0.0, 1.0, 1.0, 1.5, 1.5]


def policy(costs) -> SpeculationPolicy:
    p = SpeculationPolicy(PATHS, "measured", PolicyConfig(decay=1.0, first_probe_gap=2, max_probe_gap=8))
    p.ensure_costs(lambda: costs)
    return p


def test_rejected_heads_are_declined_and_probed_ever_more_rarely():
    p = policy([0.0, 1.0, 1.05, 1.1, 1.2])  # seconds of 1..4 tokens
    key = ("h", True)
    reasons = []
    for _ in range(20):
        d = p.decide(key)
        reasons.append(d.reason)
        if d.paths is not None:
            p.observe(key, d.paths, [-1, 0, 1], [True, False, False])  # the probed chain: rejected
    probes = [i for i, r in enumerate(reasons) if r == "probe"]
    assert probes == [0, 3, 8, 17]  # gaps 2, 4, 8 (capped)
    assert p.decide(("other", True)).paths == ((0,), (0, 0))  # a probe verifies the first candidates' chain only
    assert set(reasons) == {"probe", "cost model"}


def test_a_failed_cost_measurement_never_speculates_nor_probes():
    p = policy([0.0, 1.0] + [float("inf")] * 3)
    assert all(p.decide(("h", True)).paths is None for _ in range(20))


def test_accepted_heads_choose_the_tree_the_model_sizes():
    p = policy([0.0, 1.0, 1.02, 1.05, 1.8])  # the 4th token is expensive
    key = ("h", True)
    d = p.decide(key)
    assert d.reason == "probe" and d.paths == ((0,), (0, 0)) and d.cost == 1.05  # the chain: 3 tokens
    for _ in range(10):  # head 0's best is always right, its child half the time, head 0's second never
        p.observe(key, PATHS, [-1, 0, 0, 1], [True, True, False, True])
        p.observe(key, PATHS, [-1, 0, 0, 1], [True, True, False, False])
    d = p.decide(key)
    # r(0) = 20/21, r(0,0) = 10/21: E(1) = 1.95 at 1.02 → 1.91; E(2) = 2.41 at 1.05 → 2.3; E(3) at 1.8 lower
    assert d.reason == "expected gain" and d.paths == ((0,), (0, 0))
    assert d.expected_tokens == pytest.approx(1 + 20 / 21 + 20 / 21 * 10 / 21) and d.cost == 1.05


def test_greedy_and_sampled_are_tracked_apart_and_always_mode_ignores_the_model():
    p = policy([0.0, 1.0, 1.0, 1.0, 1.0])
    p.observe(("h", True), PATHS, [-1, 0, 0, 1], [True, True, True, True])
    assert p.states[("h", True)].hits and ("h", False) not in p.states
    always = SpeculationPolicy(PATHS, "always")
    assert always.decide(("h", True)).paths == PATHS and always.costs is None
    with pytest.raises(ValueError, match="medusa_policy"):
        SpeculationPolicy(PATHS, "sometimes")


# end to end ----------------------------------------------------------------------------------------
def run(core, prompt=(5, 9, 11, 40)):
    events = core.generate([GenerationRequest(prompt, GREEDY)])[0]
    return [e.token_id for e in events], events[-1].details


def test_random_heads_end_up_decoding_plainly_with_the_same_output(tmp_path, make_core):
    folder, _ = make_tiny_model(tmp_path / "m")
    core = make_core(folder)
    plain, none = run(core)
    assert none is None
    heads = init_medusa(core.runner.config, 3, 1, 2, std=3.0, generator=torch.Generator().manual_seed(0))
    core.load_medusa(write_medusa(tmp_path / "heads", heads))
    tokens, spec = run(core)
    assert tokens == plain
    assert spec["used"] is False and spec["reason"] == "cost model"
    assert spec["verified_steps"] == spec["probe_steps"] <= 4  # probes at steps 1, 5, 13, 29 of 47
    assert spec["decode_steps"] == 47 - sum(n - 1 for n in spec["tokens_per_step"])
    assert core.speculator.policy.costs[1] == 1.0 and len(core.speculator.policy.costs) == core.speculator.tree.size + 1
    assert all(math.isfinite(c) for c in core.speculator.policy.costs)  # measured on the runner, not the fallback
    again = run(core)[1]  # the same heads keep their record: fewer probes still
    assert again["used"] is False and again["probe_steps"] <= 2


def test_heads_that_are_right_speculate_and_keep_the_output(tmp_path, make_core):
    folder, _ = make_tiny_model(tmp_path / "m")
    core = make_core(folder)
    prompt = (5, 9, 11, 40)
    plain, _ = run(core, prompt)
    core.load_medusa(write_medusa(tmp_path / "heads", init_medusa(core.runner.config, 3, 1, 2, std=3.0)))
    propose = core.speculator.propose

    def oracle(spec):  # the chain (0,), (0, 0), (0, 0, 0) holds the true next tokens
        drafts = propose(spec)
        for d in drafts:
            n = len(d.seq.output)
            for i, path in enumerate(d.tree.paths, start=1):
                if set(path) == {0} and n + len(path) - 1 < len(plain):
                    d.tokens[i] = plain[n + len(path) - 1]
        return drafts

    core.speculator.propose = oracle
    tree_size = core.speculator.tree.size
    core.speculator.policy.costs = [0.0] + [1.0 + 0.05 * n for n in range(tree_size)]  # no timing noise here
    tokens, spec = run(core, prompt)
    assert tokens == plain
    assert spec["used"] is True and spec["reason"] == "expected gain"
    assert spec["mean_tokens_per_step"] > 2 and spec["max_tree_size"] >= 2


def test_a_speculative_steps_cost_counts_drafting_its_candidates(monkeypatch):
    """Drafting (the heads over the base's lm_head) is part of what a speculative step costs; a plain step has none.
    A fake clock: a one-token step takes 10, verifying n tokens 10 + n, drafting 4."""
    from workers.engine import speculation_policy

    clock = [0.0]
    monkeypatch.setattr(speculation_policy.time, "perf_counter", lambda: clock[0])

    def forward(decode, chunks, with_hidden):
        clock[0] += 10.0 if decode else 10.0 + len(chunks[0].tokens)
        return torch.zeros(1, 1), None

    def propose():
        clock[0] += 4.0

    seq = SimpleNamespace(kv_slot=0, num_cached=3, last_token=7, placement=None)
    layouts = [None, None, "two", "three"]
    assert measure_step_seconds(forward, seq, layouts, reps=3, propose=propose) == [0.0, 10.0, 16.0, 17.0]
    assert measure_step_seconds(forward, seq, layouts, reps=3) == [0.0, 10.0, 12.0, 13.0]
