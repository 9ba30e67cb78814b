"""The sampler's fast path (a bounded top-k of candidates, one inverse-CDF draw) against its plain
reference (full sort, multinomial over the vocabulary): the same kept tokens with the same probabilities,
and draws that follow them."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workers.engine.sampler import (
    _draw,
    _sample_row,
    _sample_row_reference,
    kept_candidates,
    kept_probs_reference,
)

VOCAB = 4096


def as_distribution(kept, vocab: int) -> torch.Tensor:
    ids, weights = kept
    dense = weights if ids is None else torch.zeros(vocab).scatter_(0, ids, weights)
    return dense / dense.sum()


def logits_of(seed: int, scale: float, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("scale", [1.0, 3.0, 8.0])  # flat to peaked: the 64- and 1024-candidate tiers
@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [
    (0.8, 0, 0.95), (1.0, 0, 0.5), (0.3, 0, 0.99), (1.0, 40, 1.0), (0.7, 40, 0.8), (1.2, 0, 1.0), (1.0, 1000, 0.9),
])
def test_fast_path_keeps_what_the_reference_keeps(scale, temperature, top_k, top_p):
    for seed in range(3):
        logits = logits_of(seed, scale)
        kept = kept_candidates(logits, temperature, top_k, top_p)
        reference = kept_probs_reference(logits, temperature, top_k, top_p)
        reference = reference / reference.sum()
        if kept is None:  # undecidable cheaply: the reference is taken, nothing to compare
            continue
        fast = as_distribution(kept, VOCAB)
        assert torch.equal(fast > 0, reference > 0), "same support"
        torch.testing.assert_close(fast, reference, atol=1e-6, rtol=1e-4)


def test_the_candidate_tiers_decide_the_usual_cases():
    """The fast path is really taken (not always the fallback) for peaked and flatter rows."""
    assert kept_candidates(logits_of(0, 8.0), 0.8, 0, 0.95)[0].numel() <= 64
    assert 64 < kept_candidates(logits_of(0, 3.0), 1.0, 0, 0.95)[0].numel() <= 1024
    assert kept_candidates(logits_of(0, 0.1), 1.0, 0, 0.95) is None  # nearly uniform: the full sort


def test_draws_follow_the_kept_distribution():
    weights = torch.tensor([0.0, 0.5, 0.0, 0.3, 0.2])
    gen = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.tensor([_draw(weights, gen) for _ in range(4000)]), minlength=5)
    assert counts[0] == 0 and counts[2] == 0  # a zero weight is never drawn
    torch.testing.assert_close(counts.float() / 4000, weights, atol=0.03, rtol=0)


def test_fast_and_reference_rows_sample_the_same_distribution():
    logits = logits_of(1, 4.0, vocab=512)
    gen_fast, gen_ref = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    fast = torch.bincount(torch.tensor([_sample_row(logits, 1.0, 0, 0.9, gen_fast) for _ in range(3000)]),
                          minlength=512).float() / 3000
    ref = torch.bincount(torch.tensor([_sample_row_reference(logits, 1.0, 0, 0.9, gen_ref) for _ in range(3000)]),
                         minlength=512).float() / 3000
    assert set(fast.nonzero().flatten().tolist()) <= set(
        kept_probs_reference(logits, 1.0, 0, 0.9).nonzero().flatten().tolist())
    assert (fast - ref).abs().sum() < 0.1  # total variation of two 3000-draw histograms


def test_same_generator_seed_same_tokens():
    logits = logits_of(2, 3.0)
    draws = [[_sample_row(logits, 0.9, 0, 0.95, gen) for _ in range(20)]
             for gen in (torch.Generator().manual_seed(7), torch.Generator().manual_seed(7))]
    assert draws[0] == draws[1]


@given(st.integers(0, 10_000), st.floats(1e-30, 1e4), st.integers(0, 80), st.floats(1e-30, 1.0))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_the_fast_path_never_keeps_a_token_the_reference_drops(seed, temperature, top_k, top_p):
    logits = logits_of(seed, 5.0, vocab=300)
    token = _sample_row(logits, temperature, top_k, top_p, torch.Generator().manual_seed(seed))
    assert kept_probs_reference(logits, temperature, top_k, top_p)[token] > 0 or token == int(logits.argmax())
