"""Token selection per row (the caller takes one argmax over all rows for the greedy ones); sampled rows
each with their own parameters and RNG (temperature → top-k → top-p → multinomial).

Numerically safe for any accepted parameters: logits are shifted by their maximum before the temperature
divides them (so no temperature gives inf/inf), top-p always keeps the most likely token (a `top_p` below
the smallest probability, even one that rounds to 0 in fp32, keeps exactly that one), and a row whose
probabilities are not a distribution (NaN logits) falls back to the argmax of its finite logits."""

from __future__ import annotations

import torch

from workers.engine.sequence import Sequence


def choose(logits: torch.Tensor, seq: Sequence, greedy: int) -> tuple[int, float | None]:
    """logits: [vocab] fp32 of one row whose argmax is `greedy` → the row's token under its own parameters
    and RNG, and its log-probability when the request asked for it."""
    p = seq.request.params
    token = greedy
    if p.temperature > 0 and p.top_k != 1:
        token = _sample_row(logits, p.temperature, p.top_k, p.top_p, seq.generator)
    logprob = float(torch.log_softmax(logits, dim=-1)[token]) if p.logprobs else None
    return token, logprob


def tempered_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits: [..., vocab] → softmax(logits / temperature) without overflow for any temperature > 0:
    the maximum becomes 0 first, so a tiny temperature sends the others to -inf, never inf/inf."""
    shifted = logits - logits.amax(dim=-1, keepdim=True)  # [..., vocab], ≤ 0 (NaN rows stay NaN)
    return torch.softmax(shifted / temperature, dim=-1)


def _sample_row(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None) -> int:
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
    if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
        return int(torch.nan_to_num(logits, nan=float("-inf")).argmax())
    return int(torch.multinomial(probs, 1, generator=generator))
