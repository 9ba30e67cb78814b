"""When Medusa speculation pays, and how big a tree: a cost model measured on this machine, acceptance
tracked online per head set, and the decision that joins them (issue 14, item 5).

Cost: at first use the engine times one decode step of a real sequence (one token) and a speculative step
with trees of 2..T tokens (the configured tree's first nodes): drafting the candidates with the sequence's
heads plus verifying them, on that sequence's own KV slot at positions it has not written yet (nothing it keeps
is touched); `costs[n]` = seconds(n tokens) / seconds(1 token),
made non-decreasing and ≥ 1. Measured once per engine (the machine does not change under it).

Acceptance: for each head set (its weights' fingerprint, greedy and sampled apart) and each tree path,
`trials` counts the verified steps whose parent path was fully accepted and `hits` those where the path
was accepted too, both decayed by `decay` per step (recent steps weigh most). r(path) = hits / (trials + 1)
(pessimistic: an unseen node is worth nothing), P(path accepted) = Π r over its prefixes.

Decision: nodes sorted by P (descending; a parent never after its child, so every prefix of the order is
a tree); verifying the first m of them emits E(m) = 1 + Σ P expected tokens for costs[m + 1]; the engine
speculates with the m that maximises E(m) / costs[m + 1], and only while that beats 1 + margin (plain
decoding: 1 token for 1 step). A head set the model declines is probed now and then (after 16, 32, 64 … up to
256 steps) with the chain of each head's first candidate (the paths the others hang from: a tree of heads + 1 tokens,
where the full tree cost a declined request ~5 % of its steps' time), so heads that improve, or a load that
changes, are noticed.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from workers.engine.runner import DecodeRow, PromptChunk

if TYPE_CHECKING:
    from workers.engine.sequence import Sequence

Path = tuple[int, ...]


@dataclass(frozen=True)
class PolicyConfig:
    margin: float = 0.03  # speculate only when expected tokens per unit of cost beat plain by this much
    decay: float = 0.99  # per verified step: the acceptance counts' memory (~100 steps)
    first_probe_gap: int = 16  # steps between probes of a declined head set, doubling up to max_probe_gap (a
    max_probe_gap: int = 256  # head set's first decision probes at once: heads that pay are found at once)
    cost_reps: int = 5  # timings per tree size (median)


@dataclass(frozen=True)
class Decision:
    paths: tuple[Path, ...] | None  # the tree to verify (None: decode plainly)
    reason: str  # "probe" | "expected gain" | "cost model" | "always"
    expected_tokens: float  # the model's expected tokens per step for the chosen tree (1.0 when plain)
    cost: float  # its cost in one-token steps (1.0 when plain)


# the decision, pure functions ------------------------------------------------------------------------
def path_probabilities(paths: tuple[Path, ...], hits: dict[Path, float], trials: dict[Path, float]) -> list[float]:
    """P(path accepted) for each path: the product of r = hits / (trials + 1) over its prefixes."""
    rate = {p: hits.get(p, 0.0) / (trials.get(p, 0.0) + 1.0) for p in paths}
    out = []
    for p in paths:
        prob = 1.0
        for d in range(1, len(p) + 1):
            prob *= rate.get(p[:d], 0.0)
        out.append(prob)
    return out


def value_order(paths: tuple[Path, ...], probs: list[float]) -> list[int]:
    """Indices of paths by P descending, then depth, then path: every prefix of the order is a tree."""
    return sorted(range(len(paths)), key=lambda i: (-probs[i], len(paths[i]), paths[i]))


def choose_size(sorted_probs: list[float], costs: list[float], margin: float) -> tuple[int, float, float]:
    """sorted_probs: P of the nodes in value order; costs[n]: verifying n tokens in one-token steps.
    Returns (m, expected tokens, cost): the number of candidate nodes to verify (0: plain) that maximises
    expected tokens per unit of cost, if that beats plain decoding (1.0) by `margin`."""
    best = (0, 1.0, 1.0)
    expected = 1.0
    for m, prob in enumerate(sorted_probs[:len(costs) - 2], start=1):
        expected += prob
        cost = max(1.0, costs[m + 1])
        if expected / cost > best[1] / best[2] and expected / cost > 1.0 + margin:
            best = (m, expected, cost)
    return best


def monotone_costs(seconds: list[float]) -> list[float]:
    """seconds[n]: median seconds of an n-token step (index 0 unused) → costs relative to n = 1,
    non-decreasing and ≥ 1 (timing noise must not make a bigger tree look cheaper)."""
    costs = [0.0, 1.0]
    for n in range(2, len(seconds)):
        costs.append(max(costs[-1], seconds[n] / seconds[1]))
    return costs


# state -----------------------------------------------------------------------------------------------
@dataclass
class HeadSetState:
    hits: dict[Path, float] = field(default_factory=dict)
    trials: dict[Path, float] = field(default_factory=dict)
    since_probe: int = 0
    gap: int = 0  # 0: the first decision probes


@dataclass
class SpeculationLog:
    """One sequence's speculation, for `details.speculative`."""

    verified_steps: int = 0  # steps that verified a tree (probes included)
    probe_steps: int = 0
    chosen_steps: int = 0  # steps where the cost model chose a tree
    tree_sizes: list[int] = field(default_factory=list)  # tokens verified per speculative step
    reason: str = ""  # of the last decision
    expected_tokens: float = 1.0
    cost: float = 1.0

    def record(self, decision: Decision) -> None:
        self.reason, self.expected_tokens, self.cost = decision.reason, decision.expected_tokens, decision.cost
        if decision.paths is not None:
            self.verified_steps += 1
            self.probe_steps += decision.reason == "probe"
            self.chosen_steps += decision.reason in ("expected gain", "always")
            self.tree_sizes.append(len(decision.paths) + 1)

    def as_details(self, tokens_per_step: list[int]) -> dict:
        return {"decode_steps": len(tokens_per_step), "tokens_per_step": list(tokens_per_step),
                "mean_tokens_per_step": sum(tokens_per_step) / len(tokens_per_step),
                "used": self.chosen_steps > 0, "reason": self.reason,
                "verified_steps": self.verified_steps, "probe_steps": self.probe_steps,
                "max_tree_size": max(self.tree_sizes, default=0),
                "expected_tokens_per_step": round(self.expected_tokens, 3), "cost_ratio": round(self.cost, 3)}


