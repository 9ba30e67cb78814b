"""Supervised fine-tuning on the Hugging Face model of the base (fp32, autograd-correct; the serving decoder
is inference-only): load and freeze the base, and build the `MethodSetup` the shared loop runs for a method
that trains some parameters of (or injected into) that model on completion tokens."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from workers.trainer import sft_data
from workers.trainer.method_contract import BatchLoss, MethodSetup, TrainingSpec


def load_base(path: str):
    """(model, tokenizer): the base in fp32, every parameter frozen, eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.requires_grad_(False)
    model.eval()
    return model, AutoTokenizer.from_pretrained(path)


def decoder_layers(model) -> torch.nn.ModuleList:
    """The transformer blocks of a Llama-family causal LM (`model.model.layers`)."""
    return model.model.layers


def batch_loss(model, batch: sft_data.SFTBatch) -> BatchLoss:
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # [B, T, V]
    return BatchLoss(sft_data.causal_lm_loss(logits, batch.labels), batch.label_tokens, batch.input_tokens,
                     correct_tokens=sft_data.correct_tokens(logits.detach(), batch.labels))


def sft_setup(spec: TrainingSpec, model, tokenizer, kind: str, params: dict[str, torch.nn.Parameter],
              save: Callable[[Path], Path]) -> MethodSetup:
    max_len = spec.method["max_seq_len"]
    train = sft_data.encode_records(spec.train_records, tokenizer, max_len)
    valid = sft_data.encode_records(spec.valid_records, tokenizer, max_len) if spec.valid_records else None
    return MethodSetup(kind=kind, params=params, train_examples=train, valid_examples=valid,
                       collate=partial(sft_data.collate, pad_id=sft_data.pad_id_of(tokenizer)),
                       loss=partial(batch_loss, model), save=save, modules=[model])
