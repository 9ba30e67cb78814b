"""Data-parallel training (`adapterd trainer --nproc N`, workers/trainer/distributed.py) on CPU with gloo:
2 processes reach the final loss of 1 process at the same global batch and seed (within 2 %), the hooks and
checkpoints happen once (rank 0), and the adapter is written once."""

import pytest

from adapters_store.training_methods import validate_method
from workers.trainer import distributed
from workers.trainer.training import TrainingHooks, TrainingSpec, train

pytestmark = pytest.mark.timeout(240)
METHOD = {"type": "lora", "rank": 4, "epochs": 3, "batch_size": 4, "learning_rate_multiplier": 50,
          "targets": ["q_proj", "v_proj", "down_proj"]}


def run(tmp_path, base, records, nproc: int):
    steps, checkpoints = [], []
    spec = TrainingSpec(validate_method(METHOD), str(base), records, records[:3], seed=5,
                        output_dir=tmp_path / f"out-{nproc}", checkpoint_dir=tmp_path / f"ckpt-{nproc}")
    hooks = TrainingHooks(on_step=steps.append, on_checkpoint=checkpoints.append, checkpoint_every=4)
    return spec, hooks, steps, checkpoints


def test_two_processes_match_one_at_the_same_global_batch_and_seed(tmp_path, trainer_base, mapping_records):
    records = mapping_records + mapping_records[:2]  # 10 records: the last batch of each epoch has 2
    results = {}
    for nproc in (1, 2):
        spec, hooks, steps, checkpoints = run(tmp_path, trainer_base, records, nproc)
        result = train(spec, hooks) if nproc == 1 else distributed.train(spec, hooks, nproc)
        results[nproc] = (result, steps, checkpoints)
    (one, one_steps, _), (two, two_steps, two_ckpts) = results[1], results[2]
    assert two.steps == one.steps == 9 and [s.step for s in two_steps] == list(range(1, 10))  # hooks once
    assert two_steps[0].loss == pytest.approx(one_steps[0].loss, rel=1e-4)  # the same global batch
    assert one_steps[-1].loss < 0.7 * one_steps[0].loss  # it trained
    assert two.train_loss == pytest.approx(one.train_loss, rel=0.02)
    assert two.validation_loss == pytest.approx(one.validation_loss, rel=0.02)
    assert [c.step for c in two_ckpts] == [4, 8]
    assert sorted(p.name for p in (tmp_path / "ckpt-2").iterdir()) == ["step-000004", "step-000008"]
    assert sorted(p.name for p in two.adapter_dir.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert not (tmp_path / "out-2-rank-unused").exists()  # the other rank wrote nothing


def test_the_trainer_command_trains_each_job_with_nproc_processes(tmp_path, trainer_base):
    from workers.trainer.worker import Trainer, _parse_args, config_from_args

    config = config_from_args(_parse_args(["--model", str(trainer_base), "--data-dir", str(tmp_path),
                                           "--nproc", "2"]))
    train_fn = Trainer(config).train_fn
    assert config.nproc == 2 and train_fn.func is distributed.train and train_fn.keywords == {"nproc": 2}
