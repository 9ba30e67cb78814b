"""Medusa heads trained by self-distillation on the frozen base: on the training prompts, the heads guess
the base's own future greedy tokens well enough that a chain accepts > 1 token per step (the untrained heads
barely do), and the output loads as the Medusa kind."""

import pytest

from adapters_store.training_methods import validate_method
from workers.adapters.medusa import MedusaHeads, read_medusa
from workers.engine.types import GenerationRequest, SamplingParams
from workers.model.config import DecoderConfig
from workers.trainer import medusa
from workers.trainer.training import TrainingHooks, TrainingLoop, TrainingSpec, train

PROMPTS = [{"prompt": f"{w} and", "completion": "x"} for w in ("apple", "river", "stone", "cloud")]


@pytest.fixture
def medusa_spec(tmp_path, trainer_base):
    method = validate_method({"type": "medusa", "num_heads": 3, "max_new_tokens": 16, "lr": 2e-2, "epochs": 30,
                              "batch_size": 4})
    return TrainingSpec(method, str(trainer_base), PROMPTS, PROMPTS[:1], 0, tmp_path / "heads", tmp_path / "c")


def test_heads_accept_more_than_one_token_per_step(medusa_spec, trainer_base, make_core):
    setup = medusa.setup(medusa_spec)
    lm_head = setup.modules[0].lm_head
    examples = setup.train_examples
    assert len(examples) == 4 and all(len(e.tokens) - e.start == 16 for e in examples)  # no eos in 16 tokens

    def measured():
        return medusa.acceptance(MedusaHeads(setup.modules[0].as_weights(), lm_head), examples)

    before = measured()
    result = TrainingLoop(medusa_spec, TrainingHooks(checkpoint_every=1000), setup).run()
    after = measured()
    assert before["tokens_per_step"] < 1.3
    assert after["tokens_per_step"] > 2.0 and after["head_accuracy"][0] > 0.8, after
    assert result.kind == "medusa" and result.validation_loss is not None and result.train_loss < 1.0

    heads = read_medusa(result.adapter_dir, DecoderConfig.from_folder(trainer_base))
    assert heads.version == 2 and heads.num_heads == 3 and heads.num_layers == 1
    assert medusa.acceptance(MedusaHeads(heads, lm_head), examples) == after  # what is written is what was trained

    # served: the engine's Medusa verifier accepts several tokens a step and stays lossless (greedy)
    core = make_core(trainer_base, max_batch=1, medusa_policy="always")  # the verifier itself, every step
    core.load_medusa(result.adapter_dir)
    for e in examples[:2]:
        params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
        [events] = core.generate([GenerationRequest(tuple(e.tokens[:e.start].tolist()), params)])
        assert [ev.token_id for ev in events] == e.tokens[e.start:e.start + 12].tolist()
    served = core.speculator.stats[None].as_dict(3)
    assert served["mean_tokens_per_step"] > 1.5, served


def test_head_targets_are_the_continuation_tokens_k_plus_2_ahead():
    import torch

    tokens = torch.tensor([10, 11, 12, 20, 21, 22, 23])  # prompt 3 tokens, continuation 4
    targets = medusa.head_targets(tokens, start=3, num_heads=2, width=8)
    assert targets[0].tolist() == [-100, 20, 21, 22, 23, -100, -100, -100]
    assert targets[1].tolist() == [20, 21, 22, 23, -100, -100, -100, -100]


@pytest.mark.parametrize("kind", ["lora", "s2ft"])
def test_distilling_from_an_adapter_uses_its_continuations(kind, medusa_spec, trainer_base, tmp_path):
    import torch
    from tiny_models import make_lora

    from workers.adapters.s2ft import write_s2ft

    if kind == "lora":
        adapter = make_lora(trainer_base, tmp_path / "lora", r=4, targets=("q_proj", "down_proj"))
    else:
        g = torch.Generator().manual_seed(0)
        adapter = write_s2ft(tmp_path / "s2ft", {(L, "down_proj"): ([3, 70], torch.randn(64, 2, generator=g))
                                                 for L in (0, 1)})
    spec = medusa_spec
    spec.method = {**spec.method, "epochs": 1, "adapter": "my-adapter"}
    from_base = medusa.setup(spec).train_examples
    spec.adapter_path = str(adapter)
    result = train(spec, TrainingHooks())
    from_adapter = medusa.setup(spec).train_examples
    assert any(not a.tokens.equal(b.tokens) for a, b in zip(from_base, from_adapter))
    assert read_medusa(result.adapter_dir, DecoderConfig.from_folder(trainer_base)).num_heads == 3
