"""Token selection per row (the caller takes one argmax over all rows for the greedy ones); each row with its
own parameters and RNG: processors (logit bias, penalties; see logits_processors) → grammar mask (structured
output) → temperature → top-k → top-p → min-p / typical-p → multinomial. Logprobs are the model's raw ones
(log_softmax of the row's logits before any processor or warper, as vLLM reports them), computed only for
the rows that ask.

Numerically safe for any accepted parameters: logits are shifted by their maximum before the temperature
divides them (so no temperature gives inf/inf), top-p always keeps the most likely token (a `top_p` below
the smallest probability, even one that rounds to 0 in fp32, keeps exactly that one), and a row whose
probabilities are not a distribution (NaN logits) falls back to the argmax of its finite logits."""

from __future__ import annotations

import math

import torch

from workers.engine.logits_processors import process_row, uses_processors, warp_probs
from workers.engine.sequence import Sequence
from workers.engine.structured import constrain
from workers.engine.types import SamplingParams

TopLogprobs = tuple[tuple[int, float], ...]


def choose(raw: torch.Tensor, seq: Sequence, greedy: int) -> tuple[int, float | None, TopLogprobs | None]:
    """raw: [vocab] fp32 logits of one row whose argmax is `greedy` → the row's token under its own parameters
    and RNG, its raw logprob and its top-`top_logprobs` (token, raw logprob) pairs when the request asked."""
    p = seq.request.params
    logits = raw
    if uses_processors(p):
        logits = process_row(raw.clone(), p, seq.prompt, seq.output)
    if seq.matcher is not None:
        logits = constrain(logits[None], [seq.matcher])[0]
    token = greedy if logits is raw else int(logits.argmax())
    if p.temperature > 0 and p.top_k != 1:
        token = _sample_row(logits, p.temperature, p.top_k, p.top_p, seq.generator, p.min_p, p.typical_p)
    if not p.logprobs:
        return token, None, None
    (logprob,), (top,) = raw_logprobs(raw[None], [token], [p])
    return token, logprob, top


def sample(logits: torch.Tensor, seqs: list[Sequence]
           ) -> tuple[list[int], list[float | None], list[TopLogprobs | None]]:
    """logits: [R, vocab] fp32, one row per sequence: `choose` for every row (what a step does, as one call)."""
    greedy = logits.argmax(dim=-1).tolist()
    chosen = [choose(logits[row], seq, greedy[row]) for row, seq in enumerate(seqs)]
    return [c[0] for c in chosen], [c[1] for c in chosen], [c[2] for c in chosen]


def tempered_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits: [..., vocab] → softmax(logits / temperature) without overflow for any temperature > 0:
    the maximum becomes 0 first, so a tiny temperature sends the others to -inf, never inf/inf."""
    shifted = logits - logits.amax(dim=-1, keepdim=True)  # [..., vocab], ≤ 0 (NaN rows stay NaN)
    return torch.softmax(shifted / temperature, dim=-1)


def raw_logprobs(logits: torch.Tensor, tokens: list[int], params: list[SamplingParams]
                 ) -> tuple[list[float | None], list[TopLogprobs | None]]:
    """logits: [R, vocab]. The chosen tokens' logprobs for rows with `logprobs`, and the top-k for rows
    with `top_logprobs` > 0 (one log_softmax over those rows only)."""
    logprobs: list[float | None] = [None] * len(tokens)
    top: list[TopLogprobs | None] = [None] * len(tokens)
    want = [row for row, p in enumerate(params) if p.logprobs]
    if not want:
        return logprobs, top
    lp = torch.log_softmax(logits[torch.tensor(want)], dim=-1)  # [W, vocab]
    chosen = lp.gather(1, torch.tensor([[tokens[r]] for r in want], device=lp.device)).squeeze(1).tolist()
    k = max(params[r].top_logprobs for r in want)
    values, ids = (lp.topk(k, dim=-1) if k else (None, None))  # [W, k]
    for i, r in enumerate(want):
        logprobs[r] = chosen[i]
        n = params[r].top_logprobs
        if n:
            top[r] = tuple(zip(ids[i, :n].tolist(), values[i, :n].tolist(), strict=True))
    return logprobs, top


CANDIDATE_SIZES = (64, 1024, 4096)  # top-k prefilters tried in turn before the full sort (the plain reference)


def _sample_row(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None, min_p: float = 0.0, typical_p: float = 1.0) -> int:
    """logits: [vocab]. The fast path: the kept tokens found among a bounded top-k of candidates (no
    full-vocabulary sort) and one inverse-CDF draw (no full multinomial); the same distribution as
    `_sample_row_reference`, which it falls back to for warpers, ties at the top-k cut, top-p mass beyond
    the largest prefilter, or a row that is not a distribution."""
    if min_p > 0.0 or typical_p < 1.0:
        return _sample_row_reference(logits, temperature, top_k, top_p, generator, min_p, typical_p)
    kept = kept_candidates(logits, temperature, top_k, top_p)
    if kept is None:
        return _sample_row_reference(logits, temperature, top_k, top_p, generator)
    ids, weights = kept
    return _draw(weights, generator) if ids is None else int(ids[_draw(weights, generator)])


def kept_candidates(logits: torch.Tensor, temperature: float, top_k: int, top_p: float
                    ) -> tuple[torch.Tensor | None, torch.Tensor] | None:
    """logits: [vocab] → (token ids [C], or None for the whole vocabulary; their weights [C], the most
    likely first): what temperature → top-k → top-p keep, as `kept_probs_reference` decides it. None when
    a bounded top-k cannot decide it (the caller takes the reference). Few passes over the vocabulary: one
    top-k of the logits, and for top-p one sum for the normaliser."""
    vocab = logits.shape[-1]
    if top_p >= 1.0 and not 0 < top_k < vocab:
        probs = tempered_probs(logits, temperature)  # [vocab]: the whole distribution is kept
        return (None, probs) if bool(torch.isfinite(probs).all()) else None
    if top_k > 0:
        return _top_k_kept(logits, top_k, temperature, top_p) if top_k <= CANDIDATE_SIZES[-1] \
            and top_k + 1 < vocab else None
    log_norm = None
    for size in CANDIDATE_SIZES:
        if size + 1 >= vocab:
            return None
        values, ids = logits.topk(size + 1)  # [size+1] logits, most likely first (a NaN comes first)
        if log_norm is None:
            log_norm = _log_normaliser(logits, values[0], temperature)
            if not math.isfinite(log_norm):
                return None
        probs = ((values - values[0]) / temperature - log_norm).exp()  # [size+1]: as tempered_probs's
        kept = _top_p_prefix(probs, ids, top_p, complete=False)
        if kept is not None:
            return kept
    return None


def _log_normaliser(logits: torch.Tensor, top: torch.Tensor, temperature: float) -> float:
    """log Σ exp((logits − top) / temperature): softmax's denominator (NaN or inf for a broken row)."""
    return math.log(float(torch.sub(logits, top).div_(temperature).exp_().sum()))


