"""Supervised fine-tuning data: JSONL records → token ids with labels on the completion only → padded batches.

Records are either `{"prompt": str, "completion": str}` (prompt tokens, as the serving path tokenises a
prompt, then completion tokens and eos; labels on completion + eos) or `{"messages": [{"role", "content"},
...]}` (rendered with the tokenizer's chat template; labels on the assistant turns only).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

IGNORE = -100  # label of a position that carries no loss
ROLES = {"system", "user", "assistant"}


@dataclass(frozen=True)
class Example:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]  # IGNORE where no loss; else the token at that position (shifted in the loss)


@dataclass
class SFTBatch:
    input_ids: torch.Tensor  # [B, T] long, right-padded
    attention_mask: torch.Tensor  # [B, T] long, 1 on real tokens
    labels: torch.Tensor  # [B, T] long, IGNORE on padding and unsupervised tokens

    @property
    def input_tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def label_tokens(self) -> int:
        """Supervised next-token predictions: labels other than IGNORE, past the first position."""
        return int((self.labels[:, 1:] != IGNORE).sum())


def check_record(i: int, record: object) -> None:
    if not isinstance(record, dict):
        raise ValueError(f"record {i}: must be an object")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"record {i}: 'messages' must be a non-empty list")
        for m in messages:
            if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
                raise ValueError(f"record {i}: each message needs a role in {sorted(ROLES)} and a string content")
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError(f"record {i}: no assistant message to learn from")
    elif isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
        if not record["completion"]:
            raise ValueError(f"record {i}: empty completion")
    else:
        raise ValueError(f"record {i}: expected {{'prompt', 'completion'}} strings or a 'messages' list")


def _eos(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def _chat_ids(tokenizer, messages: list[dict], generation_prompt: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # newer transformers return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def prompt_ids(record: dict, tokenizer) -> list[int]:
    """The tokens a served request for this record's prompt would start from (self-distillation prompts):
    the prompt, or the chat rendered up to its last assistant turn with the generation prompt."""
    if "messages" in record:
        messages = record["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        return _chat_ids(tokenizer, messages[:last], generation_prompt=True)
    return list(tokenizer(record["prompt"])["input_ids"])


def encode_record(record: dict, tokenizer) -> Example:
    if "messages" not in record:
        prompt = list(tokenizer(record["prompt"])["input_ids"])
        completion = list(tokenizer(record["completion"], add_special_tokens=False)["input_ids"]) + _eos(tokenizer)
        return Example(tuple(prompt + completion), tuple([IGNORE] * len(prompt) + completion))
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("'messages' records need a tokenizer with a chat template")
    messages = record["messages"]
    ids = _chat_ids(tokenizer, messages, generation_prompt=False)
    labels = [IGNORE] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(_chat_ids(tokenizer, messages[:i], generation_prompt=True)) if i else 0
        upto = _chat_ids(tokenizer, messages[:i + 1], generation_prompt=False)
        if ids[:len(upto)] != upto:
            raise ValueError("the chat template does not render conversations prefix-consistently")
        labels[start:len(upto)] = ids[start:len(upto)]
    return Example(tuple(ids), tuple(labels))


def encode_records(records: Sequence[dict], tokenizer, max_seq_len: int) -> list[Example]:
    """Validated, tokenised, truncated to max_seq_len; examples left without supervised tokens are dropped
    (ValueError if none remain)."""
    out = []
    for i, record in enumerate(records):
        check_record(i, record)
        ex = encode_record(record, tokenizer)
        ex = Example(ex.input_ids[:max_seq_len], ex.labels[:max_seq_len])
        if any(label != IGNORE for label in ex.labels[1:]):
            out.append(ex)
    if not out:
        raise ValueError(f"no record has completion tokens within max_seq_len={max_seq_len}")
    return out


def collate(examples: Sequence[Example], pad_id: int) -> SFTBatch:
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)  # [B, T]
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)  # [B, T]
    mask = torch.zeros((len(examples), width), dtype=torch.long)  # [B, T]
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return SFTBatch(ids, mask, labels)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits: [B, T, V], labels: [B, T] → [] summed CE of position t predicting labels[t+1]."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                             ignore_index=IGNORE, reduction="sum")


def correct_tokens(logits: torch.Tensor, labels: torch.Tensor) -> int:
    """logits: [B, T, V], labels: [B, T] → how many supervised next tokens the argmax predicts."""
    target = labels[:, 1:]  # [B, T-1]
    hit = (logits[:, :-1].argmax(-1) == target) & (target != IGNORE)
    return int(hit.sum())


def pad_id_of(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0
