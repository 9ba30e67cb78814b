"""Greedy generations against transformers' generate, continuous batching, sampling, stops, limits."""

import asyncio

import pytest
import torch
from tiny_models import make_tiny_model

from workers.engine.config import EngineConfig
from workers.engine.engine import Engine
from workers.engine.types import GenerationRequest, SamplingParams
from workers.errors import InvalidRequestError, PromptTooLongError

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    hf.generation_config.eos_token_id = None  # like ignore_eos: always n tokens, eos never suppressed
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (int(torch.randint(3, 20, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def tokens(events) -> list[int]:
    return [e.token_id for e in events]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_batched_greedy_equals_transformers(tmp_path, make_core, arch):
    folder, hf = make_tiny_model(tmp_path, arch)
    core = make_core(folder)
    ps = prompts(4)
    outs = core.generate([GenerationRequest(tuple(p), GREEDY) for p in ps])
    for p, events in zip(ps, outs, strict=True):
        assert tokens(events) == hf_greedy(hf, p, 12)
        assert events[-1].finish_reason == "length" and len(events) == 12


def test_requests_joining_mid_flight_and_chunked_prefill(tmp_path, make_core):
    folder, hf = make_tiny_model(tmp_path, "llama")
    core = make_core(folder, max_batch=3, prefill_chunk=5, max_tokens_per_step=8)
    ps = prompts(6, seed=3) + [list(range(10, 60))]  # the last prompt spans many chunks
    seqs, out = {}, {}
    for i, p in enumerate(ps[:2]):
        seqs[i] = core.add_request(GenerationRequest(tuple(p), GREEDY))
    pending = list(enumerate(ps))[2:]
    steps = 0
    while core.has_work() or pending:
        if pending and steps % 3 == 2:  # join while others are decoding
            i, p = pending.pop(0)
            seqs[i] = core.add_request(GenerationRequest(tuple(p), GREEDY))
        for seq, event in core.step():
            out.setdefault(id(seq), []).append(event.token_id)
        steps += 1
        assert len(core.scheduler.running) <= 3
    for i, p in enumerate(ps):
        assert out[id(seqs[i])] == hf_greedy(hf, p, 12), f"prompt {i}"
    assert core.runner.kv.free_slots == 3


def test_smollm2_batched_greedy_equals_transformers(smollm2_path, smollm2_tokenizer):
    from transformers import AutoModelForCausalLM

    from workers.engine.core import EngineCore

    hf = AutoModelForCausalLM.from_pretrained(smollm2_path).eval()
    core = EngineCore(EngineConfig(model_path=str(smollm2_path), max_batch=4, max_seq=256),
                      tokenizer=smollm2_tokenizer)
    texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far"]
    ps = [smollm2_tokenizer(t).input_ids for t in texts]
    outs = core.generate([GenerationRequest(tuple(p), SamplingParams(max_tokens=16, temperature=0,
                                                                     ignore_eos=True)) for p in ps])
    for p, events in zip(ps, outs, strict=True):
        assert tokens(events) == hf_greedy(hf, p, 16)
        assert "".join(e.text for e in events) == smollm2_tokenizer.decode(tokens(events))


def test_seeded_sampling_is_reproducible_under_any_batching(tmp_path, make_core):
    folder, _ = make_tiny_model(tmp_path, "llama")
    core = make_core(folder)
    p = tuple(prompts(1)[0])
    params = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=7, ignore_eos=True)
    alone = tokens(core.generate([GenerationRequest(p, params)])[0])
    batched = core.generate([GenerationRequest(p, params), GenerationRequest(tuple(prompts(1, 9)[0]), params),
                             GenerationRequest(p, SamplingParams(**{**params.__dict__, "seed": 8}))])
    assert tokens(batched[0]) == alone
    assert tokens(batched[2]) != alone
    top1 = SamplingParams(max_tokens=10, temperature=0.8, top_k=1, seed=1, ignore_eos=True)
    assert tokens(core.generate([GenerationRequest(p, top1)])[0]) == tokens(
        core.generate([GenerationRequest(p, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))])[0])


def test_stop_strings_cut_exactly_and_stop_token_ids(tmp_path, make_core, tiny_tokenizer):
    folder, _ = make_tiny_model(tmp_path, "llama")
    core = make_core(folder)
    p = tuple(prompts(1, 5)[0])
    full = core.generate([GenerationRequest(p, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))])[0]
    text = "".join(e.text for e in full)
    assert text == tiny_tokenizer.decode(tokens(full))
    stop = text[7:10]
    assert stop.strip(), text
    cut = core.generate([GenerationRequest(p, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True,
                                                             stop=(stop, "never-seen")))])[0]
    assert "".join(e.text for e in cut) == text[:text.index(stop)]
    assert cut[-1].finish_reason == "stop"
    stop_id = full[4].token_id
    by_id = core.generate([GenerationRequest(p, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True,
                                                               stop_token_ids=(stop_id,)))])[0]
    assert tokens(by_id) == tokens(full)[:tokens(full).index(stop_id) + 1]
    assert by_id[-1].finish_reason == "stop"


