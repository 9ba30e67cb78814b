"""Raw top-k logprobs against transformers + peft in a mixed-adapter batch; logits processors and warpers
against transformers' own (RepetitionPenalty, MinP, Typical, ...) or the OpenAI definition; n completions
sharing one prefill."""

import pytest
import torch
from tiny_models import make_lora, make_tiny_model

from workers.engine.logits_processors import process_row, warp_probs
from workers.engine.sampler import _sample_row
from workers.engine.types import GenerationRequest, SamplingParams
from workers.errors import InvalidRequestError


@pytest.fixture(scope="module")
def model_and_adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampling")
    folder, _ = make_tiny_model(root / "base", "llama")
    adapters = {"a": make_lora(folder, root / "a", r=4, seed=1, targets=("q_proj", "v_proj", "down_proj")),
                "b": make_lora(folder, root / "b", r=2, seed=2, targets=("k_proj", "o_proj", "up_proj"))}
    return folder, adapters


@pytest.fixture(scope="module")
def peft_model(model_and_adapters):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder, adapters = model_and_adapters
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), adapters["a"], adapter_name="a")
    model.load_adapter(adapters["b"], adapter_name="b")
    return model.eval()


def ref_logits(model, ids: list[int], adapter: str | None) -> torch.Tensor:
    """The logits after `ids` ([vocab]) with `adapter` (None: the base)."""
    with torch.no_grad():
        x = torch.tensor([ids])
        if adapter is None:
            with model.disable_adapter():
                return model(x).logits[0, -1]
        model.set_adapter(adapter)
        return model(x).logits[0, -1]


ROWS = [  # (adapter, params): greedy and sampled rows, with and without processors, one row without logprobs
    ("a", SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=True, top_logprobs=5)),
    (None, SamplingParams(max_tokens=5, temperature=0.9, top_p=0.8, seed=3, ignore_eos=True, logprobs=True,
                          top_logprobs=20, repetition_penalty=1.3)),
    ("b", SamplingParams(max_tokens=5, temperature=1.2, top_k=8, seed=4, ignore_eos=True, logprobs=True,
                         top_logprobs=1, logit_bias=((7, 5.0),))),
    ("a", SamplingParams(max_tokens=5, temperature=0.7, seed=5, ignore_eos=True)),
    ("b", SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=True)),
]


def test_top_logprobs_are_the_models_raw_top_k_in_a_mixed_adapter_batch(model_and_adapters, peft_model, make_core):
    folder, adapters = model_and_adapters
    core = make_core(folder, max_batch=8, max_loras=2, max_rank=4)
    for name, path in adapters.items():
        core.load_adapter(name, path)
    prompts = [[(13 * i + j) % 250 + 3 for j in range(4 + i)] for i in range(len(ROWS))]
    outs = core.generate([GenerationRequest(tuple(p), params, adapter=a)
                          for p, (a, params) in zip(prompts, ROWS, strict=True)])
    for prompt, (adapter, params), events in zip(prompts, ROWS, outs, strict=True):
        assert len(events) == 5
        if not params.logprobs:
            assert all(e.logprob is None and e.top_logprobs is None for e in events)
            continue
        for t, ev in enumerate(events):
            ref = torch.log_softmax(ref_logits(peft_model, prompt + [e.token_id for e in events[:t]], adapter), -1)
            assert abs(ev.logprob - float(ref[ev.token_id])) <= 1e-4, (adapter, t)
            if not params.top_logprobs:
                assert ev.top_logprobs is None
                continue
            values, ids = ref.topk(params.top_logprobs)
            assert [i for i, _ in ev.top_logprobs] == ids.tolist(), (adapter, t)
            assert max(abs(lp - v) for (_, lp), v in zip(ev.top_logprobs, values.tolist(), strict=True)) <= 1e-4


