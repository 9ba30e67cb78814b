"""Fine-tune training: one entry point, `train(spec, hooks)`, for every method (LoRA, S²FT, Medusa heads).

Each method module (`workers/trainer/{lora,s2ft,medusa}.py`) turns a spec into a `MethodSetup`: the named
trainable parameters, the encoded examples, how to batch them, the loss of one batch and how to write the
finished adapter. This module runs the loop they share: seeded data order, AdamW with warmup + linear decay,
gradient clipping, step events, cancellation, periodic checkpoints (resume continues exactly: parameters,
optimizer state, step and RNG are restored, the data order is a function of seed and epoch) and the final
validation loss.

Checkpoints are our own files in `checkpoint_dir/step-NNNNNN/`: `params.safetensors` (trainable tensors +
RNG state), `optimizer.pt` (AdamW state; read back with `torch.load(weights_only=True)`), `state.json`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

CLIP_NORM = 1.0
KEEP_CHECKPOINTS = 2
_RNG_KEY = "__torch_rng_state__"


@dataclass
class TrainingSpec:
    method: dict  # output of adapters_store.training_methods.validate_method
    base_model_path: str  # HF folder of the base (config.json + safetensors + tokenizer)
    train_records: list[dict]  # {"prompt", "completion"} or {"messages": [{"role", "content"}, ...]}
    valid_records: list[dict] | None
    seed: int
    output_dir: Path  # the finished adapter folder is written here
    checkpoint_dir: Path  # resumed from the latest checkpoint in it, if any
    adapter_path: str | None = None  # medusa only: distil this adapter's (a LoRA or S²FT folder) continuations


@dataclass
class StepReport:
    step: int  # 1-based: steps done so far
    total_steps: int
    loss: float
    tokens_per_s: float
    tokens: int = 0  # input tokens of this step's batch


@dataclass
class CheckpointReport:
    step: int
    path: Path
    train_loss: float


@dataclass
class TrainingHooks:
    on_step: Callable[[StepReport], None] = lambda report: None
    on_checkpoint: Callable[[CheckpointReport], None] = lambda report: None
    should_stop: Callable[[], bool] = lambda: False  # checked every step → TrainingCancelled
    checkpoint_on_stop: Callable[[], bool] = lambda: False  # at a stop: save the progress first (trainer drain)
    checkpoint_every: int = 10  # steps; 0 → no periodic checkpoints


class TrainingCancelled(Exception):
    """should_stop() said so; the latest checkpoint stays in checkpoint_dir."""


@dataclass
class TrainingResult:
    adapter_dir: Path
    kind: str  # "lora" | "s2ft" | "medusa": the adapter kind written to adapter_dir
    train_loss: float  # mean loss over the final epoch's steps
    validation_loss: float | None  # token-weighted mean over valid_records, None without them
    steps: int


@dataclass
class BatchLoss:
    loss_sum: torch.Tensor  # [] summed over the supervised tokens of the batch (differentiable)
    label_tokens: int  # supervised tokens (the loss is loss_sum / label_tokens)
    input_tokens: int  # tokens the forward pass processed (for tokens/s)


@dataclass
class MethodSetup:
    """What a method module hands the shared loop."""

    kind: str
    params: dict[str, torch.nn.Parameter]  # trainable, stable names (checkpoint keys)
    train_examples: Sequence[Any]
    valid_examples: Sequence[Any] | None
    collate: Callable[[Sequence[Any]], Any]  # examples → batch
    loss: Callable[[Any], BatchLoss]  # batch → loss; runs the model (train or eval mode set by the loop)
    save: Callable[[Path], Path]  # writes the adapter folder
    modules: list[torch.nn.Module] = field(default_factory=list)  # put in train()/eval() by the loop


def train(spec: TrainingSpec, hooks: TrainingHooks) -> TrainingResult:
    """Runs the job's method to completion (or TrainingCancelled) and writes the adapter to output_dir."""
    torch.manual_seed(spec.seed)
    setup = _setup(spec)
    return TrainingLoop(spec, hooks, setup).run()


def _setup(spec: TrainingSpec) -> MethodSetup:
    kind = spec.method["type"]
    if kind == "lora":
        from workers.trainer import lora
        return lora.setup(spec)
    if kind == "s2ft":
        from workers.trainer import s2ft
        return s2ft.setup(spec)
    if kind == "medusa":
        from workers.trainer import medusa
        return medusa.setup(spec)
    raise ValueError(f"unknown training method {kind!r}")


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: a function of (seed, epoch) only, so a resumed run replays it."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def lr_at(step: int, total: int, lr: float, warmup_ratio: float) -> float:
    """Linear warmup over warmup_ratio of the steps, then linear decay to 10 % of lr. step is 0-based."""
    warmup = max(1, math.ceil(warmup_ratio * total)) if warmup_ratio > 0 else 0
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return lr * (1.0 - 0.9 * frac)


