"""The async engine the worker service uses: a thread runs `EngineCore.step()` in a loop; requests are
async streams of TokenEvents. Leaving a stream early (break, cancel, client gone) aborts the request,
and its slot is free at the next step.

The event loop never takes the core's lock: what needs it runs in a thread, and `stats()` and
`resident_adapters()` read a snapshot that the threads changing the engine publish (the engine thread after
each step and when idle, loads and unloads when done), so /health, /stats and the heartbeat answer while a
step or a load holds the lock."""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator

from workers.adapters.kind import HostAdapter
from workers.engine.config import EngineConfig
from workers.engine.core import EngineCore
from workers.engine.types import GenerationRequest, TokenEvent

__all__ = ["Engine", "EngineConfig"]
log = logging.getLogger(__name__)


class Engine:
    def __init__(self, cfg: EngineConfig, tokenizer=None):
        self.core = EngineCore(cfg, tokenizer)
        self._inbox: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._ids = itertools.count()
        self._snapshot: tuple[dict, list[str]] = ({}, [])
        self._publish()

    @property
    def tokenizer(self):
        return self.core.tokenizer

    @property
    def model_id(self) -> str:
        return self.core.model_id

    @property
    def max_seq(self) -> int:
        return self.core.max_seq

    @property
    def base_config(self):
        """The base model's DecoderConfig (shapes adapters are checked and merged against)."""
        return self.core.runner.config

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        if not request.request_id:
            request = GenerationRequest(request.prompt_ids, request.params, request.adapter,
                                        f"req-{next(self._ids)}")
        adapter = request.adapter
        await asyncio.to_thread(self._admit, request)  # the lock is taken off the event loop
        rid = request.request_id
        events: asyncio.Queue = asyncio.Queue()
        finished = False
        unfinished = request.params.n  # completions still running (TokenEvent.choice tells them apart)
        try:
            if adapter is not None:
                await asyncio.to_thread(self.core.stage_adapter, adapter)
            self._streams[rid] = (asyncio.get_running_loop(), events)
            self._post("add", request)
            while True:
                item = await events.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    unfinished -= 1
                    if unfinished == 0:
                        finished = True
                        return
        finally:
            if self._streams.pop(rid, None) is not None and not finished:
                self._post("abort", rid)
            if adapter is not None:  # shielded: a cancelled stream still unpins
                await asyncio.shield(asyncio.to_thread(self._unpin, adapter))

    def _unpin(self, adapter: str) -> None:
        with self.core.lock:
            self.core.adapters.unpin(adapter)

    def _admit(self, request: GenerationRequest) -> None:
        with self.core.lock:
            self.core.validate(request)  # errors surface before the first event
            if request.adapter is not None:  # the host cache keeps it from now until the stream ends
                self.core.adapters.pin(request.adapter)

    async def load_adapter(self, name: str, path: str) -> HostAdapter:
        """Reads and validates off the event loop and the decode loop; registers in the host cache."""
        return await asyncio.to_thread(self._published, self.core.load_adapter, name, path)

    async def load_medusa(self, path: str, attach_to: str | None = None) -> None:
        """Medusa heads for the base (attach_to None) or a loaded adapter; validated off the loops."""
        await asyncio.to_thread(self._published, self.core.load_medusa, path, attach_to)

    def unload_medusa(self, attach_to: str | None = None) -> None:
        self._published(self.core.unload_medusa, attach_to)

    def on_adapter_evicted(self, callback) -> None:
        """`callback(name)` runs (in the engine's threads) whenever the host cache evicts an adapter."""
        self.core.adapters.on_evict = callback

    def unload_adapter(self, name: str) -> None:
        self._published(self.core.unload_adapter, name)

    def resident_adapters(self) -> list[str]:
        """As of the last published snapshot (lock-free: safe on the event loop)."""
        return self._snapshot[1]

    def stats(self) -> dict:
        """As of the last published snapshot (lock-free: safe on the event loop)."""
        return self._snapshot[0]

    def _published(self, change, *args):
        """`change(*args)` (a load or unload, in a thread), then the snapshot that shows it."""
        try:
            return change(*args)
        finally:
            self._publish()

    def _publish(self) -> None:
        """Takes the lock (never call on the event loop) and swaps in a fresh snapshot (one reference: readers
        see the old one or the new one)."""
        s = self.core.scheduler
        with self.core.lock:
            stats = {"running": len(s.running), "waiting": len(s.waiting), "max_batch": self.core.cfg.max_batch,
                     "adapters": self.core.adapters.stats(), "fusion": self.core.fusion.stats(),
                     "medusa": self.core.speculator.metrics()}
            self._snapshot = (stats, self.core.adapters.resident())

    def _post(self, kind: str, payload: object) -> None:
        self._inbox.put((kind, payload))
        self._wake.set()

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                try:
                    self.core.add_request(payload)  # type: ignore[arg-type]
                except Exception as e:  # e.g. the adapter was unloaded since validation
                    self._deliver(payload.request_id, e)  # type: ignore[union-attr]
            else:
                self.core.abort(payload)  # type: ignore[arg-type]

    def _loop(self) -> None:
        while not self._stopped.is_set():
            self._drain_inbox()
            if not self.core.has_work():
                self._publish()
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                events = self.core.step()
            except Exception as e:
                log.exception("engine step failed; failing the requests in flight")
                self._fail_all(e)
                continue
            self._publish()  # before the events: a client that saw its last event sees its step in stats()
            for seq, event in events:
                self._deliver(seq.request.request_id, event)
            for seq, error in self.core.take_failures():  # failed by their own fault; the rest went on
                self._deliver(seq.request.request_id, error)

    def _deliver(self, rid: str, item: object) -> None:
        stream = self._streams.get(rid)
        if stream is not None:
            loop, events = stream
            loop.call_soon_threadsafe(events.put_nowait, item)

    def _fail_all(self, error: Exception) -> None:
        for seq in list(self.core.scheduler.running) + list(self.core.scheduler.waiting):
            self.core.abort(seq.request.request_id)
            self._deliver(seq.request.request_id, error)
