"""Coordination between the gateway and the workers, defined once: the Redis key names and payloads
(worker registry, adapter placement) and the gateway → worker HTTP wire schemas. Versioned by
`SCHEMA_VERSION`; torch-free, so both `server/` and `workers/` import it.

Redis layout (all keys under `adapterd:v1:`; Redis 6.2 commands only):

- `worker:{id}`        STRING, JSON `WorkerInfo`, written with `SET … EX ttl` on every heartbeat.
                       A worker that stops heartbeating disappears when the key expires.
- `workers`            SET of worker ids that have heartbeated; readers drop ids whose key expired.
- `placement:{name}`   SET of worker ids holding adapter `name` resident; refreshed (with an expiry of a
                       few TTLs) on each heartbeat; readers intersect it with the live workers.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1
KEY_PREFIX = f"adapterd:v{SCHEMA_VERSION}"
WORKERS_SET = f"{KEY_PREFIX}:workers"
PLACEMENT_TTL_FACTOR = 3  # placement sets live this many heartbeat TTLs after their last refresh


def worker_key(worker_id: str) -> str:
    return f"{KEY_PREFIX}:worker:{worker_id}"


def placement_key(adapter: str) -> str:
    return f"{KEY_PREFIX}:placement:{adapter}"


@dataclass
class WorkerInfo:
    """What a worker announces about itself on every heartbeat."""

    worker_id: str
    url: str  # base URL the gateway calls, e.g. http://127.0.0.1:9001
    model_id: str
    capacity: int  # requests it runs at once (the engine's max batch)
    in_flight: int = 0
    resident_adapters: list[str] = field(default_factory=list)
    max_adapters: int = 0
    heartbeat_at: float = field(default_factory=time.time)
    version: int = SCHEMA_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> WorkerInfo:
        data = json.loads(raw)
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


# ---- gateway → worker HTTP wire ----------------------------------------------------------------


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | None = None


class WorkerSampling(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False


class WorkerGenerateRequest(BaseModel):
    """Exactly one of `prompt` (text), `prompt_ids` (token ids) or `messages` (rendered with the
    model's chat template on the worker) is set."""

    model_config = ConfigDict(extra="forbid")
    request_id: str = ""
    prompt: str | None = None
    prompt_ids: list[int] | None = None
    messages: list[ChatMessage] | None = None
    adapter: str | None = None  # the engine-level adapter name; None → base model
    adapter_path: str | None = None  # where to load it from if it is not resident
    params: WorkerSampling = Field(default_factory=WorkerSampling)
    stream: bool = False


class WorkerTokenEvent(BaseModel):
    """One SSE `data:` payload of a streamed worker response; the last one has `finish_reason`."""

    token_id: int
    text: str
    logprob: float | None = None
    index: int
    prompt_tokens: int
    finish_reason: str | None = None


class WorkerGenerateResult(BaseModel):
    text: str
    token_ids: list[int]
    tokens: list[str]  # each token's text delta, aligned with token_ids
    logprobs: list[float] | None = None
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    worker_id: str


class AdapterLoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200)
    path: str = Field(min_length=1)


class AdapterUnloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200)
