"""The contract between a training method and the shared loop (`training.py`): the job's spec goes in, a
`MethodSetup` comes out, and the loop asks it for one batch's `BatchLoss` at a time. Method modules import
this module, never the loop, so the trainer has no import circle."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


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
class BatchLoss:
    loss_sum: torch.Tensor  # [] summed over the supervised tokens of the batch (differentiable)
    label_tokens: int  # supervised tokens (the loss is loss_sum / label_tokens)
    input_tokens: int  # tokens the forward pass processed (for tokens/s)
    correct_tokens: int | None = None  # supervised tokens the argmax predicts (None: the method does not say)


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
    servable_checkpoints: bool = True  # write the adapter with each checkpoint (medusa: no, heads attach)