class SpeculationPolicy:
    """`mode` "measured": the cost model decides; "always": the full tree on every eligible step."""

    def __init__(self, tree_paths: tuple[Path, ...], mode: str, cfg: PolicyConfig = PolicyConfig()):
        if mode not in ("measured", "always"):
            raise ValueError(f"medusa_policy must be 'measured' or 'always', not {mode!r}")
        self.paths, self.mode, self.cfg = tree_paths, mode, cfg
        self.probe_paths = tuple(p for p in tree_paths if not any(p)) or tree_paths  # the first candidates' chain
        self.costs: list[float] | None = None  # costs[n], n = 0..T (index 0 unused)
        self.states: dict[tuple[str, bool], HeadSetState] = {}

    def ensure_costs(self, measure: Callable[[], list[float]]) -> None:
        if self.mode == "measured" and self.costs is None:
            self.costs = monotone_costs(measure())

    def decide(self, key: tuple[str, bool]) -> Decision:
        """One decision per head set per step (every row with those heads verifies the same tree)."""
        if self.mode == "always":
            return Decision(self.paths, "always", 0.0, 0.0)
        assert self.costs is not None, "ensure_costs first"
        state = self.states.setdefault(key, HeadSetState())
        probs = path_probabilities(self.paths, state.hits, state.trials)
        order = value_order(self.paths, probs)
        m, expected, cost = choose_size([probs[i] for i in order], self.costs, self.cfg.margin)
        if m == 0 and state.since_probe >= state.gap and math.isfinite(self.costs[-1]):  # inf: unmeasurable
            state.since_probe = 0
            state.gap = min(max(2 * state.gap, self.cfg.first_probe_gap), self.cfg.max_probe_gap)
            return Decision(self.probe_paths, "probe", expected, self.costs[len(self.probe_paths) + 1])
        state.since_probe += 1
        if m == 0:
            return Decision(None, "cost model", expected, cost)
        chosen = tuple(sorted((self.paths[i] for i in order[:m]), key=lambda p: (len(p), p)))
        return Decision(chosen, "expected gain", expected, cost)

    def observe(self, key: tuple[str, bool], paths: tuple[Path, ...], parents: list[int],
                accepted: list[bool]) -> None:
        """A verified tree (paths in tree order, node i+1 = paths[i]; parents per node; accept flags per
        node, root first): updates the head set's acceptance counts."""
        if self.mode == "always":
            return
        state = self.states.setdefault(key, HeadSetState())
        for table in (state.hits, state.trials):
            for p in table:
                table[p] *= self.cfg.decay
        full = [True] + [False] * len(paths)
        for i, p in enumerate(paths, start=1):
            full[i] = accepted[i] and full[parents[i]]
            if full[parents[i]]:
                state.trials[p] = state.trials.get(p, 0.0) + 1.0
                state.hits[p] = state.hits.get(p, 0.0) + float(full[i])


# measuring the cost --------------------------------------------------------------------------------
def measure_step_seconds(forward: Callable, seq: Sequence, layouts: list, reps: int,
                         propose: Callable[[], object] | None = None) -> list[float]:
    """Median seconds of a one-token decode step and of a speculative step with a tree of 2..T tokens
    (layouts[n] for n ≥ 2): drafting its candidates (`propose`: the heads over one row, which read the base's
    lm_head once per head) plus verifying them, on `seq`'s KV slot at positions it has not written (num_cached
    onwards). Index 0 unused."""
    slot, start, token, placement = seq.kv_slot, seq.num_cached, seq.last_token, seq.placement
    runs: dict[int, list[float]] = {n: [] for n in range(0 if propose else 1, len(layouts))}  # 0: drafting

    def once(n: int) -> float:
        t0 = time.perf_counter()
        if n == 0:
            propose()
            return time.perf_counter() - t0
        if n == 1:
            logits, _ = forward([DecodeRow(slot, start, token, placement)], [], with_hidden=True)
        else:
            logits, _ = forward([], [PromptChunk(slot, start, [token] * n, True, placement, layouts[n])],
                                with_hidden=True)
        float(logits[-1, 0])  # waits for the device
        return time.perf_counter() - t0

    for n in (0 if propose else 1, 1, len(layouts) - 1):  # warm up: drafting, the plain step, the largest tree
        once(n)
    for _ in range(reps):
        for n in runs:
            runs[n].append(once(n))
    drafting = statistics.median(runs.pop(0)) if propose else 0.0
    return [0.0] + [statistics.median(runs[n]) + (drafting if n > 1 else 0.0) for n in sorted(runs)]
