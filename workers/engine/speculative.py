"""Medusa tree speculative decoding, the engine side: the tree's buffers, candidates from the heads,
and verification (acceptance) of a verified tree's logits.

One step of a sequence with heads: its last emitted token (the root, not yet in the KV cache) and the
tree's candidate tokens go through the decoder as one chunk — node i at KV position num_cached + i, at
RoPE position num_cached + depth(i), seeing the cached prefix and its own ancestors. Node tokens are the
top-k of the heads evaluated on the hidden state that predicted the root (head d-1 fills depth d). The
logits at each node then say which candidates the base agrees with: greedy keeps a candidate iff it is
the argmax of its parent's logits (so the output is exactly plain greedy decoding); sampling keeps it iff
p(x) > min(ε, δ·exp(−H(p))) under its parent's distribution (typical acceptance). The longest accepted
path wins (the first in tree order on ties); its tokens plus one token chosen from the last accepted
node's logits are emitted, its KV entries are compacted into place, and that node's hidden state seeds
the next step's heads.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Iterable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import torch

from workers.adapters.medusa import MedusaHeads
from workers.adapters.medusa_kind import MedusaDevice
from workers.engine.sampler import _sample_row, tempered_probs
from workers.engine.sequence import Sequence
from workers.engine.speculation_policy import (
    Decision,
    PolicyConfig,
    SpeculationPolicy,
    measure_step_seconds,
)
from workers.model.batch import TreeLayout

Path = tuple[int, ...]  # top-k rank at each depth: (0, 1) = 2nd best of head 1 under the best of head 0

MAX_TOPK = 32

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tree:
    """Buffers of one tree. Node 0 is the root; nodes 1.. follow the paths sorted by (depth, path)."""

    paths: tuple[Path, ...]  # sorted
    depth: int  # heads needed
    topk: int  # candidates needed per head
    layout: TreeLayout  # depths [T], ancestors [T, T]
    node_heads: torch.Tensor  # [T-1] long: the head filling node i+1 (its depth - 1)
    node_ranks: torch.Tensor  # [T-1] long: its rank in that head's top-k
    retrieve: torch.Tensor  # [P, depth+1] long: node indices of each leaf's path, root first, -1 padded
    parents: list[int]  # parent node of each node (-1 for the root)

    @property
    def size(self) -> int:
        return len(self.paths) + 1


def build_tree(paths: Iterable[Seq[int]]) -> Tree:
    """Validates a tree (paths of non-negative top-k ranks, every prefix present, no duplicates)."""
    norm = [tuple(p) for p in paths]
    if not norm:
        raise ValueError("a Medusa tree needs at least one path")
    for p in norm:
        if not p or any(type(r) is not int or not 0 <= r < MAX_TOPK for r in p):
            raise ValueError(f"tree path {p!r}: a non-empty list of top-k ranks in [0, {MAX_TOPK})")
    if len(set(norm)) != len(norm):
        raise ValueError("a Medusa tree lists a path twice")
    known = set(norm)
    for p in norm:
        if len(p) > 1 and p[:-1] not in known:
            raise ValueError(f"tree path {p!r}: its prefix {p[:-1]!r} is missing")
    ordered = tuple(sorted(norm, key=lambda p: (len(p), p)))
    index = {p: i + 1 for i, p in enumerate(ordered)}
    t, depth = len(ordered) + 1, max(len(p) for p in ordered)
    parents = [-1] + [index[p[:-1]] if len(p) > 1 else 0 for p in ordered]
    depths = torch.tensor([0] + [len(p) for p in ordered], dtype=torch.long)  # [T]
    ancestors = torch.eye(t, dtype=torch.bool)  # [T, T]: node i sees node j
    for i in range(1, t):
        j = parents[i]
        while j >= 0:
            ancestors[i, j] = True
            j = parents[j]
    leaves = [p for p in ordered if not any(len(q) == len(p) + 1 and q[:-1] == p for q in ordered)]
    retrieve = torch.full((len(leaves), depth + 1), -1, dtype=torch.long)  # [P, D+1]
    for row, leaf in enumerate(leaves):
        retrieve[row, 0] = 0
        for d in range(1, len(leaf) + 1):
            retrieve[row, d] = index[leaf[:d]]
    return Tree(
        paths=ordered, depth=depth, topk=max(max(p) for p in ordered) + 1,
        layout=TreeLayout(depths, ancestors),
        node_heads=torch.tensor([len(p) - 1 for p in ordered], dtype=torch.long),
        node_ranks=torch.tensor([p[-1] for p in ordered], dtype=torch.long),
        retrieve=retrieve, parents=parents)


# candidates ----------------------------------------------------------------------------------------
def tree_tokens(tree: Tree, roots: torch.Tensor, topk: torch.Tensor) -> torch.Tensor:
    """roots: [B] long, topk: [B, K, k] long → the tree's tokens [B, T], root first."""
    nodes = topk[:, tree.node_heads, tree.node_ranks]  # [B, T-1]
    return torch.cat([roots.unsqueeze(1), nodes], dim=1)


