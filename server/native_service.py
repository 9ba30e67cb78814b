"""The native TGI/LoRAX-style API: `POST /generate`, `POST /generate_stream` and `POST /` (`stream` says
which; a non-streamed answer is a one-element list there, as TGI's), `inputs`,
`parameters{adapter_id, max_new_tokens, temperature, top_p, top_k, seed, stop, details, …}`.
Sampling follows TGI: greedy unless `do_sample` or a temperature / top_p / top_k is given. Fields the
LoRAX/TGI clients always send but that are not honoured are accepted at their defaults only."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from adapters_store.wire import WorkerGenerateRequest, WorkerSampling
from server import sse
from server.auth import Tenant
from server.dispatch import Dispatcher, MergedAdapter
from server.errors import GatewayError, InvalidRequestError
from server.protocol import (
    AlternativeToken,
    GenerateDetails,
    GenerateParameters,
    GenerateRequest,
    GenerateResponse,
    NativeToken,
    StreamDetails,
)
from server.sampling import check_top_logprobs, json_schema

DEFAULT_MAX_NEW_TOKENS = 20  # TGI's default


def _finish(reason: str, params: GenerateParameters) -> str:
    if reason == "length":
        return "length"
    return "stop_sequence" if params.stop else "eos_token"


_DEFAULTS_ONLY = {  # sent by LoRAX's / TGI's clients on every call; honoured only at these values
    "api_token": (None, "hub tokens are not used: authenticate with the Authorization header"),
    "watermark": (False, "watermarking is not supported"),
    "decoder_input_details": (False, "prompt token logprobs are not supported"),
    "grammar": (None, "grammars are not supported yet"),
}


def _check(p: GenerateParameters) -> None:
    for name, (default, why) in _DEFAULTS_ONLY.items():
        if getattr(p, name) != default:
            raise InvalidRequestError(f"{name}: {why}; send {default!r} or leave it out", param=name)
    if p.best_of not in (None, 1):
        raise InvalidRequestError("best_of > 1 is not supported; send 1 or leave it out", param="best_of")
    if p.adapter_source not in (None, "local", "s3"):
        why = "adapters are not fetched from the hub: upload it" if p.adapter_source == "hub" else \
            'adapter_source must be "local" or "s3" (both resolve through the store)'
        raise InvalidRequestError(why, param="adapter_source")
    for name in ("return_k_alternatives", "top_n_tokens"):
        if getattr(p, name):
            check_top_logprobs(getattr(p, name), name)


def _sampling(p: GenerateParameters) -> WorkerSampling:
    sample = p.do_sample or p.temperature is not None or p.top_p is not None or bool(p.top_k)
    return WorkerSampling(
        max_tokens=p.max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
        temperature=(p.temperature if p.temperature is not None else 1.0) if sample else 0.0,
        top_p=p.top_p if p.top_p is not None else 1.0,
        top_k=p.top_k or 0,
        seed=p.seed,
        stop=p.stop,
        ignore_eos=p.ignore_eos or p.ignore_eos_token,
        logprobs=True,  # TGI's tokens always carry a logprob (one gather per row: nothing to save)
        top_logprobs=p.return_k_alternatives or p.top_n_tokens or 0,
        repetition_penalty=p.repetition_penalty if p.repetition_penalty is not None else 1.0,
        frequency_penalty=p.frequency_penalty or 0.0,
        typical_p=p.typical_p if p.typical_p is not None else 1.0,
        json_schema=json_schema(p.response_format),
    )


def _token(token_id: int, text: str, logprob: float | None, tops: list | None) -> NativeToken:
    alts = [AlternativeToken(id=i, text=t, logprob=lp) for i, t, lp in tops] if tops else None
    return NativeToken(id=token_id, text=text, logprob=logprob, alternative_tokens=alts)


class NativeService:
    def __init__(self, dispatcher: Dispatcher):
        self._dispatcher = dispatcher

    async def _prepare(self, req: GenerateRequest, merged: MergedAdapter | None, tenant: Tenant):
        _check(req.parameters)
        target = await asyncio.to_thread(self._dispatcher.resolve, req.parameters.adapter_id or None, merged, tenant)
        p = req.parameters
        work = WorkerGenerateRequest(prompt=req.inputs, params=_sampling(p), truncate=p.truncate)
        return target, work

    async def generate(self, req: GenerateRequest, merged: MergedAdapter | None, tenant: Tenant) -> GenerateResponse:
        target, work = await self._prepare(req, merged, tenant)
        done = await self._dispatcher.generate(target, work)
        p = req.parameters
        text = req.inputs + done.text if p.return_full_text else done.text
        details = None
        if p.details:
            logprobs = done.logprobs or [None] * len(done.token_ids)
            tops = done.top_logprobs or [None] * len(done.token_ids)
            tokens = [_token(*t) for t in zip(done.token_ids, done.tokens, logprobs, tops, strict=True)]
            details = GenerateDetails(
                finish_reason=_finish(done.finish_reason, p),
                generated_tokens=done.completion_tokens,
                prompt_tokens=done.prompt_tokens,
                seed=p.seed,
                tokens=tokens,
                speculative=done.speculative,
            )
        return GenerateResponse(generated_text=text, details=details)

    async def stream(self, req: GenerateRequest, merged: MergedAdapter | None, tenant: Tenant) -> AsyncIterator[bytes]:
        target, work = await self._prepare(req, merged, tenant)
        events = await self._dispatcher.stream(target, work)
        return self._events(req, events)

    async def _events(self, req: GenerateRequest, batches: AsyncIterator[list[dict]]) -> AsyncIterator[bytes]:
        p = req.parameters
        texts: list[str] = []
        try:
            async for batch in batches:
                out = []
                for ev in batch:
                    texts.append(ev["text"])
                    token = _token(ev["token_id"], ev["text"], ev.get("logprob"), ev.get("top_logprobs"))
                    token = token.model_dump(exclude_none=True) | {"logprob": token.logprob}
                    generated, details = None, None
                    if ev["finish_reason"]:
                        full = "".join(texts)
                        generated = req.inputs + full if p.return_full_text else full
                        details = StreamDetails(
                            finish_reason=_finish(ev["finish_reason"], p),
                            generated_tokens=ev["index"] + 1,
                            prompt_tokens=ev["prompt_tokens"],
                            seed=p.seed,
                            speculative=ev.get("details"),
                        ).model_dump()
                    out.append(sse.event({"token": token, "generated_text": generated, "details": details}))
                yield b"".join(out)
        except GatewayError as exc:
            yield sse.error_event(exc.to_dict())
