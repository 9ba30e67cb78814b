"""Token selection per row: greedy rows in one argmax; sampled rows each with their own parameters and
RNG (processors → temperature → top-k → top-p → min-p / typical-p → multinomial; see logits_processors).
Logprobs are the model's raw ones (log_softmax of the row's logits before any processor or warper, as
vLLM reports them), computed only for the rows that ask."""

from __future__ import annotations

import torch

from workers.engine.logits_processors import process, warp_probs
from workers.engine.sequence import Sequence
from workers.engine.structured import constrain
from workers.engine.types import SamplingParams

TopLogprobs = tuple[tuple[int, float], ...]


def sample(logits: torch.Tensor, seqs: list[Sequence]
           ) -> tuple[list[int], list[float | None], list[TopLogprobs | None]]:
    """logits: [R, vocab] fp32, one row per sequence. Returns chosen tokens, their (raw) logprobs and each
    row's top-`top_logprobs` (token, raw logprob) pairs, most likely first."""
    raw = logits
    logits = process(logits, [(s.request.params, s.prompt, s.output) for s in seqs])
    logits = constrain(logits, [s.matcher for s in seqs])  # structured output: grammar masks per row
    tokens = logits.argmax(dim=-1).tolist()  # greedy for every row, overwritten for sampled rows
    for row, seq in enumerate(seqs):
        p = seq.request.params
        if p.temperature > 0 and p.top_k != 1:
            tokens[row] = _sample_row(logits[row], p.temperature, p.top_k, p.top_p, seq.generator,
                                       p.min_p, p.typical_p)
    logprobs, top = raw_logprobs(raw, tokens, [s.request.params for s in seqs])
    return tokens, logprobs, top


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
    scaled = logits / temperature
    if 0 < top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        before = sorted_probs.cumsum(0) - sorted_probs  # mass strictly above each token
        sorted_probs[before >= top_p] = 0  # keep the smallest prefix whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    if min_p > 0.0 or typical_p < 1.0:
        probs = warp_probs(probs, min_p, typical_p)
    return int(torch.multinomial(probs, 1, generator=generator))
