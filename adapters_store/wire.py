"""Coordination between the gateway and the workers, defined once: the Redis key names and payloads
(worker registry, adapter placement) and the gateway → worker HTTP wire schemas. Versioned by
`SCHEMA_VERSION`; torch-free, so both `server/` and `workers/` import it.

Redis layout (all keys under `adapterd:v1:`; Redis 6.2 commands only):

- `worker:{id}`        STRING, JSON `WorkerInfo`, written with `SET … EX ttl` on every heartbeat.
                       A worker that stops heartbeating disappears when the key expires. Signed with the
                       cluster secret (`WorkerInfo.signature`); the gateway ignores records that fail it,
                       and records whose signed `heartbeat_at` is older than their signed `ttl_s` (a replay).
- `workers`            SET of worker ids that have heartbeated; readers drop ids whose key expired.
- `placement:{name}`   SET of worker ids holding adapter `name` resident; refreshed (with an expiry of a
                       few TTLs) on each heartbeat; readers intersect it with the live workers.

Fine-tune jobs (`FineTuneJob` and friends below; written by the gateway and the trainers):

- `ft:job:{job_id}`    HASH, one field per `FineTuneJob` field, each value JSON-encoded; state changes go
                       through `JOB_UPDATE_LUA` (compare-and-set on `status` / `attempt`), so a stale
                       trainer or a late cancel never overwrites a newer state. Field `cancel_requested`
                       ("true") is the cancellation flag the training loop checks every step.
- `ft:jobs:{tenant}`   ZSET of the tenant's job ids, scored by creation time in ms (listing, newest first).
- `ft:events:{job_id}` STREAM of `JobEvent`s (field `event`, JSON); the entry id is the event's cursor.
- `ft:checkpoints:{job_id}` LIST of `JobCheckpoint` JSON, oldest first.
- `ft:queue:{model}`   STREAM, one entry `{job_id}` per queued job of base model `model`; consumer group
                       `trainers` (`FT_GROUP`). A trainer claims with XREADGROUP, keeps its claim fresh with
                       `XCLAIM … JUSTID` (`KEEP_CLAIM_LUA`, only while it still owns it), XACKs + XDELs when
                       the job ends; a claim idle past the claim timeout is taken over with XAUTOCLAIM, and the
                       pending entry's delivery count bounds the attempts.
- `trainer:{id}`       STRING, JSON `TrainerInfo`, `SET … EX ttl` on every trainer heartbeat; `trainers` SET of
                       their ids (the gateway accepts jobs for the base models that live trainers hold).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field

from adapters_store.cluster_auth import ClusterSigner

SCHEMA_VERSION = 1
KEY_PREFIX = f"adapterd:v{SCHEMA_VERSION}"
WORKERS_SET = f"{KEY_PREFIX}:workers"
PLACEMENT_TTL_FACTOR = 3  # placement sets live this many heartbeat TTLs after their last refresh
WORKER_RECORD = "worker"  # the record kind a worker's registration is signed as
RECORD_CLOCK_SKEW_S = 2.0  # a worker's clock may be this far from the gateway's


def worker_key(worker_id: str) -> str:
    return f"{KEY_PREFIX}:worker:{worker_id}"


def placement_key(adapter: str) -> str:
    return f"{KEY_PREFIX}:placement:{adapter}"


class JsonRecord:
    """A dataclass stored as one compact JSON object; reading ignores fields this version does not know."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> Self:
        data = json.loads(raw)
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


@dataclass
class WorkerInfo(JsonRecord):
    """What a worker announces about itself on every heartbeat."""

    worker_id: str
    url: str  # base URL the gateway calls, e.g. http://127.0.0.1:9001
    model_id: str
    capacity: int  # requests it runs at once (the engine's max batch)
    in_flight: int = 0
    resident_adapters: list[str] = field(default_factory=list)
    max_adapters: int = 0
    base_model: dict | None = None  # the base's config.json fields uploads are checked against (BaseModelSpec)
    heartbeat_at: float = field(default_factory=time.time)
    max_model_len: int = 0  # tokens per sequence, prompt included (0: an older worker that did not say)
    version: int = SCHEMA_VERSION
    # load as the console shows it (workers.service.load_report): tokens_per_s, running, queue, fusion, medusa,
    # device_adapters; additive, so older readers ignore it
    stats: dict = field(default_factory=dict)
    ttl_s: float = 0.0  # how long this record stays valid after `heartbeat_at` (the heartbeat's TTL)
    signature: str = ""  # the cluster secret's record signature over every other field (`signed_by`)

    def _signed_payload(self) -> bytes:
        fields = {k: v for k, v in asdict(self).items() if k != "signature"}
        return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()

    def signed_by(self, signer: ClusterSigner) -> WorkerInfo:
        """This record with its signature set: what a heartbeat publishes."""
        return replace(self, signature=signer.sign_record(WORKER_RECORD, self._signed_payload()))

    def verified_by(self, signer: ClusterSigner) -> bool:
        """The gateway routes only to workers whose record verifies (written by a cluster member)."""
        return signer.record_valid(WORKER_RECORD, self._signed_payload(), self.signature)

    def fresh_at(self, now: float, max_age_s: float) -> bool:
        """Whether the signed heartbeat time is recent: at most its TTL (capped at `max_age_s`; the cap alone
        when it names none) before `now`, give or take RECORD_CLOCK_SKEW_S. An old record re-written to Redis
        (a replay, say after the worker died and another process took its port) is not."""
        limit = min(self.ttl_s or max_age_s, max_age_s)
        return -RECORD_CLOCK_SKEW_S <= now - self.heartbeat_at <= limit + RECORD_CLOCK_SKEW_S


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
    # added in issue 17 (defaults keep older payloads valid):
    top_logprobs: int = Field(0, ge=0, le=20)  # with logprobs: the model's top-k at each position
    n: int = Field(1, ge=1)  # completions from one prefill (the worker caps it at its max batch)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = Field(1.0, gt=0.0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    typical_p: float = Field(1.0, gt=0.0, le=1.0)
    logit_bias: dict[int, float] = Field(default_factory=dict)  # token id → added to its logit
    stop_token_ids: list[int] = Field(default_factory=list)
    json_schema: str | None = None  # structured output: a JSON schema (as text) the completion must satisfy


class MergeMember(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(min_length=1)  # a source, as `adapter_path`
    weight: float


class WorkerMerge(BaseModel):
    """A per-request merge (`adapters_store.merge`): the worker builds it once from the members and keeps
    it under the request's `adapter` name, which the gateway derives from the members' contents."""

    model_config = ConfigDict(extra="forbid")
    members: list[MergeMember] = Field(min_length=1)
    strategy: Literal["linear", "ties", "dare_linear", "dare_ties"] = "linear"
    density: float = Field(1.0, gt=0.0, le=1.0)
    majority_sign_method: Literal["total", "frequency"] = "total"


class WorkerGenerateRequest(BaseModel):
    """Exactly one of `prompt` (text), `prompt_ids` (token ids) or `messages` (rendered with the
    model's chat template on the worker) is set."""

    model_config = ConfigDict(extra="forbid")
    request_id: str = ""
    prompt: str | None = None
    prompt_ids: list[int] | None = None
    messages: list[ChatMessage] | None = None
    adapter: str | None = None  # the engine-level adapter name; None → base model
    adapter_path: str | None = None  # its source if it is not resident (`adapters_store.adapter_source`)
    merge: WorkerMerge | None = None  # `adapter` is this merge (built from the members if not resident)
    medusa_path: str | None = None  # the source of Medusa heads for `adapter` (or the base), if any
    params: WorkerSampling = Field(default_factory=WorkerSampling)
    stream: bool = False
    truncate: int | None = Field(None, ge=1)  # keep only the prompt's last `truncate` tokens (TGI/LoRAX)
    echo: bool = False  # non-streamed: the result's `prompt` lists the prompt's tokens (with params.logprobs,
    # their raw logprobs and top-k too)


class WorkerTokenEvent(BaseModel):
    """One SSE `data:` payload of a streamed worker response; the last one has `finish_reason`."""

    token_id: int
    text: str
    logprob: float | None = None
    index: int
    prompt_tokens: int
    finish_reason: str | None = None
    top_logprobs: list[tuple[int, str, float]] | None = None  # (token id, text, raw logprob), best first
    choice: int = 0  # which of the n completions


class WorkerChoice(BaseModel):
    """One of n completions (n > 1)."""

    index: int
    text: str
    token_ids: list[int]
    tokens: list[str]
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, str, float]]] | None = None
    finish_reason: str


