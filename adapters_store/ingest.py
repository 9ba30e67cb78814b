"""Upload → what to store: collect and validate the files, optionally ComPEFT-compress the weights, and
draft the manifest. Nothing here writes; `VersionStore.publish` does, and only after all of it passed."""

from __future__ import annotations

from dataclasses import dataclass

from adapters_store import kinds
from adapters_store.base_model import BaseModelSpec
from adapters_store.errors import InvalidAdapterError
from adapters_store.kinds import validate_upload
from adapters_store.manifest import NAME_PATTERN, Manifest
from adapters_store.mapped_files import Buffer
from adapters_store.validation import UploadedFile, UploadLimits, ValidatedAdapter, collect_files


@dataclass(frozen=True)
class CompressionRequest:
    method: str = "compeft"
    density: float = 0.1
    alpha: float = 1.0

    @classmethod
    def from_dict(cls, raw: object) -> CompressionRequest:
        if not isinstance(raw, dict) or set(raw) - {"method", "density", "alpha"}:
            raise InvalidAdapterError('compression must be {"method":"compeft","density":…,"alpha":…}',
                                      param="compression")
        request = cls(**raw)
        if request.method != "compeft":
            raise InvalidAdapterError(f"compression method {request.method!r} is not supported (only 'compeft')",
                                      param="compression")
        if not isinstance(request.density, int | float) or not 0 < request.density <= 1:
            raise InvalidAdapterError("compression.density must be in (0, 1]", param="compression")
        if not isinstance(request.alpha, int | float) or not 0 < request.alpha < 1000:
            raise InvalidAdapterError("compression.alpha must be a positive number", param="compression")
        return request


def check_name(name: str) -> str:
    if not NAME_PATTERN.match(name):
        raise InvalidAdapterError(
            "adapter names use letters, digits, '.', '_', '-', ':' (no leading '.' or ':', at most 100 characters), "
            "optionally after your tenant's name and '/'",
            param="name")
    return name


def prepare(uploads: list[UploadedFile], base: BaseModelSpec, limits: UploadLimits, *, name: str, owner: str,
            public: bool = False, kind: str | None = None,
            compression: CompressionRequest | None = None) -> tuple[Manifest, dict[str, Buffer]]:
    """The manifest draft (version and files filled in by `publish`) and the files to store."""
    check_name(name)
    adapter = validate_upload(collect_files(uploads, limits), base, limits, kind)
    files = adapter.files
    if compression is not None:
        if kinds.by_name(adapter.kind).dense_files is None:
            raise InvalidAdapterError("Medusa heads are stored as uploaded; compression is for LoRA and S²FT",
                                      param="compression")
        if adapter.compress is None:
            raise InvalidAdapterError("the upload is already ComPEFT-compressed", param="compression")
        files = adapter.compress(compression.density, compression.alpha)
    return _draft(adapter, base, name, owner, public, compression), files


def _draft(adapter: ValidatedAdapter, base: BaseModelSpec, name: str, owner: str, public: bool,
           compression: CompressionRequest | None) -> Manifest:
    compressed_name = kinds.by_name(adapter.kind).compressed_name
    kind = compressed_name if compression is not None and compressed_name else adapter.kind
    return Manifest(
        name=name,
        version=0,
        kind=kind,
        base_fingerprint=base.fingerprint,
        rank=adapter.rank,
        alpha=adapter.alpha,
        use_rslora=adapter.use_rslora,
        targets=list(adapter.targets),
        layers=adapter.layers,
        files={},
        dense_bytes=adapter.dense_bytes,
        original_bytes=adapter.original_bytes,
        owner=owner,
        public=public,
        compression=None if compression is None else {
            "method": compression.method, "density": compression.density, "alpha": compression.alpha},
    )
