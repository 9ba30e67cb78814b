"""A stand-in for `workers.trainer.training.train` with the same contract: steps with hooks, checkpoints in
`checkpoint_dir/step-NNNNNN/`, resume from the latest, cancellation, and a real (tiny, random) PEFT LoRA
as its result, so publishing and serving run for real. `gate` can hold it at a step."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from workers.trainer.training import CheckpointReport, StepReport, TrainingCancelled, TrainingResult


@dataclass
class FakeTrain:
    steps: int = 12
    step_s: float = 0.0
    hold_at: int | None = None  # wait for `gate` before this step
    gate: threading.Event = field(default_factory=threading.Event)
    started_from: list[int] = field(default_factory=list)
    calls: int = 0
    fail_with: Exception | None = None

    def __call__(self, spec, hooks) -> TrainingResult:
        self.calls += 1
        if self.fail_with is not None:
            raise self.fail_with
        root = Path(spec.checkpoint_dir)
        done = sorted(root.glob("step-*/state.json")) if root.is_dir() else []
        step = json.loads(done[-1].read_text())["step"] if done else 0
        self.started_from.append(step)
        while step < self.steps:
            if hooks.should_stop():
                raise TrainingCancelled(f"cancelled at step {step}")
            if self.hold_at is not None and step + 1 == self.hold_at:
                self.gate.wait(30)
            if self.step_s:
                threading.Event().wait(self.step_s)
            step += 1
            hooks.on_step(StepReport(step=step, total_steps=self.steps, loss=1.0 / step, tokens_per_s=100.0,
                                     tokens=32))
            if step % hooks.checkpoint_every == 0 and step < self.steps:
                folder = root / f"step-{step:06d}"
                folder.mkdir(parents=True, exist_ok=True)
                (folder / "state.json").write_text(json.dumps({"step": step}))
                hooks.on_checkpoint(CheckpointReport(step=step, path=folder, train_loss=1.0 / step))
        out = write_lora(Path(spec.base_model_path), Path(spec.output_dir), seed=spec.seed)
        return TrainingResult(adapter_dir=out, kind="lora", train_loss=0.5,
                              validation_loss=0.7 if spec.valid_records else None, steps=step)


def write_lora(model: Path, out: Path, seed: int, r: int = 2) -> Path:
    cfg = json.loads((model / "config.json").read_text())
    hidden, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    kv = cfg["num_key_value_heads"] * (hidden // cfg["num_attention_heads"])
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(layers):
        for module, out_features in (("q_proj", hidden), ("v_proj", kv)):
            key = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, hidden, generator=gen) * 0.1
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_features, r, generator=gen) * 0.1
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": str(model), "task_type": "CAUSAL_LM"}))
    return out
