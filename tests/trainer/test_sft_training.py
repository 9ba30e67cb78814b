"""LoRA and S²FT jobs learn a small deterministic mapping on a tiny model, and the engine then serves the
adapter with the learnt answers; the trainable state is only the adapter's tensors."""

import pytest
from trainer_data import COLOURS, WORDS

from adapters_store.training_methods import validate_method
from workers.engine.types import GenerationRequest, SamplingParams
from workers.trainer.training import StepReport, TrainingHooks, TrainingSpec, train

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = {
    "lora": {"type": "lora", "rank": 8, "alpha": 16, "targets": ALL, "lr": 3e-2, "epochs": 60, "batch_size": 8},
    "s2ft": {"type": "s2ft", "head_ratio": 0.25, "channel_ratio": 0.05, "lr": 1e-2, "epochs": 60,
             "batch_size": 8},
}


def served_answers(core, tokenizer, adapter):
    params = SamplingParams(max_tokens=4, temperature=0)
    requests = [GenerationRequest(tuple(tokenizer(f"{w} ->")["input_ids"]), params, adapter=adapter) for w in WORDS]
    return ["".join(e.text for e in events) for events in core.generate(requests)]


@pytest.mark.parametrize("kind", ["lora", "s2ft"])
def test_job_learns_the_mapping_and_the_engine_serves_it(kind, tmp_path, trainer_base, mapping_records, make_core,
                                                         smollm2_tokenizer):
    steps: list[StepReport] = []
    spec = TrainingSpec(method=validate_method(METHODS[kind]), base_model_path=str(trainer_base),
                        train_records=mapping_records, valid_records=mapping_records[:3], seed=0,
                        output_dir=tmp_path / "out", checkpoint_dir=tmp_path / "ckpt")
    result = train(spec, TrainingHooks(on_step=steps.append, on_checkpoint=lambda r: None,
                                       should_stop=lambda: False, checkpoint_every=25))
    assert result.kind == kind and result.steps == 60 == len(steps) and steps[-1].total_steps == 60
    assert steps[0].loss > 2.0 and result.train_loss < 0.05 and result.validation_loss < 0.05
    assert all(s.tokens_per_s > 0 for s in steps)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step-000025", "step-000050"]

    core = make_core(trainer_base, max_batch=8, max_loras=1, max_rank=8)
    core.load_adapter("tuned", result.adapter_dir)
    assert served_answers(core, smollm2_tokenizer, "tuned") == [f" {c}" for c in COLOURS]
    assert served_answers(core, smollm2_tokenizer, None) != [f" {c}" for c in COLOURS]  # the base does not know


def test_s2ft_trains_only_the_selected_submatrices(tmp_path, trainer_base, mapping_records):
    from workers.adapters.s2ft import read_s2ft
    from workers.model.config import DecoderConfig
    from workers.trainer import s2ft

    method = validate_method({"type": "s2ft", "head_ratio": 0.5, "channel_ratio": 0.1, "epochs": 1})
    spec = TrainingSpec(method, str(trainer_base), mapping_records, None, 3, tmp_path / "out", tmp_path / "c")
    setup = s2ft.setup(spec)
    shapes = sorted((name, tuple(p.shape)) for name, p in setup.params.items())
    # tiny base: 2 layers, 4 heads of 16, intermediate 128 → 2 heads ([64, 32]) and 13 channels ([64, 13])
    assert shapes == [(f"model.layers.{L}.{m}", s) for L in (0, 1)
                      for m, s in (("mlp.down_proj.delta", (64, 13)), ("self_attn.o_proj.delta", (64, 32)))]
    model = setup.modules[0]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        n for n, _ in model.named_parameters() if n.endswith(".delta")]
    _, weights = read_s2ft(setup.save(tmp_path / "s"), DecoderConfig.from_folder(trainer_base))
    assert weights.num_params == sum(p.numel() for p in setup.params.values())
    other = s2ft.select_units(model.config, method, 2, seed=4)
    assert other != s2ft.select_units(model.config, method, 2, seed=3)  # the seed picks the units