class TrainingLoop:
    def __init__(self, spec: TrainingSpec, hooks: TrainingHooks, setup: MethodSetup):
        self.spec, self.hooks, self.setup = spec, hooks, setup
        self.method = spec.method
        n = len(setup.train_examples)
        if n == 0:
            raise ValueError("no training examples")
        self.batch_size = self.method["batch_size"]
        self.steps_per_epoch = math.ceil(n / self.batch_size)
        self.total_steps = self.method["epochs"] * self.steps_per_epoch
        self.optimizer = torch.optim.AdamW(list(setup.params.values()), lr=self.method["lr"],
                                           weight_decay=self.method["weight_decay"])
        self.step = 0
        self.losses: list[float] = []  # per step

    # -- the loop ------------------------------------------------------------------------------------
    def run(self) -> TrainingResult:
        self._resume()
        self._set_mode(train=True)
        while self.step < self.total_steps:
            if self.hooks.should_stop():
                self._checkpoint_before_stop()
                raise TrainingCancelled(f"cancelled at step {self.step}")
            report = self._train_step()
            self.hooks.on_step(report)
            every = self.hooks.checkpoint_every
            if every > 0 and self.step % every == 0 and self.step < self.total_steps:
                self._save_checkpoint()
        self._set_mode(train=False)
        validation = self.evaluate(self.setup.valid_examples) if self.setup.valid_examples else None
        adapter_dir = self.setup.save(Path(self.spec.output_dir))
        return TrainingResult(adapter_dir=adapter_dir, kind=self.setup.kind, train_loss=self.final_epoch_loss(),
                              validation_loss=validation, steps=self.step)

    def _batch_for(self, step: int) -> Any:
        epoch, index = divmod(step, self.steps_per_epoch)
        order = epoch_order(len(self.setup.train_examples), self.spec.seed, epoch)
        picked = order[index * self.batch_size:(index + 1) * self.batch_size]
        return self.setup.collate([self.setup.train_examples[i] for i in picked])

    def _train_step(self) -> StepReport:
        start = time.perf_counter()
        batch = self._batch_for(self.step)
        lr = lr_at(self.step, self.total_steps, self.method["lr"], self.method["warmup_ratio"])
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        out = self.setup.loss(batch)
        loss = out.loss_sum / max(1, out.label_tokens)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(self.setup.params.values()), CLIP_NORM)
        self.optimizer.step()
        self.step += 1
        value = float(loss.detach())
        self.losses.append(value)
        elapsed = max(time.perf_counter() - start, 1e-9)
        return StepReport(step=self.step, total_steps=self.total_steps, loss=value,
                          tokens_per_s=out.input_tokens / elapsed, tokens=int(out.input_tokens))

    def evaluate(self, examples: Sequence[Any]) -> float:
        """Token-weighted mean loss over examples, in order, without gradients."""
        self._set_mode(train=False)
        total, tokens = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(examples), self.batch_size):
                out = self.setup.loss(self.setup.collate(list(examples[i:i + self.batch_size])))
                total += float(out.loss_sum)
                tokens += out.label_tokens
        return total / max(1, tokens)

    def final_epoch_loss(self) -> float:
        last = self.losses[-self.steps_per_epoch:]
        return sum(last) / len(last) if last else float("nan")

    def _set_mode(self, train: bool) -> None:
        for module in self.setup.modules:
            module.train(train)

    # -- checkpoints ---------------------------------------------------------------------------------
    def _identity(self) -> dict:
        return {"method": self.method, "seed": self.spec.seed, "kind": self.setup.kind,
                "train_examples": len(self.setup.train_examples)}

    def _save_checkpoint(self) -> Path:
        root = Path(self.spec.checkpoint_dir)
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"step-{self.step:06d}"
        tmp = root / f".tmp-step-{self.step:06d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        tensors = {name: p.detach().contiguous() for name, p in self.setup.params.items()}
        tensors[_RNG_KEY] = torch.get_rng_state()
        save_file(tensors, str(tmp / "params.safetensors"))
        torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
        state = {**self._identity(), "step": self.step, "losses": self.losses}
        (tmp / "state.json").write_text(json.dumps(state))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)  # a checkpoint is complete or absent
        for old in sorted(root.glob("step-*"))[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)
        recent = self.losses[-self.hooks.checkpoint_every:]
        train_loss = sum(recent) / len(recent)  # mean over the steps since the previous checkpoint
        self.hooks.on_checkpoint(CheckpointReport(step=self.step, path=final, train_loss=train_loss))
        return final

    def _checkpoint_before_stop(self) -> None:
        """A draining trainer keeps its progress: the job resumes from this step elsewhere."""
        done = (Path(self.spec.checkpoint_dir) / f"step-{self.step:06d}").is_dir()
        if self.step > 0 and not done and self.hooks.checkpoint_on_stop():
            self._save_checkpoint()

    def _resume(self) -> None:
        found = latest_checkpoint(Path(self.spec.checkpoint_dir))
        if found is None:
            return
        state = json.loads((found / "state.json").read_text())
        if {k: state.get(k) for k in self._identity()} != json.loads(json.dumps(self._identity())):
            raise ValueError(f"checkpoint {found} belongs to a different job (method, seed or data differ)")
        tensors = load_file(str(found / "params.safetensors"))
        with torch.no_grad():
            for name, p in self.setup.params.items():
                p.copy_(tensors[name])
        torch.set_rng_state(tensors[_RNG_KEY])
        self.optimizer.load_state_dict(torch.load(found / "optimizer.pt", weights_only=True))
        self.step, self.losses = int(state["step"]), [float(x) for x in state["losses"]]


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint folder in root, or None."""
    if not root.is_dir():
        return None
    done = [p for p in sorted(root.glob("step-*")) if (p / "state.json").is_file()]
    return done[-1] if done else None
