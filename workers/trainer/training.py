"""Fine-tune training: one entry point, `train(spec, hooks)`, for every method (LoRA, S²FT, Medusa heads).

Each method module (`workers/trainer/{lora,s2ft,medusa}.py`, registered in `method_registry.py`) turns a spec
into a `MethodSetup` (`method_contract.py`): the named
trainable parameters, the encoded examples, how to batch them, the loss of one batch and how to write the
finished adapter. This module runs the loop they share: seeded data order, torch's AdamW with transformers'
linear schedule (warmup, then decay to 0), gradient clipping, step events, cancellation, periodic
checkpoints (resume continues exactly: parameters,
optimizer state, step and RNG are restored, the data order is a function of seed and epoch), the validation
loss and token accuracy at every checkpoint and at the end, and the per-step metrics history.

Checkpoints are our own files in `checkpoint_dir/step-NNNNNN/`: `params.safetensors` (trainable tensors +
RNG state), `optimizer.pt` and `scheduler.pt` (AdamW and schedule state; read back with
`torch.load(weights_only=True)`), `state.json`.
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
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from adapters_store.auto_hyperparameters import is_resolved, resolve
from workers.trainer import method_registry
from workers.trainer.method_contract import MethodSetup, TrainingSpec

if TYPE_CHECKING:
    from workers.trainer.distributed import DataParallel

CLIP_NORM = 1.0
KEEP_CHECKPOINTS = 2
_RNG_KEY = "__torch_rng_state__"




@dataclass
class StepReport:
    step: int  # 1-based: steps done so far
    total_steps: int
    loss: float
    tokens_per_s: float
    tokens: int = 0  # input tokens of this step's batch
    token_accuracy: float | None = None  # share of supervised tokens the argmax predicted (None: not measured)


@dataclass
class EvalReport:
    step: int
    total_steps: int
    loss: float  # token-weighted mean over the whole validation set
    token_accuracy: float | None


@dataclass
class CheckpointReport:
    step: int
    path: Path
    train_loss: float
    adapter_dir: Path | None = None  # the adapter as of this step (servable), if the method writes one


@dataclass
class TrainingHooks:
    on_step: Callable[[StepReport], None] = lambda report: None
    on_checkpoint: Callable[[CheckpointReport], None] = lambda report: None
    on_eval: Callable[[EvalReport], None] = lambda report: None  # at every checkpoint and at the end
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
    validation_token_accuracy: float | None = None
    history: list[dict] = field(default_factory=list)  # per step: step, train_loss, train_mean_token_accuracy,
    # and valid_loss, valid_mean_token_accuracy where evaluated (a resumed run keeps the earlier steps')






def train(spec: TrainingSpec, hooks: TrainingHooks, parallel: DataParallel | None = None) -> TrainingResult:
    """Runs the job's method to completion (or TrainingCancelled) and writes the adapter to output_dir.
    With `parallel` (workers/trainer/distributed.py), this process is one rank of a data-parallel run."""
    torch.manual_seed(spec.seed)
    setup = method_registry.setup(spec)
    return TrainingLoop(spec, hooks, setup, parallel).run()


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: a function of (seed, epoch) only, so a resumed run replays it."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def linear_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float):
    """transformers' linear schedule: warmup over warmup_ratio of the steps, then linear decay to 0."""
    from transformers import get_scheduler

    warmup = math.ceil(warmup_ratio * total_steps) if warmup_ratio > 0 else 0
    return get_scheduler("linear", optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


class TrainingLoop:
    def __init__(self, spec: TrainingSpec, hooks: TrainingHooks, setup: MethodSetup,
                 parallel: DataParallel | None = None):
        self.spec, self.hooks, self.setup = spec, hooks, setup
        n = len(setup.train_examples)
        if n == 0:
            raise ValueError("no training examples")
        self.method = spec.method if is_resolved(spec.method) else resolve(spec.method, n)
        self.batch_size = self.method["batch_size"]
        self.steps_per_epoch = math.ceil(n / self.batch_size)
        self.total_steps = self.method["epochs"] * self.steps_per_epoch
        self.optimizer = torch.optim.AdamW(list(setup.params.values()), lr=self.method["lr"],
                                           weight_decay=self.method["weight_decay"])
        self.scheduler = linear_schedule(self.optimizer, self.total_steps, self.method["warmup_ratio"])
        self.parallel = parallel
        self.step = 0
        self.losses: list[float] = []  # per step
        self.history: list[dict] = []  # per step: the metrics row (see TrainingResult.history)

    # -- the loop ------------------------------------------------------------------------------------
    def run(self) -> TrainingResult:
        self._resume()
        self._set_mode(train=True)
        main = self.parallel is None or self.parallel.is_main
        if self.parallel is not None:
            self.parallel.start(next(iter(self.setup.params.values())).device)
        while self.step < self.total_steps:
            stop = self.hooks.should_stop() if main else False
            if self.parallel is not None:
                stop = self.parallel.any(stop)  # rank 0 decides; every rank stops at the same step
            if stop:
                if main:  # a draining trainer saves its progress first (written once, by rank 0)
                    self._checkpoint_before_stop()
                raise TrainingCancelled(f"cancelled at step {self.step}")
            report = self._train_step()
            self.hooks.on_step(report)
            every = self.hooks.checkpoint_every
            if main and every > 0 and self.step % every == 0 and self.step < self.total_steps:
                self._save_checkpoint()  # written once, by rank 0
        self._set_mode(train=False)
        if not main:
            return TrainingResult(adapter_dir=Path(self.spec.output_dir), kind=self.setup.kind,
                                  train_loss=self.final_epoch_loss(), validation_loss=None, steps=self.step)
        validation, accuracy = self._evaluate_and_report() if self.setup.valid_examples else (None, None)
        adapter_dir = self.setup.save(Path(self.spec.output_dir))
        return TrainingResult(adapter_dir=adapter_dir, kind=self.setup.kind, train_loss=self.final_epoch_loss(),
                              validation_loss=validation, steps=self.step, validation_token_accuracy=accuracy,
                              history=self.history)

    def _evaluate_and_report(self) -> tuple[float, float | None]:
        loss, accuracy = self.evaluate_with_accuracy(self.setup.valid_examples)
        if self.history and self.history[-1]["step"] == self.step:
            self.history[-1].update(valid_loss=loss, valid_mean_token_accuracy=accuracy)
        self.hooks.on_eval(EvalReport(step=self.step, total_steps=self.total_steps, loss=loss, token_accuracy=accuracy))
        return loss, accuracy

    def _batch_for(self, step: int) -> Any:
        epoch, index = divmod(step, self.steps_per_epoch)
        order = epoch_order(len(self.setup.train_examples), self.spec.seed, epoch)
        picked = order[index * self.batch_size:(index + 1) * self.batch_size]
        if self.parallel is not None:
            picked = self.parallel.shard(picked)  # this rank's part of the global batch
        return self.setup.collate([self.setup.train_examples[i] for i in picked]) if picked else None

    def _train_step(self) -> StepReport:
        start = time.perf_counter()
        batch = self._batch_for(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        params = list(self.setup.params.values())
        if self.parallel is None:
            out = self.setup.loss(batch)
            loss = out.loss_sum / max(1, out.label_tokens)
            loss.backward()
        else:  # the gradient of the global batch's mean loss, as one process would compute it
            out = self.parallel.step(self.setup.loss, batch, params)
            loss = out.loss_sum / max(1, out.label_tokens)
        torch.nn.utils.clip_grad_norm_(params, CLIP_NORM)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        value = float(loss.detach())
        self.losses.append(value)
        accuracy = out.correct_tokens / max(1, out.label_tokens) if out.correct_tokens is not None else None
        self.history.append({"step": self.step, "train_loss": value, "train_mean_token_accuracy": accuracy})
        elapsed = max(time.perf_counter() - start, 1e-9)
        return StepReport(step=self.step, total_steps=self.total_steps, loss=value,
                          tokens_per_s=out.input_tokens / elapsed, tokens=int(out.input_tokens),
                          token_accuracy=accuracy)

    def evaluate(self, examples: Sequence[Any]) -> float:
        """Token-weighted mean loss over examples, in order, without gradients."""
        return self.evaluate_with_accuracy(examples)[0]

    def evaluate_with_accuracy(self, examples: Sequence[Any]) -> tuple[float, float | None]:
        """(token-weighted mean loss, token accuracy or None) over examples, in order, without gradients;
        the modules' train/eval mode is restored afterwards."""
        was_training = any(m.training for m in self.setup.modules)
        self._set_mode(train=False)
        total, tokens, correct = 0.0, 0, 0
        with torch.no_grad():
            for i in range(0, len(examples), self.batch_size):
                out = self.setup.loss(self.setup.collate(list(examples[i:i + self.batch_size])))
                total += float(out.loss_sum)
                tokens += out.label_tokens
                correct = None if out.correct_tokens is None or correct is None else correct + out.correct_tokens
        self._set_mode(train=was_training)
        return total / max(1, tokens), (correct / max(1, tokens) if correct is not None else None)

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
        torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
        if self.setup.valid_examples:
            self._evaluate_and_report()
        adapter = self.setup.save(tmp / "adapter") if self.setup.servable_checkpoints else None
        state = {**self._identity(), "step": self.step, "losses": self.losses, "history": self.history}
        (tmp / "state.json").write_text(json.dumps(state))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)  # a checkpoint is complete or absent
        for old in sorted(root.glob("step-*"))[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)
        recent = self.losses[-self.hooks.checkpoint_every:]
        train_loss = sum(recent) / len(recent)  # mean over the steps since the previous checkpoint
        self.hooks.on_checkpoint(CheckpointReport(step=self.step, path=final, train_loss=train_loss,
                                                  adapter_dir=final / adapter.name if adapter else None))
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
        self.scheduler.load_state_dict(torch.load(found / "scheduler.pt", weights_only=True))
        self.step, self.losses = int(state["step"]), [float(x) for x in state["losses"]]
        self.history = list(state.get("history", []))


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint folder in root, or None."""
    if not root.is_dir():
        return None
    done = [p for p in sorted(root.glob("step-*")) if (p / "state.json").is_file()]
    return done[-1] if done else None
