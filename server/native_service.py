"""The native TGI/LoRAX-style API: `POST /generate` and `POST /generate_stream` (`inputs`,
`parameters{adapter_id, max_new_tokens, temperature, top_p, top_k, seed, stop, details, …}`).
Sampling follows TGI: greedy unless `do_sample` or a temperature / top_p / top_k is given."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from adapters_store.coordination import WorkerGenerateRequest, WorkerSampling
from server import sse
from server.auth import Tenant
from server.dispatch import Dispatcher, MergedAdapter
from server.errors import GatewayError
from server.protocol import (
    GenerateDetails,
    GenerateParameters,
    GenerateRequest,
    GenerateResponse,
    NativeToken,
    StreamDetails,
)

DEFAULT_MAX_NEW_TOKENS = 20  # TGI's default


def _finish(reason: str, params: GenerateParameters) -> str:
    if reason == "length":
        return "length"
    return "stop_sequence" if params.stop else "eos_token"


def _sampling(p: GenerateParameters) -> WorkerSampling:
    sample = p.do_sample or p.temperature is not None or p.top_p is not None or bool(p.top_k)
    return WorkerSampling(
        max_tokens=p.max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
        temperature=(p.temperature if p.temperature is not None else 1.0) if sample else 0.0,
        top_p=p.top_p if p.top_p is not None else 1.0,
        top_k=p.top_k or 0,
        seed=p.seed,
        stop=p.stop,
        ignore_eos=p.ignore_eos,
        logprobs=p.details,
    )


class NativeService:
    def __init__(self, dispatcher: Dispatcher):
        self._dispatcher = dispatcher

    async def _prepare(self, req: GenerateRequest, merged: MergedAdapter | None, tenant: Tenant):
        target = await asyncio.to_thread(self._dispatcher.resolve, req.parameters.adapter_id or None, merged, tenant)
        return target, WorkerGenerateRequest(prompt=req.inputs, params=_sampling(req.parameters))

    async def generate(self, req: GenerateRequest, merged: MergedAdapter | None, tenant: Tenant) -> GenerateResponse:
        target, work = await self._prepare(req, merged, tenant)
        done = await self._dispatcher.generate(target, work)
        p = req.parameters
        text = req.inputs + done.text if p.return_full_text else done.text
        details = None
        if p.details:
            logprobs = done.logprobs or [None] * len(done.token_ids)
            tokens = [
                NativeToken(id=i, text=t, logprob=lp)
                for i, t, lp in zip(done.token_ids, done.tokens, logprobs, strict=True)
            ]
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
                    token = {"id": ev["token_id"], "text": ev["text"], "logprob": ev.get("logprob"), "special": False}
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
