"""Typed gateway configuration (pydantic-settings; env prefix `ADAPTERD_`).

API keys: `ADAPTERD_API_KEYS="key1:tenant-a,key2:tenant-b"` (a key without `:tenant` belongs to the
tenant `default`). Admin (operator) keys: `ADAPTERD_ADMIN_KEYS="key1,key2"`. With no keys, auth is off,
which is allowed only on a loopback host unless `ADAPTERD_ALLOW_INSECURE=true`.

Cluster secret (signs every call to a worker and verifies worker registrations): `ADAPTERD_CLUSTER_SECRET`
or `ADAPTERD_CLUSTER_SECRET_FILE`; the gateway does not start without one.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from adapters_store.cluster_auth import ClusterSigner, load_secret
from adapters_store.manifest import NAMESPACE_PATTERN


class InsecureBindError(RuntimeError):
    """Binding to a non-loopback address with no API keys and without the explicit insecure flag."""


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ADAPTERD_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8000
    redis_url: str = "redis://127.0.0.1:6379/0"
    data_dir: Path = Path(".adapterd")
    api_keys: str = ""
    admin_keys: str = ""  # operator keys: cluster-wide views (metrics, workers, placement)
    allow_insecure: bool = False
    cluster_secret: str = Field("", repr=False)
    cluster_secret_file: Path | None = None
    model_id: str = ""  # the base model's id if known before any worker registers

    # routing
    registry_refresh_s: float = Field(0.25, gt=0)  # how often the live-worker snapshot is re-read
    worker_down_s: float = Field(5.0, ge=0)  # a worker that failed is skipped this long
    # a worker record counts while its signed heartbeat time is within its TTL, capped at this
    worker_record_max_age_s: float = Field(60.0, gt=0)
    queue_max: int = Field(256, ge=0)  # requests waiting for a free worker slot
    queue_timeout_s: float = Field(30.0, ge=0)
    retry_after_s: int = Field(1, ge=1)

    # worker calls
    worker_connect_timeout_s: float = Field(2.0, gt=0)
    worker_read_timeout_s: float = Field(120.0, gt=0)
    max_connections: int = Field(512, ge=1)
    # traces: an OTLP/HTTP base URL (else the standard OTEL_EXPORTER_OTLP_*ENDPOINT; none: tracing off)
    otlp_endpoint: str = ""

    # request defaults / limits
    default_max_tokens: int = Field(256, ge=1)
    max_request_bytes: int = Field(4 * 1024 * 1024, ge=1024)

    # adapter store and uploads
    store_url: str = ""  # file:///dir or s3://bucket/prefix?endpoint_url=…; default: DATA_DIR/store
    base_model_path: Path | None = None  # the base model folder (its config.json checks uploads)
    max_upload_bytes: int = Field(1024 * 1024 * 1024, ge=1024)  # one upload request, all files
    max_adapter_file_bytes: int = Field(512 * 1024 * 1024, ge=1024)
    max_adapter_rank: int = Field(256, ge=1)
    max_archive_bytes: int = Field(1024 * 1024 * 1024, ge=1024)  # an archive's contents, decompressed
    max_archive_ratio: float = Field(200.0, gt=1)
    store_gc_grace_s: float = Field(600.0, ge=0)  # unreferenced blobs younger than this are kept
    drain_grace_s: float = Field(30.0, ge=0)  # SIGTERM: open requests and streams get this long to finish
    # the allow-list of local folders adapters are read from (drop-ins, the admin import, vLLM's
    # /v1/load_lora_adapter, LoRAX's adapter_source "local"), comma-separated; default: DATA_DIR/adapters
    adapter_allow_dirs: str = ""

    # fine-tune files and jobs
    max_training_file_bytes: int = Field(256 * 1024 * 1024, ge=1024)  # one JSONL training file
    max_training_file_lines: int = Field(1_000_000, ge=1)
    max_training_line_bytes: int = Field(1024 * 1024, ge=64)
    max_job_list_limit: int = Field(100, ge=1)

    def adapter_allow_list(self) -> list[Path]:
        dirs = [d.strip() for d in self.adapter_allow_dirs.split(",") if d.strip()]
        return [Path(d).resolve() for d in dirs] or [(self.data_dir / "adapters").resolve()]

    @property
    def resolved_store_url(self) -> str:
        return self.store_url or (self.data_dir / "store").resolve().as_uri()

    def tenants_by_key(self) -> dict[str, str]:
        keys: dict[str, str] = {}
        for item in self.api_keys.replace("\n", ",").split(","):
            item = item.strip()
            if not item:
                continue
            key, _, tenant = item.partition(":")
            tenant = tenant.strip() or "default"
            if not NAMESPACE_PATTERN.match(tenant):  # a tenant's name is its adapters' namespace
                raise ValueError(f"tenant name {tenant!r}: use letters, digits, '.', '_', '-' (64 at most)")
            keys[key.strip()] = tenant
        return keys

    def admin_key_list(self) -> tuple[str, ...]:
        return tuple(k.strip() for k in self.admin_keys.replace("\n", ",").split(",") if k.strip())

    def cluster_signer(self) -> ClusterSigner:
        """Raises ClusterSecretError when no secret is configured."""
        return ClusterSigner(load_secret(self.cluster_secret, self.cluster_secret_file, env={}))

    @property
    def auth_enabled(self) -> bool:
        return bool(self.tenants_by_key() or self.admin_key_list())

    def check_bind_safety(self) -> None:
        if self.auth_enabled or self.allow_insecure or is_loopback(self.host):
            return
        raise InsecureBindError(
            f"refusing to bind {self.host} with no API keys: set ADAPTERD_API_KEYS, bind 127.0.0.1, "
            "or pass the explicit insecure flag (--allow-insecure / ADAPTERD_ALLOW_INSECURE=true)"
        )


def is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
