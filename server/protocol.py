"""Wire schemas of the gateway's public API, in one place: OpenAI-compatible completions, chat and models,
the native TGI/LoRAX-style generate, and the error shape. Requests reject unknown fields (OpenAI) so a
typo is a clear 4xx rather than a silently ignored option; the native schema tolerates the extra
`null` fields that the LoRAX/TGI clients always send."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# ---- errors --------------------------------------------------------------------------------------


class ErrorBody(BaseModel):
    type: str
    message: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


# ---- shared --------------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


FinishReason = Literal["stop", "length", "cancelled"] | None


class _SamplingFields(BaseModel):
    """Fields both OpenAI request kinds share (plus the vLLM-style extensions top_k, ignore_eos)."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    n: int = Field(1, ge=1, description="completions per prompt, sharing one prefill (at most MAX_N)")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    user: str | None = None
    ignore_eos: bool = False
    # vLLM's extensions
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    typical_p: float = Field(1.0, gt=0.0, le=1.0)
    stop_token_ids: list[int] | None = Field(None, max_length=64)
    logit_bias: dict[str, float] | None = Field(
        None, max_length=300, description="token id (as a string) → bias in [-100, 100] added to its logit")
    response_format: dict | None = Field(
        None, description='{"type": "text" | "json_object"} or {"type": "json_schema", "json_schema": {"name", '
                          '"schema", "strict"}}: the output is JSON (valid against the schema)')

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        items = [v] if isinstance(v, str) else (v or [])
        if len(items) > 16 or any(not s for s in items):
            raise ValueError("stop takes at most 16 non-empty strings")
        return v

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


# ---- completions ----------------------------------------------------------------------------------


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    merged_adapters: dict | None = Field(
        None, description='a per-request merge instead of one adapter: {"ids": [...], "weights": [...], '
                          '"strategy": "linear"|"ties", "density": 0.5, "majority_sign_method": "total"}')
    logprobs: int | None = Field(None, ge=0, description="top-k logprobs per token, 0-20")
    echo: bool = Field(False, description="the prompt precedes the completion in `text`; with `logprobs`, the "
                                           "prompt's tokens lead `logprobs` too (the first with null). Not with stream")
    best_of: int | None = Field(None, ge=1, description="equal to n (or unset): ranking beyond n is not supported")
    suffix: str | None = Field(None, max_length=0, description="not supported")


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None  # None only for an echoed prompt's first token
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


# ---- chat -----------------------------------------------------------------------------------------


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    merged_adapters: dict | None = Field(
        None, description='a per-request merge instead of one adapter: {"ids": [...], "weights": [...], '
                          '"strategy": "linear"|"ties", "density": 0.5, "majority_sign_method": "total"}')
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, description="0-20; needs logprobs")
    tools: list[dict] | None = Field(None, description="not supported: any value → 400 naming `tools`")
    tool_choice: str | dict | None = Field(None, description='"none" only (no tool calls are ever made)')


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


# ---- models ---------------------------------------------------------------------------------------


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "adapterd"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None  # tokens per sequence, prompt included (as vLLM reports it)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---- vLLM's extra endpoints ---------------------------------------------------------------------


