"""Per-row logits processors and warpers on top of the sampler's temperature → top-k → top-p:

- processors change a row's logits before temperature, for greedy and sampled rows alike, in this order:
  `logit_bias` (added to the named tokens' logits), `repetition_penalty` (CTRL, as transformers'
  RepetitionPenaltyLogitsProcessor: every token seen in prompt + output has its logit divided by the
  penalty if positive, multiplied if negative), `presence_penalty` / `frequency_penalty` (OpenAI: minus
  presence for each token generated so far, minus frequency × its count in the output);
- warpers narrow a sampled row's distribution after top-p: `min_p` (transformers' MinPLogitsWarper) and
  `typical_p` (TypicalLogitsWarper).

Only rows that use one of them pay anything: `process` returns the logits untouched (no copy) when no row
does. Rows that use them decode plainly (no Medusa speculation, whose verification would not apply them).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from workers.engine.types import SamplingParams


def uses_processors(p: SamplingParams) -> bool:
    return bool(p.logit_bias) or p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 \
        or p.frequency_penalty != 0.0


def uses_warpers(p: SamplingParams) -> bool:
    return p.min_p > 0.0 or p.typical_p < 1.0


def decodes_plainly(p: SamplingParams) -> bool:
    """A row that must not verify a speculative tree: its tokens depend on transforms (or report top-k
    logprobs) that the tree verification does not compute."""
    return uses_processors(p) or uses_warpers(p) or p.top_logprobs > 0 or p.json_schema is not None


def process(logits: torch.Tensor, rows: list[tuple[SamplingParams, Seq[int], Seq[int]]]) -> torch.Tensor:
    """logits: [R, vocab]; rows: (params, prompt ids, output ids) per row. Returns logits with each row's
    processors applied (the same tensor when no row uses one)."""
    wanted = [r for r, (p, _, _) in enumerate(rows) if uses_processors(p)]
    if not wanted:
        return logits
    out = logits.clone()
    for r in wanted:
        p, prompt, output = rows[r]
        out[r] = process_row(out[r], p, prompt, output)
    return out


def process_row(logits: torch.Tensor, p: SamplingParams, prompt: Seq[int], output: Seq[int]) -> torch.Tensor:
    """logits: [vocab] (modified in place and returned)."""
    device = logits.device
    if p.logit_bias:
        ids = torch.tensor([t for t, _ in p.logit_bias], device=device)
        logits.index_add_(0, ids, torch.tensor([b for _, b in p.logit_bias], dtype=logits.dtype, device=device))
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt) | set(output)), dtype=torch.long, device=device)
        score = logits[seen]
        logits[seen] = torch.where(score < 0, score * p.repetition_penalty, score / p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and output:
        counts = torch.bincount(torch.tensor(output, device=device), minlength=logits.shape[-1]).to(logits.dtype)
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def warp_probs(probs: torch.Tensor, min_p: float, typical_p: float) -> torch.Tensor:
    """probs: [vocab], non-negative, not necessarily normalised (zeros: tokens already dropped). Returns
    them with min-p and typical-p applied (dropped tokens zeroed; the most likely token always stays)."""
    if min_p > 0.0:
        probs = probs.masked_fill(probs < min_p * probs.max(), 0.0)
    if typical_p < 1.0:
        dist = probs / probs.sum()
        logp = dist.log()  # -inf where dropped
        entropy = -(dist * logp).nansum()
        shifted = (-logp - entropy).abs()  # |surprise - entropy|; inf where dropped
        order = torch.argsort(shifted, stable=True)
        mass = dist[order].cumsum(0)
        last = min(int((mass < typical_p).sum()), probs.shape[-1] - 1)
        drop_sorted = shifted[order] > shifted[order[last]]
        drop_sorted[0] = False
        drop = torch.zeros_like(drop_sorted).scatter_(0, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
    return probs
