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


def _sample_row(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None, min_p: float = 0.0, typical_p: float = 1.0) -> int:
    """logits: [vocab]."""
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
    if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
        return int(torch.nan_to_num(logits, nan=float("-inf")).argmax())
    return int(torch.multinomial(probs, 1, generator=generator))
