"""One request's state inside the engine, from admission to finish."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from workers.adapters.residency import BASE_PLACEMENT, DevicePlacement
from workers.engine.detokenizer import IncrementalText
from workers.engine.speculation_policy import SpeculationLog
from workers.engine.types import FinishReason, GenerationRequest


@dataclass
class Sequence:
    request: GenerationRequest
    text: IncrementalText
    generator: torch.Generator | None  # per-request RNG: sampling is reproducible under any batching
    stop_ids: frozenset[int]
    kv_slot: int = -1
    placement: DevicePlacement = BASE_PLACEMENT  # where its adapter sits on the device
    num_cached: int = 0  # positions already written to the KV cache
    output: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    medusa_hidden: torch.Tensor | None = None  # [hidden] that predicted last_token: Medusa heads read it
    tokens_per_step: list[int] = field(default_factory=list)  # decode steps of a row with heads
    speculation: SpeculationLog = field(default_factory=SpeculationLog)  # the cost model's decisions for it
    choice: int = 0  # which of the request's n completions this is
    forks: list[Sequence] = field(default_factory=list)  # the other completions, until the prompt is cached
    matcher: Any = None  # structured output: this completion's llguidance matcher (workers.engine.structured)

    @property
    def prompt(self) -> tuple[int, ...]:
        return self.request.prompt_ids

    @property
    def in_prefill(self) -> bool:
        return self.num_cached < len(self.prompt)

    @property
    def last_token(self) -> int:
        return self.output[-1]
