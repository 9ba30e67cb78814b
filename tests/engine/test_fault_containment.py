"""One request's failure fails that request alone: extreme sampling values are handled numerically, and
an exception raised by one request's row (sampling, or its part of the batched forward) fails only it.

The property test drives random parameter vectors and adapters through mixed batches on a tiny model,
with some requests poisoned by injected faults, and checks every other request against its own output
when it runs without the poisoned ones."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_models import make_lora, make_tiny_model

import workers.engine.core as core_module
from workers.engine.sampler import _sample_row
from workers.engine.types import GenerationRequest, SamplingParams
from workers.errors import RequestFailedError

POISON_SEED = 666_666  # a request with this seed raises while its token is chosen
POISON_TOKEN = 2  # a prompt holding this token makes any forward it is part of raise


@pytest.mark.parametrize("top_p", [1e-300, 1e-45, 1e-8])
@pytest.mark.parametrize("temperature", [1e-300, 1e-30, 1.0, 3.0])
def test_extreme_sampling_values_keep_the_top_token_or_sample(top_p, temperature):
    logits = torch.randn(256, generator=torch.Generator().manual_seed(0))  # [vocab]
    token = _sample_row(logits, temperature, 0, top_p, torch.Generator().manual_seed(1))
    assert token == int(logits.argmax())  # top_p under the smallest kept probability keeps the top token


@pytest.mark.parametrize("temperature", [1e-300, 1e-30, 1e30, 1e300])
def test_extreme_temperatures_never_raise(temperature):
    logits = torch.randn(256, generator=torch.Generator().manual_seed(0))
    token = _sample_row(logits, temperature, 0, 1.0, torch.Generator().manual_seed(1))
    assert 0 <= token < 256
    if temperature < 1e-20:
        assert token == int(logits.argmax())


def test_nan_logits_fall_back_to_the_argmax_of_the_finite_ones():
    logits = torch.zeros(16)
    logits[3], logits[5] = float("nan"), 4.0
    assert _sample_row(logits, 1.0, 0, 0.9, torch.Generator().manual_seed(0)) == 5


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, smollm2_tokenizer):
    from workers.engine.config import EngineConfig
    from workers.engine.core import EngineCore

    tmp = tmp_path_factory.mktemp("containment")
    folder, _ = make_tiny_model(tmp / "base", "llama")
    core = EngineCore(EngineConfig(model_path=str(folder), max_batch=6, max_seq=96), tokenizer=smollm2_tokenizer)
    for i in range(2):
        core.load_adapter(f"a{i}", make_lora(folder, tmp / f"a{i}", seed=i))
    return core


@pytest.fixture(scope="module")
def poisoned(cluster):
    """Injects the two faults into the module's core (restored afterwards)."""
    real_choose, real_forward = core_module.choose, cluster.runner.forward

    def choose(logits, seq, greedy):
        if seq.request.params.seed == POISON_SEED:
            raise RuntimeError("injected sampling fault")
        return real_choose(logits, seq, greedy)

    def forward(decode, prefill, with_hidden=False):
        if any(POISON_TOKEN in chunk.tokens for chunk in prefill):
            raise RuntimeError("injected forward fault")
        return real_forward(decode, prefill, with_hidden=with_hidden)

    core_module.choose, cluster.runner.forward = choose, forward
    yield cluster
    core_module.choose, cluster.runner.forward = real_choose, real_forward


def run(core, requests: list[GenerationRequest]) -> dict[str, list[int] | Exception]:
    """Runs the batch to the end: token ids per request id, or the error that failed it."""
    outcome: dict[str, list[int] | Exception] = {}
    for r in requests:
        core.add_request(r)
        outcome[r.request_id] = []
    for _ in range(500):
        if not core.has_work():
            break
        for seq, event in core.step():
            outcome[seq.request.request_id].append(event.token_id)  # type: ignore[union-attr]
        for seq, error in core.take_failures():
            outcome[seq.request.request_id] = error
    assert not core.has_work(), "the batch did not finish"
    return outcome


params = st.builds(
    SamplingParams,
    max_tokens=st.integers(1, 6),
    temperature=st.sampled_from([0.0, 1e-300, 1e-8, 0.7, 1.0, 1e30]),
    top_p=st.sampled_from([1e-300, 1e-45, 0.01, 0.5, 1.0]),
    top_k=st.sampled_from([0, 1, 3, 255, 10_000]),
    seed=st.sampled_from([None, 1, 2, 3]),
    stop=st.sampled_from([(), ("e",), ("a", "the")]),
    ignore_eos=st.booleans(),
    logprobs=st.booleans(),
)
request = st.tuples(
    st.lists(st.integers(3, 255), min_size=1, max_size=12),  # prompt ids (no poison token)
    params,
    st.sampled_from([None, "a0", "a1"]),
    st.sampled_from([None, "sampling", "forward"]),  # the fault this request carries
)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(batch=st.lists(request, min_size=2, max_size=6))
def test_no_request_fails_because_of_another(poisoned, batch):
    requests, healthy = [], []
    for i, (prompt, p, adapter, fault) in enumerate(batch):
        if fault == "sampling":
            p = SamplingParams(**{**p.__dict__, "seed": POISON_SEED})
        elif fault == "forward":
            prompt = [*prompt, POISON_TOKEN]
        elif p.seed is None and p.temperature > 0 and p.top_k != 1:
            p = SamplingParams(**{**p.__dict__, "seed": i})  # reproducible, to compare with the run alone
        r = GenerationRequest(tuple(prompt), p, adapter, f"r{i}")
        requests.append(r)
        if fault is None:
            healthy.append(r)
    together = run(poisoned, requests)
    for r, (_, _, _, fault) in zip(requests, batch, strict=True):
        if fault is not None:
            assert isinstance(together[r.request_id], RequestFailedError), r
    alone = run(poisoned, healthy) if healthy else {}
    for r in healthy:
        out = together[r.request_id]
        assert isinstance(out, list), f"{r} failed beside a faulty request: {out!r}"
        assert 1 <= len(out) <= r.params.max_tokens
        assert out == alone[r.request_id]
    assert poisoned.runner.kv.free_slots == poisoned.cfg.max_batch  # failed requests gave their slots back
