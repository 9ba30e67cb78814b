"""Keeps `adapterd serve`'s processes alive: a child that exits is started again after an exponential
backoff (first_delay_s, doubling, capped at max_delay_s); one that has been restarted max_restarts times
within window_s is left down, with the reason logged and written to the status file, which the gateway's
`/ready` reads to report the service degraded. The rest keeps serving either way.

Torch-free; the clock and the status file are injected, so the policy is tested without processes."""

from __future__ import annotations

import json
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

STATUS_FILE = "supervisor.json"  # in the data dir: {"given_up": {name: reason}, "restarts": {name: n}}


class Process(Protocol):
    def poll(self) -> int | None: ...


@dataclass(frozen=True)
class RestartPolicy:
    first_delay_s: float = 0.5
    max_delay_s: float = 30.0
    window_s: float = 60.0
    max_restarts: int = 5  # within window_s; one more death and the process stays down

    def delay(self, recent_restarts: int) -> float:
        return min(self.max_delay_s, self.first_delay_s * 2**recent_restarts)


@dataclass
class _Child:
    name: str
    start: Callable[[], Process]
    process: Process
    restarts: deque[float] = field(default_factory=deque)  # when each restart happened
    restart_at: float | None = None  # a restart is due then
    given_up: str | None = None


class _StartFailed:
    """Stands for a child whose start raised: it counts as exited, so the backoff applies to it too."""

    def __init__(self, error: Exception):
        self.error = error

    def poll(self) -> int:
        return -1


class Supervisor:
    def __init__(self, policy: RestartPolicy, say: Callable[[str], None], status_path: Path | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.policy, self.say, self.status_path, self.clock = policy, say, status_path, clock
        self.children: dict[str, _Child] = {}
        self._write_status()

    def watch(self, name: str, process: Process, start: Callable[[], Process]) -> None:
        """`process` is running now; `start()` starts a replacement (and may raise)."""
        self.children[name] = _Child(name, start, process)

    def process(self, name: str) -> Process:
        return self.children[name].process

    def given_up(self) -> dict[str, str]:
        return {c.name: c.given_up for c in self.children.values() if c.given_up}

    def tick(self) -> None:
        """Notices exits, schedules restarts and runs the ones that are due."""
        now = self.clock()
        for child in self.children.values():
            if child.given_up:
                continue
            if child.restart_at is None:
                code = child.process.poll()
                if code is not None:
                    self._exited(child, code, now)
            elif now >= child.restart_at:
                self._restart(child, now)

    def _exited(self, child: _Child, code: int, now: float) -> None:
        while child.restarts and now - child.restarts[0] > self.policy.window_s:
            child.restarts.popleft()
        recent = len(child.restarts)
        if recent >= self.policy.max_restarts:
            child.given_up = (f"exited with code {code} after {recent} restarts within "
                              f"{self.policy.window_s:.0f} s; not restarting it again")
            self.say(f"{child.name} {child.given_up}; the rest keeps serving (degraded)")
            self._write_status()
            return
        delay = self.policy.delay(recent)
        child.restart_at = now + delay
        self.say(f"{child.name} exited with code {code}; restarting it in {delay:.1f} s")

    def _restart(self, child: _Child, now: float) -> None:
        child.restart_at = None
        child.restarts.append(now)
        try:
            child.process = child.start()
        except Exception as exc:  # e.g. the port is taken: the next tick sees it as exited again
            self.say(f"{child.name} could not be restarted: {exc}")
            child.process = _StartFailed(exc)
        else:
            self.say(f"{child.name} restarted")
        self._write_status()

    def _write_status(self) -> None:
        if self.status_path is None:
            return
        status = {"given_up": self.given_up(),
                  "restarts": {c.name: len(c.restarts) for c in self.children.values() if c.restarts}}
        tmp = self.status_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(status))
        os.replace(tmp, self.status_path)


def read_status(data_dir: Path) -> dict:
    """What the supervisor wrote (empty when `adapterd serve` does not run this gateway)."""
    try:
        return json.loads((Path(data_dir) / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return {}
