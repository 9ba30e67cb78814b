"""Medusa-1 heads trained on the frozen base by self-distillation.

1. Distil: the base (or the base with `spec.adapter_path`'s LoRA applied) greedily continues every training
   prompt; the sequence prompt + continuation is the base's own text.
2. Features: one no-grad forward of the frozen model per sequence gives the final (post-norm) hidden states
   h [T, hidden], kept for the whole run (heads are the only thing trained, so they never change).
3. Heads (v2 layout: ResBlocks `x + SiLU(W x + b)` then the base lm_head), zero-initialised so each starts as
   the base's own next-token guess; head k at position t targets token t+k+2 of the sequence (only the
   continuation's tokens: what the base itself produced). Loss Σₖ 0.8ᵏ · CEₖ, each CEₖ summed over its
   positions and divided by the number of head-0 positions (≈ Σₖ 0.8ᵏ · mean CEₖ).
Written with workers.adapters.medusa.write_medusa; `acceptance` measures the heads offline.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from workers.adapters.medusa import CONFIG_FILE, MedusaHeads, MedusaWeights, write_medusa
from workers.trainer import sft_data
from workers.trainer.method_contract import BatchLoss, MethodSetup, TrainingSpec
from workers.trainer.sft import load_base

DECAY = 0.8  # weight of head k's loss: DECAY ** k
IGNORE = sft_data.IGNORE


@dataclass(frozen=True)
class DistilledExample:
    tokens: torch.Tensor  # [T] long: prompt + the base's greedy continuation
    hidden: torch.Tensor  # [T, hidden] final hidden states of the frozen model
    start: int  # first continuation position (len(prompt))


@dataclass
class MedusaBatch:
    hidden: torch.Tensor  # [B, T, hidden], zero padded
    targets: torch.Tensor  # [K, B, T] long: head k's target at (b, t), IGNORE where none
    input_tokens: int


@torch.no_grad()
def greedy_continuations(model, prompts: Sequence[list[int]], max_new_tokens: int, pad_id: int,
                         eos_id: int | None, batch_size: int) -> list[list[int]]:
    """Each prompt's greedy continuation (up to and including eos), generated in left-padded batches."""
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)  # [B, T0]
        mask = torch.zeros_like(ids)
        for row, p in enumerate(chunk):
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad_id, eos_token_id=eos_id)[:, width:]  # [B, N]
        for row in gen.tolist():
            if eos_id is not None and eos_id in row:
                row = row[:row.index(eos_id) + 1]
            out.append(row)
    return out


@torch.no_grad()
def distil(model, tokenizer, records: Sequence[dict], method: dict) -> list[DistilledExample]:
    for i, record in enumerate(records):
        sft_data.check_record(i, record)
    max_len = method["max_seq_len"]
    prompts = [sft_data.prompt_ids(r, tokenizer)[-max(1, max_len - 2):] for r in records]
    conts = greedy_continuations(model, prompts, method["max_new_tokens"], sft_data.pad_id_of(tokenizer),
                                 tokenizer.eos_token_id, method["batch_size"])
    examples = []
    for prompt, cont in zip(prompts, conts):
        tokens = torch.tensor((prompt + cont)[:max_len])  # [T]
        if len(tokens) - len(prompt) < 2:  # head 0 needs a target two positions ahead
            continue
        hidden = model.model(input_ids=tokens[None]).last_hidden_state[0]  # [T, hidden] post-norm
        examples.append(DistilledExample(tokens, hidden.float().clone(), len(prompt)))
    if not examples:
        raise ValueError("self-distillation produced no continuation of 2+ tokens to train the heads on")
    return examples


def head_targets(tokens: torch.Tensor, start: int, num_heads: int, width: int) -> torch.Tensor:
    """tokens: [T] → [K, width]: head k at t targets tokens[t+k+2] when that is a continuation token."""
    t_len = len(tokens)
    targets = torch.full((num_heads, width), IGNORE, dtype=torch.long)
    for k in range(num_heads):
        first = max(0, start - k - 2)  # position whose target is the first continuation token
        last = t_len - k - 2  # exclusive
        if last > first:
            targets[k, first:last] = tokens[first + k + 2:t_len]
    return targets


def collate(examples: Sequence[DistilledExample], num_heads: int) -> MedusaBatch:
    width = max(len(e.tokens) for e in examples)
    hidden = torch.zeros(len(examples), width, examples[0].hidden.shape[-1])  # [B, T, H]
    targets = torch.full((num_heads, len(examples), width), IGNORE, dtype=torch.long)  # [K, B, T]
    for row, e in enumerate(examples):
        hidden[row, :len(e.tokens)] = e.hidden
        targets[:, row] = head_targets(e.tokens, e.start, num_heads, width)
    return MedusaBatch(hidden, targets, sum(len(e.tokens) for e in examples))