def _top_k_kept(logits: torch.Tensor, top_k: int, temperature: float, top_p: float
                ) -> tuple[torch.Tensor, torch.Tensor] | None:
    values, ids = logits.topk(top_k + 1)  # [k+1]
    if not bool(torch.isfinite(values[0])) or values[top_k] == values[top_k - 1]:
        return None  # a broken row, or a tie at the cut (the reference keeps every tied token)
    probs = torch.softmax((values[:top_k] - values[0]) / temperature, dim=-1)  # over the top-k, as the reference
    return (ids[:top_k], probs) if top_p >= 1.0 else _top_p_prefix(probs, ids[:top_k], top_p, complete=True)


def _top_p_prefix(values: torch.Tensor, ids: torch.Tensor, top_p: float, complete: bool
                  ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """values: [C] sorted descending (the first C of the distribution; `complete`: all of it) → the
    smallest prefix whose mass reaches top_p (at least the first), or None when it may run past C or a
    tie sits at its cut (where the reference's sort order decides)."""
    before = values.cumsum(0) - values  # [C] mass strictly above each candidate
    keep = max(int((before < top_p).sum()), 1)
    if keep == len(values):
        return (ids, values) if complete else None
    if values[keep] == values[keep - 1]:
        return None
    return ids[:keep], values[:keep]


def _draw(weights: torch.Tensor, generator: torch.Generator | None) -> int:
    """An index with probability weights[i] / sum (weights: [C] ≥ 0, some > 0): one uniform number, one
    cumulative sum, one binary search; an index with weight 0 is never drawn."""
    cdf = weights.cumsum(0)  # [C]
    u = torch.rand(1, generator=generator, dtype=cdf.dtype) * cdf[-1]
    index = min(int(torch.searchsorted(cdf, u, right=True)), len(cdf) - 1)
    while weights[index] <= 0:  # u rounded up to the total: the last token with any weight
        index -= 1
    return index


def kept_probs_reference(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                         min_p: float = 0.0, typical_p: float = 1.0) -> torch.Tensor:
    """logits: [vocab] → the kept tokens' probabilities [vocab] (dropped ones 0; not re-normalised after
    top-p): temperature → top-k → top-p by a full sort → min-p / typical-p. The plain reference."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = tempered_probs(logits, temperature)  # [vocab]
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        before = sorted_probs.cumsum(0) - sorted_probs  # mass strictly above each token
        drop = before >= top_p  # keep the smallest prefix whose mass reaches top_p …
        drop[0] = False  # … which always holds the most likely token, however small top_p is
        sorted_probs[drop] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    if min_p > 0.0 or typical_p < 1.0:
        probs = warp_probs(probs, min_p, typical_p)
    return probs


def _sample_row_reference(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                          generator: torch.Generator | None, min_p: float = 0.0, typical_p: float = 1.0) -> int:
    """logits: [vocab]. The plain reference: the kept probabilities, one multinomial over the vocabulary."""
    probs = kept_probs_reference(logits, temperature, top_k, top_p, min_p, typical_p)
    if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
        return int(torch.nan_to_num(logits, nan=float("-inf")).argmax())
    return int(torch.multinomial(probs, 1, generator=generator))
