"""Graceful drain of a worker on SIGTERM (or SIGINT): it leaves the placement set at once (deregisters in
Redis, so gateways stop routing to it on their next refresh; a gateway that still tries gets a refused
connection and retries elsewhere), stops accepting connections, lets in-flight requests and streams finish,
and exits within the grace period. What is still running when the grace period ends gets an error event
(`worker_shutting_down`) and ends.

`DrainingServer` is uvicorn's server with that first step added to its signal handling; uvicorn itself
closes the listeners and waits for the open connections (`timeout_graceful_shutdown`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import uvicorn

log = logging.getLogger("adapterd.worker.drain")
FLUSH_S = 3.0  # after the grace period: time for the error events to reach the clients before uvicorn cuts


class Drain:
    """The worker's drain state, read by the service (readiness, per-token check)."""

    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        self.draining = False  # no longer ready; deregistered
        self.expired = False  # the grace period is over: running requests end with an error

    async def run(self, leave: Callable[[], Awaitable[None]]) -> None:
        """Leaves the placement set at once, then marks the grace period over after `grace_s`."""
        self.draining = True
        try:
            await leave()
        except Exception as exc:  # Redis away: the heartbeat key expires by itself
            log.warning("could not deregister while draining: %s", exc)
        await asyncio.sleep(self.grace_s)
        self.expired = True


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose exit signal first starts `drain.run(leave)`; uvicorn then stops listening and
    waits for the open connections up to the grace period (plus `FLUSH_S`)."""

    def __init__(self, config: uvicorn.Config, drain: Drain, leave: Callable[[], Awaitable[None]]):
        config.timeout_graceful_shutdown = int(drain.grace_s + FLUSH_S)
        super().__init__(config)
        self._drain, self._leave = drain, leave
        self._task: asyncio.Task | None = None

    def handle_exit(self, sig, frame) -> None:
        if not self._drain.draining:
            self._drain.draining = True  # not ready from now on
            with contextlib.suppress(RuntimeError):  # no running loop: nothing to drain
                asyncio.get_running_loop().call_soon_threadsafe(self._start)
        super().handle_exit(sig, frame)

    def _start(self) -> None:
        log.info("draining (grace %.0f s)", self._drain.grace_s)
        self._task = asyncio.get_running_loop().create_task(self._drain.run(self._leave), name="drain")
