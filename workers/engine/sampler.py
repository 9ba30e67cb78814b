"""Token selection per row: greedy rows in one argmax; sampled rows each with their own parameters and
RNG (temperature → top-k → top-p → multinomial)."""

from __future__ import annotations

import torch

from workers.engine.sequence import Sequence


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[float | None]]:
    """logits: [R, vocab] fp32, one row per sequence. Returns chosen tokens and their logprobs."""
    tokens = logits.argmax(dim=-1).tolist()  # greedy for every row, overwritten for sampled rows
    for row, seq in enumerate(seqs):
        p = seq.request.params
        if p.temperature > 0 and p.top_k != 1:
            tokens[row] = _sample_row(logits[row], p.temperature, p.top_k, p.top_p, seq.generator)
    logprobs: list[float | None] = [None] * len(seqs)
    want = [row for row, seq in enumerate(seqs) if seq.request.params.logprobs]
    if want:
        rows = torch.tensor(want)
        lp = torch.log_softmax(logits[rows], dim=-1).gather(1, torch.tensor([[tokens[r]] for r in want]))
        for r, value in zip(want, lp.squeeze(1).tolist(), strict=True):
            logprobs[r] = value
    return tokens, logprobs


def _sample_row(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None) -> int:
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
    return int(torch.multinomial(probs, 1, generator=generator))