class TrainableHeads(torch.nn.Module):
    def __init__(self, hidden: int, num_heads: int, num_layers: int, lm_head: torch.nn.Module):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(num_heads, num_layers, hidden, hidden))  # [K, n, H, H]
        self.bias = torch.nn.Parameter(torch.zeros(num_heads, num_layers, hidden))  # [K, n, H]
        self.lm_head = lm_head  # frozen, the base's

    def as_weights(self) -> MedusaWeights:
        return MedusaWeights(2, self.weight, self.bias, None)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h: [R, hidden] → [R, K, vocab]."""
        return MedusaHeads(self.as_weights(), self.lm_head).logits(h)

    def loss(self, batch: MedusaBatch) -> BatchLoss:
        b, t, hidden = batch.hidden.shape
        features = MedusaHeads(self.as_weights(), self.lm_head).features(batch.hidden.reshape(b * t, hidden))
        total = batch.hidden.new_zeros(())
        for k in range(features.shape[0]):  # one head at a time, only where it has targets: [P, V] logits
            targets = batch.targets[k].reshape(-1)  # [B·T]
            keep = (targets != IGNORE).nonzero().squeeze(1)  # [P]
            logits = self.lm_head(features[k][keep]).float()  # [P, V]
            total = total + DECAY ** k * F.cross_entropy(logits, targets[keep], reduction="sum")
        return BatchLoss(total, int((batch.targets[0] != IGNORE).sum()), batch.input_tokens)


@torch.no_grad()
def acceptance(heads: MedusaHeads, examples: Sequence[DistilledExample]) -> dict:
    """Offline acceptance on the base's own sequences: at every continuation position t where all heads
    have a target, head k is right when its argmax is token t+k+2 (the base's greedy choice). A chain
    (greedy verification) accepts the base's token plus the leading run of right heads.
    → {"head_accuracy": [K floats], "tokens_per_step": mean chain length, "positions": n}."""
    k = heads.num_heads
    right_all, chains = [], []
    for e in examples:
        t_len = len(e.tokens)
        pos = torch.arange(max(0, e.start - 1), t_len - k - 1)  # positions with targets for every head
        if len(pos) == 0:
            continue
        guess = heads.logits(e.hidden[pos]).argmax(-1)  # [P, K]
        truth = torch.stack([e.tokens[pos + j + 2] for j in range(k)], dim=1)  # [P, K]
        right = guess == truth  # [P, K]
        right_all.append(right)
        chains.append(1 + right.long().cumprod(dim=1).sum(dim=1))  # [P]
    right = torch.cat(right_all)
    return {"head_accuracy": right.float().mean(0).tolist(), "tokens_per_step": float(torch.cat(chains).float().mean()),
            "positions": int(right.shape[0])}


def save(folder: Path, heads: TrainableHeads, spec: TrainingSpec, config) -> Path:
    weights = heads.as_weights()
    write_medusa(folder, MedusaWeights(2, weights.weights.detach().clone(), weights.biases.detach().clone(), None),
                 base_model_name_or_path=spec.base_model_path)
    path = folder / CONFIG_FILE
    cfg = json.loads(path.read_text())
    cfg.update(hidden_size=config.hidden_size, vocab_size=config.vocab_size,
               adapter=spec.method.get("adapter"), trainer="adapterd self-distillation")
    path.write_text(json.dumps(cfg, indent=2) + "\n")
    return folder


def setup(spec: TrainingSpec) -> MethodSetup:
    model, tokenizer = load_base(spec.base_model_path)
    if spec.adapter_path:  # distil the adapter's continuations: apply it, frozen, to the base
        from workers.adapters.s2ft import is_s2ft_folder
        from workers.trainer import lora, s2ft

        if is_s2ft_folder(spec.adapter_path):
            s2ft.load_into(model, spec.adapter_path, spec.base_model_path)
        else:
            lora.load_into(model, spec.adapter_path)
    m = spec.method
    train = distil(model, tokenizer, spec.train_records, m)
    valid = distil(model, tokenizer, spec.valid_records, m) if spec.valid_records else None
    heads = TrainableHeads(model.config.hidden_size, m["num_heads"], m["num_layers"], model.lm_head)
    params = {"weight": heads.weight, "bias": heads.bias}
    return MethodSetup(kind="medusa", params=params, train_examples=train, valid_examples=valid,
                       collate=lambda exs: collate(exs, m["num_heads"]), loss=heads.loss,
                       save=lambda folder: save(folder, heads, spec, model.config), modules=[heads],
                       servable_checkpoints=False)
