"""OpenAI-compatible completions and chat: request → worker request(s), worker results → OpenAI
responses and SSE chunks (ending `data: [DONE]`)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

from adapters_store.wire import ChatMessage, WorkerGenerateRequest
from server import sse
from server.auth import Tenant
from server.dispatch import Dispatcher, MergedAdapter, Target
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
from server.sampling import chat_sampling, completion_sampling

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def _legacy_top(token: int, text: str, logprob: float, tops: list | None) -> dict[str, float]:
    """Legacy completions' top_logprobs entry: the top-k texts, plus the sampled token when it is not among
    them (so up to k+1); where two tokens decode to the same text, the more likely one's logprob."""
    alts: dict[str, float] = {}
    for _, t, lp in tops or ():
        alts.setdefault(t, lp)
    if all(i != token for i, _, _ in tops or ()):
        alts.setdefault(text, logprob)
    return alts


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
        if req.stream and req.echo:
            raise InvalidRequestError("echo is answered only without stream", param="echo")
        params = completion_sampling(req, req.max_tokens or COMPLETIONS_DEFAULT_MAX_TOKENS)
        return [
            WorkerGenerateRequest(prompt=p, params=params, echo=req.echo)
            if isinstance(p, str)
            else WorkerGenerateRequest(prompt_ids=p, params=params, echo=req.echo)
            for p in prompts
        ]

    @staticmethod
    def _logprobs(choice: dict, top: int | None, prompt: dict | None) -> CompletionLogprobs | None:
        """The legacy logprobs of a choice; with an echoed `prompt` (`WorkerPromptEcho`), its tokens first."""
        if top is None or choice["logprobs"] is None:
            return None
        lead = prompt or {"token_ids": [], "tokens": [], "logprobs": [], "top_logprobs": [], "text": ""}
        tokens = lead["tokens"] + choice["tokens"]
        offsets, pos = [], 0
        for i, t in enumerate(tokens):
            pos = len(lead["text"]) if i == len(lead["tokens"]) else pos  # the completion follows the prompt text
            offsets.append(pos)
            pos += len(t)
        alts = None
        if top:
            tops = (lead["top_logprobs"] or [None] * len(lead["tokens"])) + (
                choice["top_logprobs"] or [None] * len(choice["tokens"]))
            ids, logprobs = lead["token_ids"] + choice["token_ids"], lead["logprobs"] + choice["logprobs"]
            alts = [None if lp is None else _legacy_top(i, t, lp, alt)
                    for i, t, lp, alt in zip(ids, tokens, logprobs, tops, strict=True)]
        return CompletionLogprobs(tokens=tokens, token_logprobs=lead["logprobs"] + list(choice["logprobs"]),
                                  top_logprobs=alts, text_offset=offsets)

    async def create(self, req: CompletionRequest, merged: MergedAdapter | None,
                     tenant: Tenant) -> CompletionResponse:
        target = await asyncio.to_thread(self._dispatcher.resolve, req.model, merged, tenant)  # reads the store
        work = self._requests(req)
        done = await asyncio.gather(*(self._dispatcher.generate(target, w) for w in work))
        choices = [  # prompt i's completion j is choice i·n + j (as vLLM and OpenAI number them)
            CompletionChoice(index=i * req.n + c["index"], text=(d.prompt["text"] if d.prompt else "") + c["text"],
                             logprobs=self._logprobs(c, req.logprobs, d.prompt), finish_reason=c["finish_reason"])
            for i, d in enumerate(done) for c in d.all_choices()
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
        prompt_tokens = count = 0
        offset = [0] * req.n  # text offset per choice
        async for batch in batches:
            chunks = []
            for ev in batch:
                logprobs, index = None, ev.get("choice", 0)
                if req.logprobs is not None and ev.get("logprob") is not None:
                    tops = ev.get("top_logprobs")
                    logprobs = {
                        "tokens": [ev["text"]],
                        "token_logprobs": [ev["logprob"]],
                        "top_logprobs": [_legacy_top(ev["token_id"], ev["text"], ev["logprob"], tops)]
                        if req.logprobs else None,
                        "text_offset": [offset[index]],
                    }
                offset[index] += len(ev["text"])
                choice = {"index": index, "text": ev["text"], "logprobs": logprobs,
                          "finish_reason": ev["finish_reason"]}
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
        return WorkerGenerateRequest(messages=messages, params=chat_sampling(req, max_tokens))

    @staticmethod
    def _token_logprob(text: str, logprob: float, tops: list | None) -> TokenLogprob:
        alts = [TopLogprob(token=t, logprob=lp, bytes=list(t.encode())) for _, t, lp in tops or ()]
        return TokenLogprob(token=text, logprob=logprob, bytes=list(text.encode()), top_logprobs=alts)

    def _choice(self, c: dict, req: ChatCompletionRequest) -> ChatChoice:
        logprobs = None
        if req.logprobs and c["logprobs"] is not None:
            tops = c["top_logprobs"] or [None] * len(c["tokens"])
            logprobs = ChoiceLogprobs(content=[self._token_logprob(t, lp, top) for t, lp, top in
                                               zip(c["tokens"], c["logprobs"], tops, strict=True)])
        return ChatChoice(index=c["index"], message=ChatMessageOut(content=c["text"]), logprobs=logprobs,
                          finish_reason=c["finish_reason"])

    async def create(self, req: ChatCompletionRequest, merged: MergedAdapter | None,
                     tenant: Tenant) -> ChatCompletionResponse:
        target = await asyncio.to_thread(self._dispatcher.resolve, req.model, merged, tenant)  # reads the store
        done = await self._dispatcher.generate(target, self._request(req))
        return ChatCompletionResponse(
            id=f"chatcmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=req.model,
            choices=[self._choice(c, req) for c in done.all_choices()],
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

        def chunk(index: int, content: str | None, role: str | None = None, finish: str | None = None,
                  logprobs=None) -> bytes:
            delta = {"role": role, "content": content}
            return envelope.chunk([{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}])

        yield b"".join(chunk(i, "", role="assistant") for i in range(req.n))
        prompt_tokens = count = 0
        finish: list[str | None] = [None] * req.n
        async for batch in batches:
            chunks = []
            for ev in batch:
                index = ev.get("choice", 0)
                finish[index] = ev["finish_reason"] or finish[index]
                logprobs = None
                if req.logprobs and ev.get("logprob") is not None:
                    token = self._token_logprob(ev["text"], ev["logprob"], ev.get("top_logprobs"))
                    logprobs = ChoiceLogprobs(content=[token]).model_dump()
                if ev["text"] or logprobs is not None:
                    chunks.append(chunk(index, ev["text"], logprobs=logprobs))
            count += len(batch)
            prompt_tokens = batch[-1]["prompt_tokens"]
            if chunks:
                yield b"".join(chunks)
        yield b"".join(chunk(i, None, finish=f or "stop") for i, f in enumerate(finish))
        if req.stream_options and req.stream_options.include_usage:
            yield envelope.chunk([], _usage(prompt_tokens, count).model_dump())
        yield sse.DONE
