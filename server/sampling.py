"""OpenAI/vLLM sampling fields → the worker's `WorkerSampling`, with the checks whose failures are a 400
naming the field (caps documented in the README). Token ids are checked against the vocabulary by the
worker, before anything runs."""

from __future__ import annotations

import json

from adapters_store.wire import WorkerSampling
from server.errors import InvalidRequestError
from server.protocol import ChatCompletionRequest, CompletionRequest

MAX_N = 8  # completions per prompt (n, best_of)
MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 100.0
ANY_JSON_OBJECT = '{"type": "object"}'


def json_schema(fmt: dict | None) -> str | None:
    """OpenAI's `response_format` (or LoRAX's: json_object with an optional `schema`) → the schema text the
    worker constrains to (None: free text). The schema itself is checked by the worker (400 if invalid)."""
    if fmt is None:
        return None
    kind = fmt.get("type")
    if kind == "text" and set(fmt) == {"type"}:
        return None
    if kind == "json_object" and set(fmt) <= {"type", "schema"}:
        schema = fmt.get("schema")
        return ANY_JSON_OBJECT if schema is None else _schema_text(schema)
    if kind == "json_schema" and set(fmt) == {"type", "json_schema"} and isinstance(fmt["json_schema"], dict):
        spec = fmt["json_schema"]
        if "schema" not in spec or set(spec) - {"name", "schema", "strict", "description"}:
            raise InvalidRequestError("response_format.json_schema needs `schema` (and optionally name, strict, "
                                      "description)", param="response_format")
        return _schema_text(spec["schema"])
    raise InvalidRequestError('response_format must be {"type": "text"}, {"type": "json_object"} or '
                              '{"type": "json_schema", "json_schema": {"schema": {...}}}', param="response_format")


def _schema_text(schema: object) -> str:
    if not isinstance(schema, dict):
        raise InvalidRequestError("response_format: the schema must be a JSON object", param="response_format")
    return json.dumps(schema)


def check_n(n: int, best_of: int | None = None) -> None:
    if n > MAX_N:
        raise InvalidRequestError(f"n must be at most {MAX_N}", param="n")
    if best_of is not None:
        if best_of > MAX_N:
            raise InvalidRequestError(f"best_of must be at most {MAX_N}", param="best_of")
        if best_of != n:
            raise InvalidRequestError("best_of must equal n: ranking more candidates than n is not supported",
                                      param="best_of")


def check_top_logprobs(top: int, param: str) -> None:
    if top > MAX_TOP_LOGPROBS:
        raise InvalidRequestError(f"{param} must be at most {MAX_TOP_LOGPROBS}", param=param)


def logit_bias(bias: dict[str, float] | None) -> dict[int, float]:
    out: dict[int, float] = {}
    for key, value in (bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            raise InvalidRequestError(f"logit_bias keys are token ids, not {key!r}", param="logit_bias") from None
        if token < 0:
            raise InvalidRequestError(f"logit_bias token id {token} is negative", param="logit_bias")
        if not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
            raise InvalidRequestError(f"logit_bias values must be in [-100, 100], not {value}", param="logit_bias")
        out[token] = value
    return out


def worker_sampling(req: CompletionRequest | ChatCompletionRequest, max_tokens: int, logprobs: bool,
                    top_logprobs: int) -> WorkerSampling:
    check_n(req.n, getattr(req, "best_of", None))
    if any(t < 0 for t in req.stop_token_ids or ()):
        raise InvalidRequestError("stop_token_ids must be token ids (≥ 0)", param="stop_token_ids")
    return WorkerSampling(
        max_tokens=max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        seed=req.seed,
        stop=req.stop_list(),
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        n=req.n,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        repetition_penalty=req.repetition_penalty,
        min_p=req.min_p,
        typical_p=req.typical_p,
        logit_bias=logit_bias(req.logit_bias),
        stop_token_ids=list(req.stop_token_ids or ()),
        json_schema=json_schema(req.response_format),
    )


def completion_sampling(req: CompletionRequest, max_tokens: int) -> WorkerSampling:
    if req.logprobs is not None:
        check_top_logprobs(req.logprobs, "logprobs")
    return worker_sampling(req, max_tokens, req.logprobs is not None, req.logprobs or 0)


def chat_sampling(req: ChatCompletionRequest, max_tokens: int) -> WorkerSampling:
    if req.tools is not None:
        raise InvalidRequestError("tools (function calling) is not supported by this server", param="tools")
    if req.tool_choice not in (None, "none"):
        raise InvalidRequestError('tool_choice: only "none" is supported (no tools)', param="tool_choice")
    if req.top_logprobs is not None:
        check_top_logprobs(req.top_logprobs, "top_logprobs")
        if not req.logprobs:
            raise InvalidRequestError("top_logprobs needs logprobs: true", param="top_logprobs")
    return worker_sampling(req, max_tokens, req.logprobs, req.top_logprobs or 0)
