"""Structured output (JSON, optionally against a JSON schema) with llguidance: each constrained sequence
owns a matcher; before sampling, its row's logits are masked to the tokens the grammar allows (greedy and
sampled rows alike, after the logits processors); the chosen token is then consumed. Rows with different
schemas (and adapters) share a batch: masks are per row. Compiled grammars are cached per schema."""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

import llguidance
import llguidance.hf
import llguidance.torch as llg_torch
import torch

from workers.errors import InvalidRequestError

JSON_OBJECT_SCHEMA = '{"type": "object"}'  # response_format json_object: any JSON object


class Grammars:
    """The worker's tokenizer as llguidance sees it, and compiled grammars by schema text."""

    def __init__(self, tokenizer: Any, vocab_size: int):
        self._hf, self._vocab = tokenizer, vocab_size
        self._tok: llguidance.LLTokenizer | None = None
        self._compile = lru_cache(maxsize=256)(self._compile_uncached)

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        if self._tok is None:
            self._tok = llguidance.hf.from_tokenizer(self._hf, n_vocab=self._vocab)
        return self._tok

    @property
    def eos(self) -> int | None:
        return self.tokenizer.eos_token if self._tok is not None else None

    def _compile_uncached(self, schema: str) -> str:
        try:
            json.loads(schema)
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        except (ValueError, TypeError) as e:
            raise InvalidRequestError(f"response_format: invalid JSON schema: {e}", param="response_format") from e
        error = llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error:
            raise InvalidRequestError(f"response_format: invalid JSON schema: {error}", param="response_format")
        return grammar

    def check(self, schema: str) -> None:
        self._compile(schema)

    def matcher(self, schema: str) -> llguidance.LLMatcher:
        return llguidance.LLMatcher(self.tokenizer, self._compile(schema))


def constrain(logits: torch.Tensor, matchers: list[llguidance.LLMatcher | None]) -> torch.Tensor:
    """logits: [R, vocab]. Rows with a matcher get the grammar's mask (a copy is made only if any does)."""
    rows = [r for r, m in enumerate(matchers) if m is not None]
    if not rows:
        return logits
    out = logits.clone()
    mask = llg_torch.allocate_token_bitmask(len(rows), out.shape[-1])  # [C, ceil(vocab / 32)] int32
    for i, r in enumerate(rows):
        llg_torch.fill_next_token_bitmask(matchers[r], mask, i)
    view = out[torch.tensor(rows)]  # [C, vocab]
    llg_torch.apply_token_bitmask_inplace(view, mask)
    out[torch.tensor(rows)] = view
    return out


def advance(matchers: list[llguidance.LLMatcher | None], tokens: list[int], eos: int | None) -> None:
    """Feeds each constrained row its chosen token (the end-of-sequence token only ends it)."""
    for m, t in zip(matchers, tokens, strict=True):
        if m is not None and not m.is_stopped() and t != eos:
            m.consume_token(t)
