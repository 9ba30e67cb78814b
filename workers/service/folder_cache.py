"""The worker's on-disk adapter cache (materialised store versions, per-request merges), bounded by bytes:
least recently used folders go first once the total passes `max_bytes` (default 2 GiB). A folder's mtime
is its last use, so every worker sharing the cache dir sees the same order; a folder used within
`grace_s` is never removed (another load may be reading it). Blocking I/O: call it off the event loop."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

DEFAULT_MAX_BYTES = 2 * 1024**3


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


class FolderCache:
    def __init__(self, root: Path, max_bytes: int = DEFAULT_MAX_BYTES, grace_s: float = 60.0,
                 clock: Callable[[], float] = time.time):
        self.root, self.max_bytes, self.grace_s, self.clock = Path(root), max_bytes, grace_s, clock

    def used(self, folder: str | Path) -> list[Path]:
        """Marks `folder` (under root) as just used, then trims; returns the folders removed."""
        folder = Path(folder)
        if folder.is_dir() and folder.is_relative_to(self.root):
            now = self.clock()
            os.utime(folder, (now, now))
        return self.trim()

    def entries(self) -> list[tuple[float, int, Path]]:
        """(last use, bytes, folder) of every complete folder: versions under root, merges under root/merges."""
        out = []
        for parent in (self.root, self.root / "merges"):
            if not parent.is_dir():
                continue
            for folder in parent.iterdir():
                if folder.is_dir() and not folder.name.startswith(".partial-") and folder != self.root / "merges":
                    try:
                        out.append((folder.stat().st_mtime, folder_bytes(folder), folder))
                    except OSError:  # removed meanwhile by another worker
                        continue
        return out

    def trim(self) -> list[Path]:
        entries = sorted(self.entries())  # least recently used first
        total = sum(size for _, size, _ in entries)
        removed, now = [], self.clock()
        for last_use, size, folder in entries:
            if total <= self.max_bytes:
                break
            if now - last_use < self.grace_s:
                continue
            shutil.rmtree(folder, ignore_errors=True)
            total -= size
            removed.append(folder)
        return removed