def hf_chain(scores: torch.Tensor, temperature, top_k, top_p, min_p, typical_p) -> torch.Tensor:
    from transformers import (
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
        TypicalLogitsWarper,
    )

    warpers = [TemperatureLogitsWarper(temperature)]
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1:
        warpers.append(TopPLogitsWarper(top_p))
    if min_p:
        warpers.append(MinPLogitsWarper(min_p))
    if typical_p < 1:
        warpers.append(TypicalLogitsWarper(typical_p))
    s = scores[None].clone()
    for w in warpers:
        s = w(None, s)
    return torch.softmax(s[0], -1)


@pytest.mark.parametrize("min_p,typical_p", [(0.05, 1.0), (0.3, 1.0), (0.0, 0.5), (0.0, 0.9), (0.02, 0.7)])
def test_min_p_and_typical_p_equal_transformers_warpers(min_p, typical_p):
    g = torch.Generator().manual_seed(int(100 * min_p + 10 * typical_p))
    for _ in range(5):
        logits = torch.randn(300, generator=g) * 3
        ref = hf_chain(logits, 1.0, 0, 1.0, min_p, typical_p)
        ours = warp_probs(torch.softmax(logits, -1), min_p, typical_p)
        torch.testing.assert_close(ours / ours.sum(), ref, rtol=0, atol=1e-6)
        # the whole sampling chain (temperature, top-k, top-p, then the warpers) draws only inside the support
        ref = hf_chain(logits, 0.8, 50, 0.95, min_p, typical_p)
        draws = {_sample_row(logits, 0.8, 50, 0.95, g, min_p, typical_p) for _ in range(200)}
        assert all(ref[t] > 0 for t in draws)
        assert len(draws) > 1 or int((ref > 0).sum()) == 1


def test_repetition_penalty_and_logit_bias_against_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor, SequenceBiasLogitsProcessor

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(256, generator=g) * 2
    prompt, output = [5, 9, 9, 200], [17, 5, 33]
    for penalty in (0.7, 1.3, 2.0):
        ours = process_row(logits.clone(), SamplingParams(repetition_penalty=penalty), prompt, output)
        ref = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([prompt + output]), logits[None].clone())[0]
        torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    bias = ((3, 4.5), (100, -100.0), (255, 0.25))
    ours = process_row(logits.clone(), SamplingParams(logit_bias=bias), prompt, output)
    biaser = SequenceBiasLogitsProcessor({(t,): b for t, b in bias})
    ref = biaser(torch.tensor([prompt + output]), logits[None].clone())[0]
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


def test_presence_and_frequency_penalties_follow_openai_definition():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(64, generator=g)
    prompt, output = [1, 2, 3], [4, 4, 4, 7, 2]
    ours = process_row(logits.clone(), SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), prompt, output)
    ref = logits.clone()
    for token in set(output):  # mu[j] -= c[j] * alpha_frequency + float(c[j] > 0) * alpha_presence
        ref[token] -= output.count(token) * 0.25 + 0.5
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    assert ours[1] == logits[1] and ours[3] == logits[3]  # prompt tokens are not penalised (OpenAI)


def test_greedy_with_repetition_penalty_equals_transformers_generate(model_and_adapters, make_core):
    from transformers import AutoModelForCausalLM

    folder, _ = model_and_adapters
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    hf.generation_config.eos_token_id = None
    core = make_core(folder)
    prompts = [[9, 9, 40, 41, 9], [100, 3, 3, 3]]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, repetition_penalty=1.8)
    outs = core.generate([GenerationRequest(tuple(p), params) for p in prompts])
    plain = core.generate([GenerationRequest(tuple(p), SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
                           for p in prompts])
    for p, events, unpenalised in zip(prompts, outs, plain, strict=True):
        ids = torch.tensor([p])
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                          repetition_penalty=1.8, pad_token_id=0)[0, len(p):].tolist()
        assert [e.token_id for e in events] == ref
        assert ref != [e.token_id for e in unpenalised]  # the penalty changed something