def reference_tree_tokens(tree: Tree, roots: list[int], topk: list[list[list[int]]]) -> list[list[int]]:
    """Plain reference of `tree_tokens`: node for path p is topk[head len(p)-1][p[-1]]."""
    return [[root] + [topk[b][len(p) - 1][p[-1]] for p in tree.paths] for b, root in enumerate(roots)]


def reference_tree_mask(tree: Tree) -> torch.Tensor:
    """[T, T] bool from the paths alone: node i sees node j iff j's path is a prefix of i's (root: ())."""
    paths = [()] + list(tree.paths)
    return torch.tensor([[pi[:len(pj)] == pj for pj in paths] for pi in paths], dtype=torch.bool)


# acceptance ----------------------------------------------------------------------------------------
def typical_threshold(probs: torch.Tensor, epsilon: float, delta: float) -> torch.Tensor:
    """probs: [..., V] → min(ε, δ·exp(−H(p))): [...]."""
    entropy = -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)
    return torch.minimum(torch.full_like(entropy, epsilon), delta * torch.exp(-entropy))


def accept_flags(tree: Tree, tokens: torch.Tensor, logits: torch.Tensor, temperature: float,
                 epsilon: float, delta: float) -> torch.Tensor:
    """tokens: [T], logits: [T, V] of one verified tree → accepted [T] bool per node (root: True)."""
    parents = torch.tensor([0] + tree.parents[1:], dtype=torch.long)  # [T]
    if temperature <= 0:
        ok = logits.argmax(-1)[parents] == tokens  # [T]
    else:
        probs = tempered_probs(logits, temperature)  # [T, V]
        ok = probs[parents, tokens] > typical_threshold(probs, epsilon, delta)[parents]
    ok[0] = True
    return ok


def best_path(tree: Tree, accepted: torch.Tensor) -> list[int]:
    """accepted: [T] bool → the longest accepted path's nodes, root first (first in tree order on ties)."""
    valid = tree.retrieve >= 0  # [P, D+1]
    flags = accepted[tree.retrieve.clamp_min(0)] & valid  # [P, D+1]
    lengths = flags.long().cumprod(dim=1).sum(dim=1)  # [P]: accepted prefix, root included
    best = int(lengths.argmax())
    return tree.retrieve[best, :int(lengths[best])].tolist()


def reference_best_path(tree: Tree, accepted: list[bool]) -> list[int]:
    """Plain reference of `best_path`: every root-to-node path, longest accepted prefix, first on ties."""
    best: list[int] = [0]
    for row in tree.retrieve.tolist():
        nodes = [n for n in row if n >= 0]
        run = []
        for n in nodes:
            if not accepted[n]:
                break
            run.append(n)
        if len(run) > len(best):
            best = run
    return best


# the engine's speculator ---------------------------------------------------------------------------
@dataclass
class Draft:
    """One sequence's tree this step."""

    seq: Sequence
    heads: MedusaHeads
    tokens: list[int]  # [T] root first
    tree: Tree  # the tree verified this step (the configured one, or a subtree the cost model chose)
    key: tuple[str, bool]  # the head set's acceptance record: (fingerprint, greedy)


