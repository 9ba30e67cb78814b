"""The manifest of one immutable adapter version: what it is, what it fits, whose it is, and the
content-addressed files it is made of. Stored as JSON; a deleted version leaves a tombstone so that its
number is never reused (engines cache adapters by `name@version`)."""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import asdict, dataclass, field

from adapters_store.errors import StoreCorruptionError

MANIFEST_FORMAT = 1
NAMESPACE = r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}"  # a tenant's name
NAMESPACE_PATTERN = re.compile(f"^{NAMESPACE}$")
# `NAMESPACE/NAME`: the owner tenant's namespace, then the name (the gateway always stores both parts; a bare
# name is still a valid store name for direct users of the store, such as tests and benchmarks)
NAME_PATTERN = re.compile(f"^(?:{NAMESPACE}/)?[A-Za-z0-9_-][A-Za-z0-9._:-]{{0,99}}$")


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int


@dataclass(frozen=True)
class Manifest:
    name: str
    version: int
    kind: str  # "lora" | "compeft" (a LoRA stored ComPEFT-compressed) | "s2ft" | "medusa" (speculative heads)
    base_fingerprint: str
    rank: int
    alpha: float
    use_rslora: bool
    targets: list[str]
    layers: int
    files: dict[str, FileEntry]  # the stored folder: a config, one weights file (+ the S²FT index file)
    dense_bytes: int  # the same tensors as float32
    original_bytes: int  # the weights file as uploaded
    owner: str
    public: bool = False
    compression: dict | None = None  # {"method": "compeft", "density", "alpha"} when compressed here
    created: float = field(default_factory=time.time)
    format: int = MANIFEST_FORMAT
    attach_to: str | None = None  # medusa: the adapter version (name@version) the heads serve; None: the base

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def stored_bytes(self) -> int:
        return sum(f.size for f in self.files.values())

    @property
    def weights_name(self) -> str:
        """The file holding the weights: `adapter_model.*`, else the one file that is not JSON."""
        return next((n for n in self.files if n.startswith("adapter_model.")),
                    next(n for n in self.files if not n.endswith(".json")))

    @property
    def compression_ratio(self) -> float:
        """Uploaded weights bytes / stored weights bytes (1.0 when stored as uploaded)."""
        return self.original_bytes / max(1, self.files[self.weights_name].size)

    @property
    def content_id(self) -> str:
        """Names this exact version's bytes (a cache key for materialised folders)."""
        return hashlib.sha256(self.to_json()).hexdigest()

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Manifest | None:
        """The manifest, or None for a tombstone."""
        try:
            data = json.loads(raw)
            if data.get("deleted"):
                return None
            data["files"] = {n: FileEntry(**f) for n, f in data["files"].items()}
            return cls(**data)
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError, AttributeError) as e:
            raise StoreCorruptionError(f"unreadable manifest: {e}") from e


def tombstone(name: str, version: int) -> bytes:
    return json.dumps({"name": name, "version": version, "deleted": True, "deleted_at": time.time()}).encode()