def test_logit_bias_and_stop_token_ids_in_generation(model_and_adapters, make_core):
    folder, _ = model_and_adapters
    core = make_core(folder)
    forced = SamplingParams(max_tokens=6, temperature=1.0, seed=1, ignore_eos=True, logit_bias=((42, 100.0),))
    banned = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, logit_bias=((0, -100.0),))
    stop = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    first = core.generate([GenerationRequest((5, 6, 7), stop)])[0]
    stop_at = first[3].token_id
    out = core.generate([GenerationRequest((5, 6, 7), forced), GenerationRequest((5, 6, 7), banned),
                         GenerationRequest((5, 6, 7), SamplingParams(max_tokens=30, temperature=0, ignore_eos=True,
                                                                     stop_token_ids=(stop_at,)))])
    assert [e.token_id for e in out[0]] == [42] * 6
    assert 0 not in [e.token_id for e in out[1]]
    stopped = [e.token_id for e in out[2]]
    assert stopped[-1] == stop_at and stop_at not in stopped[:-1] and out[2][-1].finish_reason == "stop"


def test_n_completions_share_one_prefill(model_and_adapters, make_core):
    folder, adapters = model_and_adapters
    core = make_core(folder, max_batch=6, max_loras=2, max_rank=4)
    core.load_adapter("a", adapters["a"])
    prefill_tokens = []
    forward = core.runner.forward

    def counting(decode, prefill, **kw):
        prefill_tokens.append(sum(len(chunk.tokens) for chunk in prefill))
        return forward(decode, prefill, **kw)

    core.runner.forward = counting
    prompt = tuple(range(10, 30))
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=7, ignore_eos=True, n=4, logprobs=True)
    events = core.generate([GenerationRequest(prompt, params, adapter="a")])[0]
    assert sum(prefill_tokens) == len(prompt)  # one prefill for the four completions
    by_choice = {c: [e.token_id for e in events if e.choice == c] for c in range(4)}
    assert all(len(v) == 8 for v in by_choice.values())
    assert len({tuple(v) for v in by_choice.values()}) > 1  # independent samples
    # each choice equals a single request that starts from the same prompt with the choice's seed
    for c in range(4):
        single = core.generate([GenerationRequest(prompt, SamplingParams(max_tokens=8, temperature=1.0, seed=7 + c,
                                                                         ignore_eos=True), adapter="a")])[0]
        assert [e.token_id for e in single] == by_choice[c]
    fused = {core.adapters.fused: 1} if core.adapters.fused else {}  # the fused adapter stays pinned while fused
    assert core.runner.kv.free_slots == 6 and not core.adapters.refs and dict(core.adapters.pins) == fused


def test_n_completions_cancelled_before_the_fork_free_every_slot(model_and_adapters, make_core):
    folder, adapters = model_and_adapters
    core = make_core(folder, max_batch=4, max_loras=2, max_rank=4)
    core.load_adapter("a", adapters["a"])
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, n=3)
    core.add_request(GenerationRequest(tuple(range(3, 40)), params, adapter="a", request_id="r1"))
    core.abort("r1")
    assert core.runner.kv.free_slots == 4 and not core.adapters.pins and not core.has_work()
    core.add_request(GenerationRequest(tuple(range(3, 40)), params, adapter="a", request_id="r2"))
    core.scheduler.schedule()  # admitted: 3 slots reserved, prompt not cached yet
    assert core.runner.kv.free_slots == 1
    core.abort("r2")
    assert core.runner.kv.free_slots == 4 and not core.adapters.pins and not core.adapters.refs


@pytest.mark.parametrize("params,field", [
    (SamplingParams(top_logprobs=21, logprobs=True), "top_logprobs"),
    (SamplingParams(n=9), "n"),
    (SamplingParams(logit_bias=((256, 1.0),)), "logit_bias"),
    (SamplingParams(stop_token_ids=(-1,)), "stop_token_ids"),
    (SamplingParams(repetition_penalty=0.0), "repetition_penalty"),
    (SamplingParams(min_p=1.5), "min_p"),
    (SamplingParams(typical_p=0.0), "typical_p"),
])
def test_bad_sampling_values_name_the_field(model_and_adapters, make_core, params, field):
    core = make_core(model_and_adapters[0])
    with pytest.raises(InvalidRequestError) as err:
        core.add_request(GenerationRequest((1, 2, 3), params))
    assert err.value.param == field
    assert not core.has_work()
