"""Keys, browser flags and small helpers shared by the console's conftest and tests (a module of its own:
`conftest` as a module name collides between test folders)."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import httpx

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ADMIN_KEY, KEY_A, KEY_B = "key-console-admin", "key-console-a", "key-console-b"
REDIS_DB = 11


def zipped(folder: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for f in sorted(folder.iterdir()):
            if f.is_file():
                z.write(f, f"{folder.name}/{f.name}")
    return buf.getvalue()


def api(cluster, key: str) -> httpx.Client:
    return httpx.Client(base_url=cluster["url"], headers={"authorization": f"Bearer {key}"}, timeout=60)
