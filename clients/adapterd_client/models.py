"""Typed response models of the SDK (checked against the server's OpenAPI schema in the tests).
Unknown fields are kept, so a newer server never breaks an older SDK."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow")


class Usage(_Model):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(_Model):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float]] | None = None
    text_offset: list[int]


class CompletionChoice(_Model):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class Completion(_Model):
    """A /v1/completions response, or one streamed chunk of it."""

    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TokenLogprob(_Model):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[dict] = []


class ChoiceLogprobs(_Model):
    content: list[TokenLogprob] | None = None


class ChatMessage(_Model):
    role: str
    content: str | None = None


class ChatChoice(_Model):
    index: int
    message: ChatMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletion(_Model):
    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(_Model):
    role: str | None = None
    content: str | None = None


class ChatChunkChoice(_Model):
    index: int
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Model):
    id: str
    object: str = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(_Model):
    id: str
    object: str = "model"
    created: int = 0
    owned_by: str = "adapterd"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(_Model):
    object: str = "list"
    data: list[ModelCard]


class Token(_Model):
    id: int
    text: str
    logprob: float | None = None
    special: bool = False


class GenerateDetails(_Model):
    finish_reason: str
    generated_tokens: int
    prompt_tokens: int | None = None
    seed: int | None = None
    tokens: list[Token] = []


class GenerateResponse(_Model):
    generated_text: str
    details: GenerateDetails | None = None


class StreamDetails(_Model):
    finish_reason: str
    generated_tokens: int
    prompt_tokens: int | None = None
    seed: int | None = None


class StreamResponse(_Model):
    token: Token
    generated_text: str | None = None
    details: StreamDetails | None = None


class AdapterVersionInfo(_Model):
    id: str
    name: str
    version: int
    kind: str
    rank: int
    alpha: float
    targets: list[str]
    base_fingerprint: str
    stored_bytes: int
    original_bytes: int
    dense_bytes: int
    compression: dict | None = None
    compression_ratio: float
    owner: str
    public: bool
    created: float


class AdapterInfo(_Model):
    object: str = "adapter"
    name: str
    latest: int
    owner: str
    public: bool
    versions: list[AdapterVersionInfo]


class AdapterList(_Model):
    object: str = "list"
    data: list[AdapterInfo]


class AdapterDeleted(_Model):
    object: str = "adapter.deleted"
    name: str
    versions: list[int]
    deleted: bool = True


class FileObject(_Model):
    id: str
    object: str = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str = "processed"
    records: int


class FileList(_Model):
    object: str = "list"
    data: list[FileObject]
    has_more: bool = False


class FileDeleted(_Model):
    id: str
    object: str = "file"
    deleted: bool = True


class TrainerStatus(_Model):
    id: str
    model: str
    job: str | None = None


class ReadyStatus(_Model):
    """`GET /ready`: the gateway is ready (Redis reachable, a worker registered), with what is alive."""

    status: str
    workers: int
    model: str | None = None
    trainers: int = 0
    trainer_list: list[TrainerStatus] = []


class JobError(_Model):
    code: str
    message: str
    param: str | None = None


class FineTuningJob(_Model):
    id: str
    object: str = "fine_tuning.job"
    created_at: int
    finished_at: int | None = None
    model: str
    fine_tuned_model: str | None = None
    organization_id: str
    status: str
    training_file: str
    validation_file: str | None = None
    method: dict
    hyperparameters: dict | None = None
    seed: int
    suffix: str | None = None
    compression: dict | None = None
    metadata: dict | None = None
    integrations: list = []
    error: JobError | None = None
    trained_tokens: int | None = None
    estimated_finish: int | None = None
    result_files: list[str] = []
    step: int = 0
    total_steps: int | None = None
    train_loss: float | None = None
    validation_loss: float | None = None

    @property
    def finished(self) -> bool:
        return self.status in ("succeeded", "failed", "cancelled")


class FineTuningJobList(_Model):
    object: str = "list"
    data: list[FineTuningJob]
    has_more: bool


class FineTuningJobEvent(_Model):
    id: str
    object: str = "fine_tuning.job.event"
    created_at: int
    level: str
    message: str
    type: str = "message"
    data: dict | None = None


class FineTuningJobEventList(_Model):
    object: str = "list"
    data: list[FineTuningJobEvent]
    has_more: bool


class FineTuningJobCheckpoint(_Model):
    id: str
    object: str = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuning_job_id: str
    fine_tuned_model_checkpoint: str
    step_number: int
    metrics: dict


class FineTuningJobCheckpointList(_Model):
    object: str = "list"
    data: list[FineTuningJobCheckpoint]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None