class TokenizeRequest(BaseModel):
    """vLLM's (`prompt` or `messages`) or TGI/LoRAX's (`inputs`, answered as a list of tokens with offsets)."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | None = None
    inputs: str | None = Field(None, description="TGI/LoRAX: the text; the answer is [{id, text, start, stop}]")
    messages: list[ChatMessageIn] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = Field(True, description="messages only; true (the only value supported)")


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[int] = Field(max_length=1_000_000)


class DetokenizeResponse(BaseModel):
    prompt: str


class LoadLoraAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(min_length=1, max_length=100)
    lora_path: str = Field(min_length=1, max_length=4096)


class UnloadLoraAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(min_length=1, max_length=100)
    lora_int_id: int | None = None


# ---- native (TGI / LoRAX) -------------------------------------------------------------------------


class GenerateParameters(BaseModel):
    """LoRAX's / TGI's parameters. Every field their clients send is listed: the ones not honoured are
    accepted only at their defaults (a 400 naming the field otherwise, see native_service); anything else
    is refused."""

    model_config = ConfigDict(extra="forbid")
    adapter_id: str | None = None
    adapter_source: str | None = Field(None, description='"local" or "s3" (the store); "hub" is refused')
    api_token: str | None = Field(None, description="null only (hub tokens are not used)")
    merged_adapters: dict | None = Field(
        None, description='a per-request merge instead of one adapter: {"ids": [...], "weights": [...], '
                          '"strategy": "linear"|"ties", "density": 0.5, "majority_sign_method": "total"}')
    max_new_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    seed: int | None = None
    stop: list[str] = Field(default_factory=list, max_length=16)
    details: bool = False
    do_sample: bool = False
    return_full_text: bool = False
    ignore_eos: bool = False
    ignore_eos_token: bool = False  # LoRAX's name for ignore_eos
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)  # TGI
    typical_p: float | None = Field(None, gt=0.0, le=1.0)
    truncate: int | None = Field(None, ge=1, description="keep only the prompt's last `truncate` tokens")
    best_of: int | None = Field(None, ge=1, description="1 or null only")
    watermark: bool = Field(False, description="false only")
    decoder_input_details: bool = Field(False, description="false only (no prompt logprobs)")
    return_k_alternatives: int | None = Field(None, ge=0, description="top-k alternatives per token, 0-20")
    top_n_tokens: int | None = Field(None, ge=0, description="TGI's name for return_k_alternatives")
    response_format: dict | None = Field(
        None, description='LoRAX: {"type": "json_object", "schema": {...}}: the output is JSON valid against it')
    grammar: dict | None = Field(None, description="TGI; null only")


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inputs: str = Field(min_length=1)
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    stream: bool = False


class AlternativeToken(BaseModel):
    id: int
    text: str
    logprob: float


class NativeToken(BaseModel):
    id: int
    text: str
    logprob: float | None = None
    special: bool = False
    alternative_tokens: list[AlternativeToken] | None = None


class SpeculativeDetails(BaseModel):
    """Medusa speculative decoding: tokens emitted by each decode step (1 when a step decoded plainly), and
    whether and how the request speculated (the worker's cost model, workers/engine/speculation_policy.py)."""

    decode_steps: int
    tokens_per_step: list[int]
    mean_tokens_per_step: float
    used: bool | None = None  # whether the cost model chose to verify trees for this request
    reason: str | None = None  # its last decision: "expected gain" | "cost model" | "probe" | "batch size" | "always"
    verified_steps: int | None = None  # steps that verified a tree (probes included)
    probe_steps: int | None = None  # trees verified only to refresh the acceptance estimates
    max_tree_size: int | None = None  # the largest tree verified, root included (0: none)
    expected_tokens_per_step: float | None = None  # the cost model's estimate at its last decision
    cost_ratio: float | None = None  # that tree's measured cost in one-token steps


class GenerateDetails(BaseModel):
    finish_reason: Literal["length", "eos_token", "stop_sequence"]
    generated_tokens: int
    prompt_tokens: int
    seed: int | None = None
    prefill: list[NativeToken] = Field(default_factory=list)  # TGI: empty without decoder_input_details
    tokens: list[NativeToken] = Field(default_factory=list)
    speculative: SpeculativeDetails | None = None


class GenerateResponse(BaseModel):
    generated_text: str
    details: GenerateDetails | None = None


class StreamDetails(BaseModel):
    finish_reason: Literal["length", "eos_token", "stop_sequence"]
    generated_tokens: int
    prompt_tokens: int
    seed: int | None = None
    speculative: SpeculativeDetails | None = None


class StreamResponse(BaseModel):
    token: NativeToken
    generated_text: str | None = None
    details: StreamDetails | None = None


# ---- adapters (registry and uploads) --------------------------------------------------------------


class AdapterVersionInfo(BaseModel):
    id: str  # name@version: the model id that addresses exactly this version
    name: str
    version: int
    kind: Literal["lora", "compeft", "s2ft", "medusa"]
    rank: int
    alpha: float
    targets: list[str]
    base_fingerprint: str
    stored_bytes: int  # config + weights as stored
    original_bytes: int  # the weights file as uploaded
    dense_bytes: int  # the weights as float32
    compression: dict | None = None
    compression_ratio: float
    owner: str
    public: bool
    created: float
    attach_to: str | None = None  # medusa: the adapter version the heads serve (None: the base)


class AdapterInfo(BaseModel):
    object: Literal["adapter"] = "adapter"
    name: str
    latest: int
    owner: str
    public: bool  # the latest version is public
    versions: list[AdapterVersionInfo]


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterInfo]


class MergeSaveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=100)
    merged_adapters: dict = Field(description='{"ids": [...], "weights": [...], "strategy": "linear"|"ties", '
                                              '"density": 0.5, "majority_sign_method": "total"}')
    public: bool = False


class AdapterImportRequest(BaseModel):
    """An operator's import of a folder from the drop-in directory into a tenant's namespace in the store."""

    model_config = ConfigDict(extra="forbid")
    folder: str = Field(min_length=1, max_length=201, description="NAME or NAME/VERSION under DATA_DIR/adapters")
    owner: str = Field(min_length=1, max_length=64, description="the tenant the adapter will belong to")
    name: str | None = Field(None, min_length=1, max_length=100, description="default: the folder's NAME")
    public: bool = False


class AdapterDeleted(BaseModel):
    object: Literal["adapter.deleted"] = "adapter.deleted"
    name: str
    versions: list[int]
    deleted: bool = True


# ---- fine-tune files and jobs (OpenAI's shapes) ---------------------------------------------------


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["processed"] = "processed"
    records: int  # validated records in the file


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    has_more: bool = False


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class FineTuningJobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=200, description="the base model id")
    training_file: str = Field(min_length=1, max_length=64)
    validation_file: str | None = Field(None, min_length=1, max_length=64)
    method: dict | None = Field(None, description='{"type": "supervised"|"lora"|"s2ft"|"medusa", "<type>": '
                                '{"hyperparameters": {...}}} or flat {"type": ..., ...hyperparameters}; '
                                'default supervised (LoRA) with "auto" hyperparameters')
    hyperparameters: dict | None = Field(None, description="OpenAI's older form: n_epochs, batch_size, "
                                         'learning_rate_multiplier, each "auto" or a number')
    suffix: str | None = Field(None, min_length=1, max_length=40, pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    compression: dict | None = Field(None, description='{"method":"compeft","density":0.1,"alpha":1.0}')
    metadata: dict[str, str] | None = Field(None, description="up to 16 string pairs, returned on the job")
    integrations: list | None = Field(None, description="not supported: a non-empty list is refused")


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class FineTuningJob(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    finished_at: int | None = None
    model: str
    fine_tuned_model: str | None = None
    organization_id: str
    status: Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]
    training_file: str
    validation_file: str | None = None
    method: dict
    hyperparameters: dict | None = None
    seed: int
    suffix: str | None = None
    compression: dict | None = None
    metadata: dict | None = None
    integrations: list = Field(default_factory=list)
    error: JobError | None = None
    trained_tokens: int | None = None
    estimated_finish: int | None = None
    result_files: list[str] = Field(default_factory=list)
    step: int = 0
    total_steps: int | None = None
    train_loss: float | None = None
    validation_loss: float | None = None


class FineTuningJobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJob]
    has_more: bool


class FineTuningJobEvent(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"] = "message"
    data: dict | None = None


class FineTuningJobEventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJobEvent]
    has_more: bool


class FineTuningJobCheckpoint(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuning_job_id: str
    fine_tuned_model_checkpoint: str
    step_number: int
    metrics: dict


class FineTuningJobCheckpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJobCheckpoint]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None