class WorkerPromptEcho(BaseModel):
    """The prompt's tokens as the model saw them (echo); logprobs: None for the first token."""

    text: str  # the prompt as given (text prompts), or its tokens decoded
    token_ids: list[int]
    tokens: list[str]  # each token's text, decoded alone
    logprobs: list[float | None] | None = None
    top_logprobs: list[list[tuple[int, str, float]] | None] | None = None  # per token (None first), best first


class WorkerGenerateResult(BaseModel):
    text: str
    token_ids: list[int]
    tokens: list[str]  # each token's text delta, aligned with token_ids
    logprobs: list[float] | None = None
    prompt_tokens: int
    completion_tokens: int  # over all choices
    finish_reason: str
    worker_id: str
    speculative: dict | None = None  # Medusa: {"decode_steps", "tokens_per_step", "mean_tokens_per_step"}
    top_logprobs: list[list[tuple[int, str, float]]] | None = None  # per token: (id, text, raw logprob)
    choices: list[WorkerChoice] | None = None  # n > 1: every completion (the fields above are choice 0's)
    prompt: WorkerPromptEcho | None = None  # with `echo`


class WorkerTokenizeRequest(BaseModel):
    """Exactly one of `prompt` or `messages` (rendered with the chat template, generation prompt added)."""

    model_config = ConfigDict(extra="forbid")
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    offsets: bool = False  # also each token's [start, stop) character span in `prompt`


class WorkerDetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tokens: list[int]


class AdapterLoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200)
    path: str = Field(min_length=1)  # a source (`adapters_store.adapter_source`): never a filesystem path
    kind: str | None = None  # "medusa": heads, attached to `attach_to` (an adapter) or to the base
    attach_to: str | None = Field(None, min_length=1, max_length=200)


class AdapterUnloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200)


# ---- fine-tune jobs ------------------------------------------------------------------------------

FT_GROUP = "trainers"
TRAINERS_SET = f"{KEY_PREFIX}:trainers"
JOB_STATUSES = ("validating_files", "queued", "running", "succeeded", "failed", "cancelled")
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})


def ft_job_key(job_id: str) -> str:
    return f"{KEY_PREFIX}:ft:job:{job_id}"


def ft_jobs_key(tenant: str) -> str:
    return f"{KEY_PREFIX}:ft:jobs:{tenant}"


def ft_events_key(job_id: str) -> str:
    return f"{KEY_PREFIX}:ft:events:{job_id}"


def ft_checkpoints_key(job_id: str) -> str:
    return f"{KEY_PREFIX}:ft:checkpoints:{job_id}"


def ft_queue_key(model: str) -> str:
    return f"{KEY_PREFIX}:ft:queue:{model}"


def trainer_key(trainer_id: str) -> str:
    return f"{KEY_PREFIX}:trainer:{trainer_id}"


@dataclass
class FineTuneJob:
    """A fine-tune job as stored (OpenAI's `fine_tuning.job` fields plus progress and bookkeeping)."""

    id: str
    model: str  # the base model id
    organization_id: str  # the tenant that created it
    training_file: str
    method: dict  # validated and resolved: adapters_store.training_methods.validate_method(…, examples)
    seed: int
    created_at: int
    status: str = "validating_files"
    validation_file: str | None = None
    suffix: str | None = None
    compression: dict | None = None
    fine_tuned_model: str | None = None
    finished_at: int | None = None
    started_at: int | None = None
    error: dict | None = None  # {"code", "message", "param"}
    trained_tokens: int | None = None
    estimated_finish: int | None = None
    step: int = 0
    total_steps: int | None = None
    train_loss: float | None = None
    validation_loss: float | None = None
    attempt: int = 0  # deliveries so far; a trainer writes only while the attempt is its own
    trainer: str | None = None
    cancel_requested: bool = False
    method_type: str | None = None  # the method's type as requested ("supervised" is a LoRA)
    metadata: dict | None = None  # the creator's key-value pairs, returned as given
    result_files: list[str] = field(default_factory=list)  # file ids: the metrics CSV once the job ends
    version: int = SCHEMA_VERSION

    def to_hash(self) -> dict[str, str]:
        return {k: json.dumps(v, separators=(",", ":")) for k, v in asdict(self).items()}

    @classmethod
    def from_hash(cls, raw: dict) -> FineTuneJob | None:
        if not raw:
            return None
        data = {(k.decode() if isinstance(k, bytes) else k): json.loads(v) for k, v in raw.items()}
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def encode_fields(fields: dict) -> list[str]:
    """Flattened `field, JSON value, …` for `JOB_UPDATE_LUA` / HSET."""
    out: list[str] = []
    for k, v in fields.items():
        out += [k, json.dumps(v, separators=(",", ":"))]
    return out


