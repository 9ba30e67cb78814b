"""Echo with prompt logprobs (the legacy completions' `echo` with `logprobs`, as vLLM and OpenAI answer it)
without a change to the engine: the raw logprob of prompt token i (i ≥ 1) and the top-k at its position
come from a one-token request on the prefix prompt[:i] whose `logit_bias` forces token i. Raw logprobs are
the log_softmax of the row's logits before any processor, so the bias decides which token is "chosen" and
never the numbers reported. The requests run concurrently, batched by the engine with the request's
adapter; their cost grows with the square of the prompt's length, hence the cap."""

from __future__ import annotations

import asyncio
from typing import Any

from workers.engine.types import GenerationRequest, SamplingParams
from workers.errors import InvalidRequestError

MAX_PROMPT_TOKENS = 256  # echo with logprobs: longer prompts are refused (400 naming `echo`)
FORCE = 1e4  # added to the forced token's logit: beyond any logit gap of a real model

PromptLogprob = tuple[float, tuple[tuple[int, float], ...] | None] | None  # (raw logprob, top-k) or None


async def prompt_logprobs(engine: Any, prompt_ids: tuple[int, ...], top_k: int, adapter: str | None,
                          request_id: str) -> list[PromptLogprob]:
    """Per prompt token: None for the first (nothing precedes it), else (its raw logprob, the top-`top_k`
    (token, raw logprob) pairs at its position or None when top_k is 0)."""
    if len(prompt_ids) > MAX_PROMPT_TOKENS:
        raise InvalidRequestError(f"echo with logprobs takes prompts of at most {MAX_PROMPT_TOKENS} tokens "
                                  f"(this one has {len(prompt_ids)})", param="echo")

    async def at(i: int) -> PromptLogprob:
        params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True, logprobs=True, top_logprobs=top_k,
                                logit_bias=((prompt_ids[i], FORCE),))
        request = GenerationRequest(prompt_ids[:i], params, adapter, f"{request_id}/prompt{i}")
        events = [ev async for ev in engine.generate(request)]
        if events[0].token_id != prompt_ids[i]:
            raise RuntimeError(f"prompt position {i}: the forced token was not chosen")
        return events[0].logprob, events[0].top_logprobs

    return [None, *await asyncio.gather(*(at(i) for i in range(1, len(prompt_ids))))]
