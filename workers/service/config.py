"""Typed configuration of the worker HTTP service (built by the entry point, passed in)."""

from __future__ import annotations

import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class WorkerServiceConfig:
    host: str = "127.0.0.1"
    port: int = 9001
    advertise_url: str = ""  # what the gateway calls; default http://{host}:{port} (see `url`)
    redis_url: str | None = None  # None → no registration (standalone worker)
    worker_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    heartbeat_ttl_s: float = 5.0
    heartbeat_interval_s: float = 0.0  # 0 → ttl / 3
    max_adapters: int = 8  # resident adapters at once (the engine's LoRA slots)
    cluster_secret: bytes = field(default=b"", repr=False)  # required: requests and heartbeats are signed
    data_dir: Path = Path(".adapterd")  # store/ and worker-cache/ live here
    store_url: str = ""  # the adapter store adapters load from; default DATA_DIR/store (as the gateway's)
    max_request_bytes: int = 16 * 1024 * 1024  # one request body, counted on the stream (413 past it)
    adapter_cache_bytes: int = 2 * 1024**3  # on-disk adapter folders (store versions, merges), LRU
    max_chars_per_token: int = 16  # prompts over max_seq × this many characters are refused before encoding
    drain_grace_s: float = 30.0  # SIGTERM: in-flight requests get this long to finish (workers.service.drain)
    model_path: str = ""  # the base model folder: its config.json shapes are published for upload checks

    @property
    def url(self) -> str:
        """The advertised URL; a wildcard bind (0.0.0.0, ::) advertises this host's own address (its
        hostname resolved: a container's or pod's IP), so scaled replicas need no per-replica flag."""
        if self.advertise_url:
            return self.advertise_url
        host = self.host
        if host in ("0.0.0.0", "::", ""):
            try:
                host = socket.gethostbyname(socket.gethostname())
            except OSError:
                host = socket.gethostname()
        return f"http://{host}:{self.port}"

    @property
    def resolved_store_url(self) -> str:
        return self.store_url or (self.data_dir / "store").resolve().as_uri()

    @property
    def cache_dir(self) -> Path:
        return self.data_dir / "worker-cache"

    @property
    def interval_s(self) -> float:
        return self.heartbeat_interval_s or self.heartbeat_ttl_s / 3
