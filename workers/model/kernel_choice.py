"""Kernels chosen by measurement: for each operation, shape, row bucket and dtype, time the candidate
implementations once, keep the fastest, and remember the table on disk for this machine.

No path is chosen by a constant about a CPU: the same GEMM orientation that is 1.7x faster on one box is
3-9x slower on the next. A choice is measured the first time a key is asked for (interleaved repeats of
every candidate, each judged by its fastest call, a few milliseconds per key on a quiet machine), logged, and written to
`{cache dir}/kernels/{machine}.json`, where the machine is the CPU model and flags (or the GPU name), the
torch version, the thread count and our native kernels' source (a new build may run, or fail, differently): a
second start on the same machine measures nothing.

An override (a candidate's name) skips the measurement and forces that candidate everywhere (tests use it
to compare every candidate with the reference).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger(__name__)

Timer = Callable[[str, Callable[[], object]], float]  # (candidate name, one call) → seconds


def cache_root() -> Path:
    return Path(os.environ.get("ADAPTERD_CACHE_DIR") or Path.home() / ".cache" / "adapterd")


def cpu_info() -> tuple[str, set[str]]:
    """(the CPU's model name, its feature flags) from /proc/cpuinfo; the platform's names where there is none."""
    model, flags = platform.processor() or platform.machine(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key.strip() in ("flags", "Features") and not flags:
                flags = value.strip()
    except OSError:
        pass
    return model, set(flags.split())


NATIVE_SOURCES = (Path(__file__).with_name("gemv.c"),)  # workers.model.native_gemv's kernels


@functools.cache  # the source does not change under a running process: read once
def _native_digest() -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in NATIVE_SOURCES if p.exists())).hexdigest()[:12]


def _cpu_description() -> dict[str, str]:
    model, flags = cpu_info()
    return {"cpu": model, "flags_sha": hashlib.sha256(" ".join(sorted(flags)).encode()).hexdigest()[:12]}


def machine_description(device: torch.device) -> dict[str, str]:
    """What a measurement depends on besides its key: hardware, torch, threads."""
    desc = {**_cpu_description(), "torch": torch.__version__, "threads": str(torch.get_num_threads()),
            "native_kernels": _native_digest()}
    if device.type == "cuda":
        desc["gpu"] = torch.cuda.get_device_name(device)
    return desc


def machine_key(device: torch.device) -> str:
    desc = machine_description(device)
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]


def wall_timer(device: torch.device) -> Timer:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timer(_name: str, call: Callable[[], object]) -> float:
        sync()
        start = time.perf_counter()
        call()
        sync()
        return time.perf_counter() - start

    return timer


@dataclass(frozen=True)
class Timing:
    best: float  # seconds: the fastest call, what the choice is made by
    median: float  # seconds: reported beside it


def measure(calls: Mapping[str, Callable[[], object]], timer: Timer, budget_s: float = 0.005,
            min_repeats: int = 3, max_repeats: int = 15, drop_ratio: float = 3.0) -> dict[str, Timing]:
    """Times each candidate. One untimed warm-up each, then rounds in which every candidate still in the
    race runs once, the order rotated each round (so drift and the neighbours' load hit all alike); as many
    rounds as fit the budget, within [min_repeats, max_repeats]. A candidate whose fastest call is already
    `drop_ratio` times the leader's leaves the race (no more time spent on a clear loser). Noise on a
    shared machine only ever adds time (a thread descheduled mid-GEMM costs a whole time slice: medians of
    20-40 ms were seen for 0.05 ms GEMMs on a loaded 2-core box), so the choice is made on each candidate's
    fastest call; the median is kept beside. A candidate that fails on this machine (an op this build or
    device lacks) is left out; if every one fails, the last error is raised."""
    names, error = [], None
    for name in calls:
        try:
            calls[name]()
            names.append(name)
        except (RuntimeError, NotImplementedError) as e:
            log.warning("kernel candidate %s fails here, left out: %s", name, e)
            error = e
    if not names:
        raise error or ValueError("no kernel candidates")
    samples = {name: [timer(name, calls[name])] for name in names}
    per_round = max(sum(s[0] for s in samples.values()), 1e-9)
    repeats = max(min_repeats, min(max_repeats, int(budget_s / per_round)))
    racing = list(names)
    for r in range(repeats):
        leader = min(min(samples[n]) for n in racing)
        racing = [n for n in racing if min(samples[n]) <= drop_ratio * leader]
        k = r % len(racing)
        for name in racing[k:] + racing[:k]:
            samples[name].append(timer(name, calls[name]))
    return {name: Timing(min(s), statistics.median(s)) for name, s in samples.items()}


@dataclass
class KernelTable:
    """Choices and their timings for one machine, mirrored to a JSON file (None: memory only)."""

    path: Path | None
    machine: dict[str, str] = field(default_factory=dict)
    entries: dict[str, dict] = field(default_factory=dict)  # key → {"choice", "ms": {name: best}, "median_ms"}
    measure_s: float = 0.0  # time spent measuring in this process
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def for_machine(cls, device: torch.device, root: Path | None = None) -> KernelTable:
        path = (root or cache_root()) / "kernels" / f"{machine_key(device)}.json"
        table = cls(path, machine_description(device))
        try:
            table.entries = dict(json.loads(path.read_text()).get("entries", {}))
        except (OSError, ValueError, AttributeError):
            table.entries = {}
        return table

    def record(self, key: str, choice: str, timings: Mapping[str, Timing], failed: list[str] = ()) -> None:
        self.entries[key] = {"choice": choice, "ms": {n: round(t.best * 1e3, 4) for n, t in timings.items()},
                             "median_ms": {n: round(t.median * 1e3, 4) for n, t in timings.items()},
                             "failed": list(failed)}
        if self.path is not None:
            self._save()

    def _save(self) -> None:
        """Merge with what other processes wrote since, then replace the file atomically."""
        assert self.path is not None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                on_disk = json.loads(self.path.read_text()).get("entries", {})
            except (OSError, ValueError, AttributeError):
                on_disk = {}
            merged = {**on_disk, **self.entries}
            fd, tmp = tempfile.mkstemp(prefix=".kernels-", dir=self.path.parent)
            with os.fdopen(fd, "w") as f:
                json.dump({"machine": self.machine, "entries": merged}, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError as e:  # a read-only cache costs a re-measurement next start, nothing else
            log.warning("kernel table not saved to %s: %s", self.path, e)

    def format(self, prefix: str = "") -> str:
        rows = [f"{k}: {v['choice']}  ({', '.join(f'{n} {ms:.3f} ms' for n, ms in v['ms'].items())})"
                for k, v in sorted(self.entries.items()) if k.startswith(prefix)]
        return "\n".join(rows)


class KernelChooser:
    """Picks one of several interchangeable implementations per key by timing them (see module doc).

    `choose(key, calls)`: `calls` builds {candidate: zero-argument call on representative inputs}; it is
    only invoked when the key has not been measured on this machine yet, with every candidate of `names`
    (a table written before a candidate existed is measured again)."""

    def __init__(self, candidates: tuple[str, ...], table: KernelTable, override: str | None = None,
                 timer: Timer | None = None, budget_s: float = 0.005):
        if override is not None and override not in candidates:
            raise ValueError(f"unknown kernel {override!r}; candidates: {', '.join(candidates)}")
        self.candidates, self.table, self.override = candidates, table, override
        self.timer = timer
        self.budget_s = budget_s

    def choose(self, key: str, calls: Callable[[], Mapping[str, Callable[[], object]]],
               device: torch.device, names: Sequence[str] = (), per_call: int = 1) -> str:
        """per_call: how many operations one call runs (the table keeps seconds per operation)."""
        if self.override is not None:
            return self.override
        with self.table.lock:
            entry = self.table.entries.get(key)
            if entry is not None and entry.get("choice") in self.candidates \
                    and set(names) <= set(entry["ms"]) | set(entry.get("failed", ())):
                return entry["choice"]
            start = time.perf_counter()
            built = calls()
            timings = {n: Timing(t.best / per_call, t.median / per_call)
                       for n, t in measure(built, self.timer or wall_timer(device), self.budget_s).items()}
            choice = min(timings, key=lambda n: timings[n].best)
            self.table.measure_s += time.perf_counter() - start
            self.table.record(key, choice, timings, sorted(set(built) - set(timings)))
        log.info("kernel %s → %s (%s)", key, choice,
                 ", ".join(f"{n} {t.best * 1e3:.3f} ms (median {t.median * 1e3:.3f})" for n, t in timings.items()))
        return choice

    def seconds(self, key: str) -> dict[str, float] | None:
        """The measured (fastest-call) seconds per candidate of a key, if it has been measured."""
        entry = self.table.entries.get(key)
        return None if entry is None else {n: ms / 1e3 for n, ms in entry["ms"].items()}


def packed_beside(w: torch.Tensor, attr: str, pack: Callable[[torch.Tensor], object]) -> object:
    """pack(w), made once and kept on the tensor object as `attr`; made again when w has been written in place
    (its version counter moved), e.g. by fusion."""
    packed = getattr(w, attr, None)  # (w's version when packed, packed w)
    if packed is None or packed[0] != w._version:
        packed = (w._version, pack(w))
        setattr(w, attr, packed)
    return packed[1]