# KEYS[1] = job hash. ARGV = n_expect, then n_expect × (field, count, allowed JSON values…), then the
# field/value pairs to set. Returns 1 if every expectation held and the fields were set, else 0.
JOB_UPDATE_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local i = 2
for _ = 1, tonumber(ARGV[1]) do
  local field, n = ARGV[i], tonumber(ARGV[i + 1])
  local current, ok = redis.call('HGET', KEYS[1], field), false
  for j = 1, n do if current == ARGV[i + 1 + j] then ok = true end end
  if not ok then return 0 end
  i = i + 2 + n
end
if i <= #ARGV then redis.call('HSET', KEYS[1], unpack(ARGV, i)) end
return 1
"""


def job_update_args(expect: dict[str, list], fields: dict) -> list[str]:
    args: list[str] = [str(len(expect))]
    for name, allowed in expect.items():
        args += [name, str(len(allowed)), *(json.dumps(v, separators=(",", ":")) for v in allowed)]
    return args + encode_fields(fields)


# KEYS[1] = queue stream. ARGV = group, consumer, entry id. Refreshes the claim (idle → 0, delivery count
# unchanged) only while `consumer` still owns the entry; returns 1 if so, 0 if it was taken over or acked.
KEEP_CLAIM_LUA = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if p[1] == nil or p[1][2] ~= ARGV[2] then return 0 end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID')
return 1
"""


@dataclass
class JobEvent(JsonRecord):
    """One `fine_tuning.job.event` (the id is the stream entry's, added when read)."""

    message: str
    level: str = "info"  # info | warn | error
    type: str = "message"  # message | metrics
    data: dict | None = None  # metrics: step, total_steps, train_loss, tokens_per_s
    created_at: int = field(default_factory=lambda: int(time.time()))


@dataclass
class JobCheckpoint(JsonRecord):
    """One periodic checkpoint of a job: the step, its metrics and where its files are in the store."""

    id: str
    fine_tuning_job_id: str
    step_number: int
    metrics: dict
    location: str  # backend key prefix of the checkpoint's files
    created_at: int = field(default_factory=lambda: int(time.time()))


@dataclass
class TrainerInfo(JsonRecord):
    trainer_id: str
    model_id: str
    job_id: str | None = None
    heartbeat_at: float = field(default_factory=time.time)
    version: int = SCHEMA_VERSION


def event_id(stream_id: str | bytes) -> str:
    return "ftevent-" + (stream_id.decode() if isinstance(stream_id, bytes) else stream_id)


def stream_id_of(event: str) -> str | None:
    """The stream id inside an event id, or None if it is not one of ours."""
    raw = event.removeprefix("ftevent-")
    ms, dash, seq = raw.partition("-")
    return raw if event.startswith("ftevent-") and dash and ms.isdigit() and seq.isdigit() else None


def owned_name(owner: str, name: str) -> str:
    """The full name of tenant `owner`'s adapter `name` (`NAME[@VERSION]`), as the store keeps it."""
    return f"{owner}/{name}"


def fine_tuned_name(model: str, suffix: str | None, job_id: str, checkpoint_step: int | None = None) -> str:
    """`ft:{base}:{suffix}:{job-id}`, the adapter name a job's result is published under (characters the
    store's names do not allow become '-'); with `checkpoint_step`, the name of that checkpoint's adapter
    (`…:{job-id}:ckpt-step-{N}`, OpenAI's `fine_tuned_model_checkpoint`). At most 100 characters."""
    clean = lambda s: re.sub(r"[^A-Za-z0-9._-]", "-", s).strip(".") or "x"
    tail = f":{clean(suffix or 'ft')}:{job_id}" + (f":ckpt-step-{checkpoint_step}" if checkpoint_step else "")
    head = f"ft:{clean(model)}"
    return head[: 100 - len(tail)] + tail
