"""Request and event types of the engine's public interface (what the worker service uses)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "cancelled"]


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 → greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 → off
    seed: int | None = None  # same seed + same prompt → same tokens
    stop: tuple[str, ...] = ()  # output is cut right before the first match
    stop_token_ids: tuple[int, ...] = ()  # added to the model's eos ids
    ignore_eos: bool = False
    logprobs: bool = False  # report the log-probability of each chosen token
    top_logprobs: int = 0  # with logprobs: also the model's k most likely tokens at each position (0-20)
    # logits processors (workers.engine.logits_processors), applied in this order before temperature:
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    repetition_penalty: float = 1.0  # CTRL: seen (prompt + output) tokens' logits ÷ (if > 0) or × this
    presence_penalty: float = 0.0  # OpenAI: − this for every token already generated
    frequency_penalty: float = 0.0  # OpenAI: − this × the token's count in the output
    # warpers after temperature → top-k → top-p (as transformers orders them):
    min_p: float = 0.0  # drop tokens below min_p × the most likely token's probability
    typical_p: float = 1.0  # locally typical sampling: keep the smallest typical set of mass typical_p
    json_schema: str | None = None  # structured output: the completion is JSON valid against this schema
    n: int = 1  # completions from one prompt: one prefill, its KV copied into n-1 more slots


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: tuple[int, ...]
    params: SamplingParams = field(default_factory=SamplingParams)
    adapter: str | None = None  # a resident adapter's name; None → base model
    request_id: str = ""


@dataclass(frozen=True)
class TokenEvent:
    """One generated token. `text` is the detokenised text this token adds (may be empty while a
    multi-byte character or a possible stop string is pending). The last event of a stream has
    `finish_reason` set; its text flushes whatever was held back."""

    token_id: int
    text: str
    logprob: float | None
    index: int  # 0-based position in the completion
    prompt_tokens: int
    finish_reason: FinishReason | None = None
    details: dict | None = None  # last event of a request with Medusa heads: tokens per decode step
    top_logprobs: tuple[tuple[int, float], ...] | None = None  # (token id, raw logprob), most likely first
    choice: int = 0  # which of the request's n completions this token belongs to