def test_logprobs_are_those_of_the_model(tmp_path, make_core):
    folder, hf = make_tiny_model(tmp_path, "llama")
    core = make_core(folder)
    p = prompts(1, 2)[0]
    events = core.generate([GenerationRequest(tuple(p), SamplingParams(max_tokens=4, temperature=0,
                                                                       ignore_eos=True, logprobs=True))])[0]
    ids = torch.tensor([p + tokens(events)])
    with torch.no_grad():
        lp = torch.log_softmax(hf(ids).logits[0], -1)
    for i, e in enumerate(events):
        assert e.logprob == pytest.approx(lp[len(p) - 1 + i, e.token_id].item(), abs=1e-4)


def test_bad_requests_are_refused_and_change_nothing(tmp_path, make_core):
    folder, _ = make_tiny_model(tmp_path, "llama")
    core = make_core(folder, max_seq=32)
    bad = [
        (GenerationRequest(tuple(range(30)), SamplingParams(max_tokens=8)), PromptTooLongError),
        (GenerationRequest((), SamplingParams()), InvalidRequestError),
        (GenerationRequest((1, 2), SamplingParams(max_tokens=0)), InvalidRequestError),
        (GenerationRequest((1, 999999), SamplingParams()), InvalidRequestError),
        (GenerationRequest((1, 2), SamplingParams(top_p=0)), InvalidRequestError),
    ]
    for request, error in bad:
        with pytest.raises(error):
            core.add_request(request)
    assert not core.has_work() and core.runner.kv.free_slots == 4


async def test_async_streams_and_cancellation_frees_the_slot(tmp_path, tiny_tokenizer, device):
    folder, _ = make_tiny_model(tmp_path, "llama")
    engine = Engine(EngineConfig(model_path=str(folder), max_batch=2, max_seq=128, device=str(device), dtype="float32"),
                    tokenizer=tiny_tokenizer)
    engine.start()
    try:
        long = GenerationRequest((5, 6, 7), SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))
        got = []
        async for event in engine.generate(long):
            got.append(event)
            if len(got) == 3:
                break
        for _ in range(100):
            if engine.stats()["running"] == 0:
                break
            await asyncio.sleep(0.02)
        stats = engine.stats()
        assert (stats["running"], stats["waiting"], stats["max_batch"]) == (0, 0, 2)
        assert engine.core.runner.kv.free_slots == 2
        short = GenerationRequest((5, 6, 7), SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
        results = await asyncio.gather(*[_collect(engine, short) for _ in range(3)])  # 3 > max_batch
        assert all(len(r) == 5 and r[-1].finish_reason == "length" for r in results)
        assert tokens(results[0])[:3] == tokens(got)
        with pytest.raises(PromptTooLongError):
            await _collect(engine, GenerationRequest(tuple(range(120)), SamplingParams(max_tokens=20)))
    finally:
        engine.stop()


async def _collect(engine, request):
    return [e async for e in engine.generate(request)]