@dataclass
class Verified:
    seq: Sequence
    tokens: list[int]  # emitted, in order (accepted candidates, then the bonus token)
    logprobs: list[float | None]
    nodes: list[int]  # accepted path, root first (len(tokens) == len(nodes))
    hidden: torch.Tensor  # [hidden] of the last accepted node: the next step's heads read it


@dataclass
class HeadStats:
    steps: int = 0
    tokens: int = 0
    accepted_at_depth: Counter = field(default_factory=Counter)  # depth d → steps that accepted ≥ d nodes

    def as_dict(self, depth: int) -> dict:
        return {"steps": self.steps, "tokens": self.tokens,
                "mean_tokens_per_step": self.tokens / self.steps if self.steps else 0.0,
                "acceptance_by_head": [self.accepted_at_depth[d] / self.steps if self.steps else 0.0
                                       for d in range(1, depth + 1)]}


class Speculator:
    """The tree, the per-owner acceptance counters, and the policy that decides each step whether (and how
    big a tree) to verify. The heads themselves are the Medusa kind's device (`medusa`: by owner, None = the
    base's default heads). `forward` is the runner's (the policy times it once to learn what verifying n
    tokens costs)."""

    def __init__(self, tree: Iterable[Seq[int]], max_batch: int, epsilon: float, delta: float,
                 medusa: MedusaDevice, forward=None, policy: str = "measured",
                 policy_config: PolicyConfig | None = None):
        self.tree = build_tree(tree)
        self.max_batch, self.epsilon, self.delta = max_batch, epsilon, delta
        self.medusa = medusa
        self.forward = forward
        self.policy = SpeculationPolicy(self.tree.paths, policy, policy_config or PolicyConfig())
        self.subtrees: dict[tuple[Path, ...], Tree] = {self.tree.paths: self.tree}
        self.stats: defaultdict[str | None, HeadStats] = defaultdict(HeadStats)

    def heads_for(self, seq: Sequence) -> MedusaHeads | None:
        return self.medusa.heads_of(seq.request.adapter)

    # one step --------------------------------------------------------------------------------
    def split(self, decode: list[Sequence],
              max_seq: int) -> tuple[list[tuple[Sequence, MedusaHeads, Tree]], list[Sequence]]:
        """Which decoding sequences verify a tree this step, with their heads and tree (the rest decode
        plainly): rows with heads, while the batch is small enough and the policy expects a gain."""
        if not self.medusa.heads:
            return [], decode
        if len(decode) > self.max_batch:
            for seq in decode:
                seq.speculation.reason = "batch size"
            return [], decode
        spec, plain, decisions = [], [], {}
        for seq in decode:
            heads = self.heads_for(seq)
            if heads is None or seq.medusa_hidden is None or seq.num_cached + self.tree.size > max_seq:
                plain.append(seq)
                continue
            self.policy.ensure_costs(lambda seq=seq: self._measure(seq))
            key = self._key(seq)
            if key not in decisions:
                decisions[key] = self.policy.decide(key)
            decision: Decision = decisions[key]
            seq.speculation.record(decision)
            if decision.paths is None:
                plain.append(seq)
            else:
                spec.append((seq, heads, self._subtree(decision.paths)))
        return spec, plain

    def _key(self, seq: Sequence) -> tuple[str, bool]:
        p = seq.request.params
        return self.medusa.fingerprints[seq.request.adapter], p.temperature <= 0 or p.top_k == 1

    def _subtree(self, paths: tuple[Path, ...]) -> Tree:
        if paths not in self.subtrees:
            self.subtrees[paths] = build_tree(paths)
        return self.subtrees[paths]

    def _measure(self, seq: Sequence) -> list[float]:
        """Seconds of a one-token step and of speculative steps with trees of 2..T tokens (the configured tree's
        first nodes), drafting by the sequence's heads included."""
        layouts = [None, None] + [self._subtree(self.tree.paths[:n - 1]).layout
                                  for n in range(2, self.tree.size + 1)]
        heads, hidden = self.heads_for(seq), seq.medusa_hidden

        def propose() -> None:
            with torch.inference_mode():
                heads.topk(hidden[None], self.tree.topk).cpu()  # [1, K, k]; .cpu() waits for the device

        try:
            seconds = measure_step_seconds(self.forward, seq, layouts, self.policy.cfg.cost_reps, propose)
        except Exception:  # not the request's fault: without a cost model, trees are never worth it
            log.exception("Medusa cost measurement failed; this worker will decode plainly")
            return [0.0, 1.0] + [float("inf")] * (self.tree.size - 1)
        log.info("Medusa cost model: a speculative step of n tokens (drafting + verifying) costs %s one-token "
                 "steps",
                 [round(s / seconds[1], 2) for s in seconds[1:]])
        return seconds

    @torch.inference_mode()
    def propose(self, spec: list[tuple[Sequence, MedusaHeads, Tree]]) -> list[Draft]:
        """Candidates for each sequence, each set of heads evaluated once for all its rows (one tree)."""
        drafts: dict[int, Draft] = {}
        by_heads: dict[tuple[int, int], list[Sequence]] = defaultdict(list)
        owners: dict[tuple[int, int], tuple[MedusaHeads, Tree]] = {}
        for seq, heads, tree in spec:
            by_heads[id(heads), id(tree)].append(seq)
            owners[id(heads), id(tree)] = heads, tree
        for key, group in by_heads.items():
            heads, tree = owners[key]
            hidden = torch.stack([s.medusa_hidden for s in group])  # [B, H]
            topk = heads.topk(hidden, tree.topk)  # [B, K, k]
            roots = torch.tensor([s.last_token for s in group], device=topk.device)
            tokens = tree_tokens(tree, roots, topk).tolist()  # [B, T]
            for seq, toks in zip(group, tokens, strict=True):
                drafts[id(seq)] = Draft(seq, heads, toks, tree, self._key(seq))
        return [drafts[id(s)] for s, _, _ in spec]

    @torch.inference_mode()
    def verify(self, drafts: list[Draft], logits: torch.Tensor, hidden: torch.Tensor) -> list[Verified]:
        """logits: [ΣT, V] fp32, hidden: [ΣT, H] of the verified trees, in draft order."""
        out, start = [], 0
        for draft in drafts:
            rows = slice(start, start + draft.tree.size)
            out.append(self._verify_one(draft, logits[rows], hidden[rows]))
            start += draft.tree.size
        return out

    def _verify_one(self, draft: Draft, logits: torch.Tensor, hidden: torch.Tensor) -> Verified:
        """logits: [T, V], hidden: [T, H]."""
        seq, p = draft.seq, draft.seq.request.params
        greedy = p.temperature <= 0 or p.top_k == 1
        tokens = torch.tensor(draft.tokens, device=logits.device)  # [T]
        tree = draft.tree
        flags = accept_flags(tree, tokens, logits, 0.0 if greedy else p.temperature, self.epsilon, self.delta)
        self.policy.observe(draft.key, tree.paths, tree.parents, flags.tolist())
        nodes = best_path(tree, flags)
        last = nodes[-1]
        if greedy:
            bonus = int(logits[last].argmax())
        else:
            bonus = _sample_row(logits[last], p.temperature, p.top_k, p.top_p, seq.generator)
        emitted = [draft.tokens[n] for n in nodes[1:]] + [bonus]
        logprobs: list[float | None] = [None] * len(emitted)
        if p.logprobs:
            lp = torch.log_softmax(logits[nodes], dim=-1)  # [m, V]: node i's logits chose emitted[i]
            logprobs = lp.gather(1, torch.tensor(emitted, device=lp.device).unsqueeze(1)).squeeze(1).tolist()
        stats = self.stats[seq.request.adapter]
        stats.steps += 1
        stats.tokens += len(emitted)
        for d in range(1, len(nodes)):
            stats.accepted_at_depth[d] += 1
        return Verified(seq, emitted, logprobs, nodes, hidden[last].clone())

    def metrics(self) -> dict:
        """Per owner ("" for the base): steps, tokens, mean tokens per step, acceptance by head."""
        return {owner or "": s.as_dict(self.tree.depth) for owner, s in list(self.stats.items())}
