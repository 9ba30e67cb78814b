"""A request's token events → the worker's wire answers: the non-streamed result (n choices, each with its
tokens, logprobs and top-k alternatives) and the streamed SSE payloads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from adapters_store.wire import WorkerChoice, WorkerGenerateResult
from workers.engine.types import TokenEvent

TopToken = tuple[int, str, float]  # (token id, its text, raw logprob)


class TokenTexts:
    """Token id → text for top-k alternatives (decoded alone, cached: the same ids recur)."""

    def __init__(self, tokenizer: Any):
        self._tok = tokenizer
        self._cache: dict[int, str] = {}

    def top(self, pairs: tuple[tuple[int, float], ...] | None) -> list[TopToken] | None:
        if pairs is None:
            return None
        return [(t, self.text(t), lp) for t, lp in pairs]

    def text(self, token: int) -> str:
        text = self._cache.get(token)
        if text is None:
            text = self._cache[token] = self._tok.decode([token])
        return text


def event_payload(ev: TokenEvent, texts: TokenTexts) -> dict:
    """One streamed event (`WorkerTokenEvent`'s fields)."""
    payload = {
        "token_id": ev.token_id,
        "text": ev.text,
        "logprob": ev.logprob,
        "index": ev.index,
        "prompt_tokens": ev.prompt_tokens,
        "finish_reason": ev.finish_reason,
    }
    if ev.top_logprobs is not None:
        payload["top_logprobs"] = texts.top(ev.top_logprobs)
    if ev.choice:
        payload["choice"] = ev.choice
    if ev.details is not None:
        payload["details"] = ev.details
    return payload


@dataclass
class _Choice:
    ids: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[list[TopToken]] = field(default_factory=list)
    finish: str = "length"


class ResultBuilder:
    """Collects a request's events (any choice order) into one `WorkerGenerateResult`."""

    def __init__(self, n: int, logprobs: bool, texts: TokenTexts):
        self._choices = [_Choice() for _ in range(n)]
        self._logprobs, self._texts = logprobs, texts
        self._prompt_tokens = 0
        self._speculative: dict | None = None

    def add(self, ev: TokenEvent) -> None:
        c = self._choices[ev.choice]
        self._speculative = ev.details or self._speculative
        c.ids.append(ev.token_id)
        c.texts.append(ev.text)
        if ev.logprob is not None:
            c.logprobs.append(ev.logprob)
        if ev.top_logprobs is not None:
            c.top.append(self._texts.top(ev.top_logprobs))
        self._prompt_tokens = ev.prompt_tokens
        c.finish = ev.finish_reason or c.finish

    def result(self, worker_id: str) -> WorkerGenerateResult:
        choices = [WorkerChoice(index=i, text="".join(c.texts), token_ids=c.ids, tokens=c.texts,
                                logprobs=c.logprobs if self._logprobs else None,
                                top_logprobs=c.top or None, finish_reason=c.finish)
                   for i, c in enumerate(self._choices)]
        first = choices[0]
        return WorkerGenerateResult(
            text=first.text, token_ids=first.token_ids, tokens=first.tokens, logprobs=first.logprobs,
            top_logprobs=first.top_logprobs, prompt_tokens=self._prompt_tokens,
            completion_tokens=sum(len(c.ids) for c in self._choices), finish_reason=first.finish_reason,
            worker_id=worker_id, speculative=self._speculative,
            choices=choices if len(choices) > 1 else None)
