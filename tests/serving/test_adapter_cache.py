"""The worker's adapter folder cache is bounded by bytes (LRU, a grace for folders in use) and its per-name
locks do not accumulate."""

import asyncio
import os

from workers.service.folder_cache import FolderCache
from workers.service.keyed_locks import KeyedLocks


def make_folder(path, nbytes: int, last_use: float):
    path.mkdir(parents=True)
    (path / "adapter_model.safetensors").write_bytes(b"x" * nbytes)
    os.utime(path, (last_use, last_use))
    return path


def test_least_recently_used_folders_go_first_once_over_the_budget(tmp_path):
    now = 10_000.0
    cache = FolderCache(tmp_path, max_bytes=3000, grace_s=60, clock=lambda: now)
    old = make_folder(tmp_path / "v-old", 1000, now - 500)
    mid = make_folder(tmp_path / "v-mid", 1000, now - 400)
    merge = make_folder(tmp_path / "merges" / "m1", 1000, now - 300)
    (tmp_path / ".partial-x").mkdir()  # a write in progress is never counted nor removed
    assert cache.trim() == []  # 3000 bytes: within the budget
    new = make_folder(tmp_path / "v-new", 1000, now - 200)
    assert cache.used(mid) == [old]  # mid was just used: old is now the least recent
    assert not old.exists() and mid.exists() and merge.exists() and new.exists()
    make_folder(tmp_path / "v-big", 2500, now)
    removed = cache.trim()
    assert removed == [merge, new]  # mid is inside the grace period (used just now), so it stays
    assert (tmp_path / ".partial-x").is_dir()


async def test_per_name_locks_are_released_when_nobody_holds_them():
    locks = KeyedLocks()
    order = []

    async def load(name: str, i: int):
        async with locks.hold(name):
            order.append((name, i, "in"))
            await asyncio.sleep(0)
            order.append((name, i, "out"))

    await asyncio.gather(*(load(f"adapter-{i % 3}", i) for i in range(30)))
    assert len(locks) == 0
    for name in {n for n, _, _ in order}:  # one holder per name at a time: in, out, in, out …
        mine = [(i, step) for n, i, step in order if n == name]
        assert all(mine[k][1] == "in" and mine[k + 1] == (mine[k][0], "out") for k in range(0, len(mine), 2))
    assert len({n for n, _, _ in order}) == 3 and max(
        sum(1 for e in order[:k] if e[2] == "in") - sum(1 for e in order[:k] if e[2] == "out")
        for k in range(len(order))) > 1  # different names did overlap
