"""OpenAI-compatible completions and chat: request → worker request(s), worker results → OpenAI
responses and SSE chunks (ending `data: [DONE]`)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

from adapters_store.coordination import ChatMessage, WorkerGenerateRequest, WorkerSampling
from server import sse
from server.auth import Tenant
from server.dispatch import Completion, Dispatcher, MergedAdapter, Target
from server.errors import GatewayError, InvalidRequestError
from server.protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessageOut,
    ChoiceLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    TokenLogprob,
    TopLogprob,
    Usage,
)

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def _sampling(
    req: CompletionRequest | ChatCompletionRequest, max_tokens: int, logprobs: bool
) -> WorkerSampling:
    return WorkerSampling(
        max_tokens=max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        seed=req.seed,
        stop=req.stop_list(),
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
    )


def _usage(prompt: int, completion: int) -> Usage:
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


async def _stream_errors(body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """A failure after the first byte can only be reported in-band: an error event, then [DONE]."""
    try:
        async for chunk in body:
            yield chunk
    except GatewayError as exc:
        yield sse.error_event(exc.to_dict())
        yield sse.DONE


class CompletionService:
    def __init__(self, dispatcher: Dispatcher):
        self._dispatcher = dispatcher

    def _requests(self, req: CompletionRequest) -> list[WorkerGenerateRequest]:
        prompt = req.prompt
        if isinstance(prompt, str):
            prompts: list = [prompt]
        elif prompt and isinstance(prompt[0], int):
            prompts = [prompt]
        else:
            prompts = list(prompt)
        if not prompts or any(len(p) == 0 for p in prompts):
            raise InvalidRequestError("prompt must not be empty", param="prompt")
        if req.stream and len(prompts) > 1:
            raise InvalidRequestError("streaming takes a single prompt", param="prompt")
        params = _sampling(req, req.max_tokens or COMPLETIONS_DEFAULT_MAX_TOKENS, req.logprobs is not None)
        return [
            WorkerGenerateRequest(prompt=p, params=params)
            if isinstance(p, str)
            else WorkerGenerateRequest(prompt_ids=p, params=params)
            for p in prompts
        ]

    @staticmethod
    def _logprobs(done: Completion, top: int | None) -> CompletionLogprobs | None:
        if top is None or done.logprobs is None:
            return None
        offsets, pos = [], 0
        for t in done.tokens:
            offsets.append(pos)
            pos += len(t)
        return CompletionLogprobs(
            tokens=done.tokens,
            token_logprobs=list(done.logprobs),
            top_logprobs=[{t: lp} for t, lp in zip(done.tokens, done.logprobs, strict=True)] if top else None,
            text_offset=offsets,
        )

    async def create(self, req: CompletionRequest, merged: MergedAdapter | None,
                     tenant: Tenant) -> CompletionResponse:
        target = await asyncio.to_thread(self._dispatcher.resolve, req.model, merged, tenant)  # reads the store
        work = self._requests(req)
        done = await asyncio.gather(*(self._dispatcher.generate(target, w) for w in work))
        choices = [
            CompletionChoice(
                index=i, text=d.text, logprobs=self._logprobs(d, req.logprobs), finish_reason=d.finish_reason
            )
            for i, d in enumerate(done)
        ]
        return CompletionResponse(
            id=f"cmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=req.model,
            choices=choices,
            usage=_usage(sum(d.prompt_tokens for d in done), sum(d.completion_tokens for d in done)),
        )

    async def stream(self, req: CompletionRequest, merged: MergedAdapter | None,
                     tenant: Tenant) -> AsyncIterator[bytes]:
        target = await asyncio.to_thread(self._dispatcher.resolve, req.model, merged, tenant)  # reads the store
        (work,) = self._requests(req)
        events = await self._dispatcher.stream(target, work)
        return _stream_errors(self._chunks(req, target, events))

    async def _chunks(self, req: CompletionRequest, target: Target, batches: AsyncIterator[list[dict]]):
        envelope = sse.Envelope(
            id=f"cmpl-{uuid.uuid4().hex}", object="text_completion", created=int(time.time()), model=req.model
        )
        prompt_tokens = count = offset = 0
        async for batch in batches:
            chunks = []
            for ev in batch:
                logprobs = None
                if req.logprobs is not None and ev.get("logprob") is not None:
                    logprobs = {
                        "tokens": [ev["text"]],
                        "token_logprobs": [ev["logprob"]],
                        "top_logprobs": [{ev["text"]: ev["logprob"]}] if req.logprobs else None,
                        "text_offset": [offset],
                    }
                offset += len(ev["text"])
                choice = {"index": 0, "text": ev["text"], "logprobs": logprobs, "finish_reason": ev["finish_reason"]}
                chunks.append(envelope.chunk([choice]))
            count += len(batch)
            prompt_tokens = batch[-1]["prompt_tokens"]
            yield b"".join(chunks)
        if req.stream_options and req.stream_options.include_usage:
            yield envelope.chunk([], _usage(prompt_tokens, count).model_dump())
        yield sse.DONE


class ChatService:
    def __init__(self, dispatcher: Dispatcher, default_max_tokens: int):
        self._dispatcher = dispatcher
        self._default_max_tokens = default_max_tokens

    def _request(self, req: ChatCompletionRequest) -> WorkerGenerateRequest:
        max_tokens = req.max_completion_tokens or req.max_tokens or self._default_max_tokens
        messages = [ChatMessage(role=m.role, content=m.text()) for m in req.messages]
        return WorkerGenerateRequest(messages=messages, params=_sampling(req, max_tokens, req.logprobs))

    @staticmethod
    def _token_logprob(text: str, logprob: float, top: int | None) -> TokenLogprob:
        raw = list(text.encode())
        alts = [TopLogprob(token=text, logprob=logprob, bytes=raw)] if top else []
        return TokenLogprob(token=text, logprob=logprob, bytes=raw, top_logprobs=alts)

    async def create(self, req: ChatCompletionRequest, merged: MergedAdapter | None,
                     tenant: Tenant) -> ChatCompletionResponse:
        target = await asyncio.to_thread(self._dispatcher.resolve, req.model, merged, tenant)  # reads the store
        done = await self._dispatcher.generate(target, self._request(req))
        logprobs = None
        if req.logprobs and done.logprobs is not None:
            logprobs = ChoiceLogprobs(
                content=[
                    self._token_logprob(t, lp, req.top_logprobs)
                    for t, lp in zip(done.tokens, done.logprobs, strict=True)
                ]
            )
        choice = ChatChoice(
            index=0,
            message=ChatMessageOut(content=done.text),
            logprobs=logprobs,
            finish_reason=done.finish_reason,
        )
        return ChatCompletionResponse(
            id=f"chatcmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=req.model,
            choices=[choice],
            usage=_usage(done.prompt_tokens, done.completion_tokens),
        )

    async def stream(self, req: ChatCompletionRequest, merged: MergedAdapter | None,
                     tenant: Tenant) -> AsyncIterator[bytes]:
        target = await asyncio.to_thread(self._dispatcher.resolve, req.model, merged, tenant)  # reads the store
        events = await self._dispatcher.stream(target, self._request(req))
        return _stream_errors(self._chunks(req, events))

    async def _chunks(self, req: ChatCompletionRequest, batches: AsyncIterator[list[dict]]):
        envelope = sse.Envelope(
            id=f"chatcmpl-{uuid.uuid4().hex}", object="chat.completion.chunk", created=int(time.time()), model=req.model
        )

        def chunk(content: str | None, role: str | None = None, finish: str | None = None, logprobs=None) -> bytes:
            delta = {"role": role, "content": content}
            return envelope.chunk([{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}])

        yield chunk("", role="assistant")
        prompt_tokens = count = 0
        finish = None
        async for batch in batches:
            chunks = []
            for ev in batch:
                finish = ev["finish_reason"] or finish
                logprobs = None
                if req.logprobs and ev.get("logprob") is not None:
                    token = self._token_logprob(ev["text"], ev["logprob"], req.top_logprobs)
                    logprobs = ChoiceLogprobs(content=[token]).model_dump()
                if ev["text"] or logprobs is not None:
                    chunks.append(chunk(ev["text"], logprobs=logprobs))
            count += len(batch)
            prompt_tokens = batch[-1]["prompt_tokens"]
            if chunks:
                yield b"".join(chunks)
        yield chunk(None, finish=finish or "stop")
        if req.stream_options and req.stream_options.include_usage:
            yield envelope.chunk([], _usage(prompt_tokens, count).model_dump())
        yield sse.DONE
