"""Periodic checkpoints, cancellation, and resume after takeover: a run stopped midway and resumed from its
checkpoint ends with the very same adapter as an uninterrupted run with the same seed."""

import pytest
import torch
from safetensors.torch import load_file

from adapters_store.training_methods import validate_method
from workers.trainer.training import TrainingCancelled, TrainingHooks, TrainingSpec, latest_checkpoint, train

METHODS = {"lora": {"type": "lora", "rank": 4, "targets": ["q_proj", "down_proj"], "lr": 1e-2},
           "s2ft": {"type": "s2ft", "head_ratio": 0.25, "channel_ratio": 0.05, "lr": 1e-2}}


def spec_for(kind, records, folder, out, ckpt, seed=7):
    method = validate_method({**METHODS[kind], "epochs": 4, "batch_size": 3})  # 8 records → 3 steps an epoch
    return TrainingSpec(method, str(folder), records, records[:2], seed, out, ckpt)


@pytest.mark.parametrize("kind", ["lora", "s2ft"])
def test_resumed_run_equals_uninterrupted_run(kind, tmp_path, trainer_base, mapping_records):
    weights = "adapter_model.safetensors"
    whole = train(spec_for(kind, mapping_records, trainer_base, tmp_path / "a", tmp_path / "ca"),
                  TrainingHooks(checkpoint_every=100))

    seen, checkpoints = [], []
    stop_after = 7  # mid-epoch, past the checkpoint at step 6

    def hooks(stop):
        return TrainingHooks(on_step=lambda r: seen.append((r.step, r.loss)), on_checkpoint=checkpoints.append,
                             should_stop=stop, checkpoint_every=3)

    spec = spec_for(kind, mapping_records, trainer_base, tmp_path / "b", tmp_path / "cb")
    with pytest.raises(TrainingCancelled):
        train(spec, hooks(lambda: len(seen) >= stop_after))
    assert [c.step for c in checkpoints] == [3, 6] and latest_checkpoint(tmp_path / "cb").name == "step-000006"
    assert checkpoints[-1].path.is_dir() and checkpoints[-1].train_loss > 0
    assert not (tmp_path / "b").exists()

    resumed = train(spec, hooks(lambda: False))  # a new trainer takes the job over: resumes at step 6
    assert [s for s, _ in seen] == [1, 2, 3, 4, 5, 6, 7, 7, 8, 9, 10, 11, 12]
    assert seen[6] == seen[7]  # step 7 replayed exactly
    assert resumed.steps == whole.steps == 12
    assert resumed.train_loss == whole.train_loss and resumed.validation_loss == whole.validation_loss
    a, b = load_file(str(whole.adapter_dir / weights)), load_file(str(resumed.adapter_dir / weights))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_of_another_job_is_refused(tmp_path, trainer_base, mapping_records):
    train(spec_for("lora", mapping_records, trainer_base, tmp_path / "a", tmp_path / "c"),
          TrainingHooks(checkpoint_every=5))
    with pytest.raises(ValueError, match="different job"):
        train(spec_for("lora", mapping_records, trainer_base, tmp_path / "b", tmp_path / "c", seed=8),
              TrainingHooks())
