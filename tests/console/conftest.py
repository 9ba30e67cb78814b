"""The console's browser tests: a real gateway + worker + trainer on the tiny model (real processes, the
session Redis), and Debian's chromium driven headless by Playwright (its own browser download does not
work on these machines; scripts/setup.sh installs chromium)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import redis

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "serving"))  # serving_cluster, serving_assets

from console_support import ADMIN_KEY, CHROMIUM, CHROMIUM_ARGS, KEY_A, KEY_B, REDIS_DB  # noqa: E402
from serving_assets import build_lora, build_tiny_model  # noqa: E402
from serving_cluster import ready_workers, start_gateway, start_trainer, start_worker, wait_until  # noqa: E402


@pytest.fixture(scope="module")
def console_cluster(valkey, tmp_path_factory):
    """Gateway (keys on: an admin key and two tenants), one worker and one trainer process."""
    url = f"{valkey.connection_url}/{REDIS_DB}"
    redis.Redis.from_url(url).flushdb()
    root = tmp_path_factory.mktemp("console")
    model = build_tiny_model(root / "model")
    logs, data = root / "logs", root / "data"
    logs.mkdir()
    procs = [start_worker("w0", model, url, logs, 1.5, data_dir=data),
             start_trainer("trainer-c", model, url, data, logs, "--checkpoint-every", "10", "--event-interval", "0.2")]
    gateway = start_gateway(url, data, logs, ADAPTERD_API_KEYS=f"{KEY_A}:tenant-a,{KEY_B}:tenant-b",
                            ADAPTERD_ADMIN_KEYS=ADMIN_KEY, ADAPTERD_BASE_MODEL_PATH=str(model))
    procs.append(gateway)
    trainers = redis.Redis.from_url(url)
    try:
        wait_until(lambda: ready_workers(gateway.url) == 1 and len(trainers.smembers("adapterd:v1:trainers")) == 1,
                   180, "a worker and a trainer", procs)
        yield {"url": gateway.url, "model": model, "root": root}
    finally:
        for p in procs:
            p.stop()


@pytest.fixture(scope="module")
def lora_dir(console_cluster):
    return build_lora(console_cluster["model"], console_cluster["root"] / "lora", seed=5)


@pytest.fixture(scope="module")
def browser():
    """Module-scoped: Playwright's sync API runs an event loop on this thread while it is open, which
    would break every asyncio test that runs after this module."""
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).is_file(), f"{CHROMIUM} is missing: scripts/setup.sh installs Debian's chromium"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="session")
def shots(tmp_path_factory) -> Path:
    """Where the tests write screenshots of each view (ADAPTERD_CONSOLE_SHOTS overrides the tmp dir)."""
    wanted = os.environ.get("ADAPTERD_CONSOLE_SHOTS")
    folder = Path(wanted) if wanted else tmp_path_factory.mktemp("console-shots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder
