"""Worker tests put adapters where workers take them from: a version in the worker's own store
(`DATA_DIR/store`), published here without the gateway's upload checks (the worker checks what it loads).
Torch-free."""

from __future__ import annotations

from pathlib import Path

from adapters_store.adapter_source import store_source
from adapters_store.backends import LocalBackend
from adapters_store.manifest import Manifest
from adapters_store.version_store import VersionStore


def store_files(data_dir: Path, name: str, files: dict[str, bytes]) -> str:
    """Publishes `files` as the next version of `name`; returns its source (`store:name@N`)."""
    draft = Manifest(name=name, version=0, kind="lora", base_fingerprint="", rank=0, alpha=0.0, use_rslora=False,
                     targets=[], layers=0, files={}, dense_bytes=0, original_bytes=0, owner="test")
    return store_source(VersionStore(LocalBackend(Path(data_dir) / "store")).publish(draft, files).ref)


def store_folder(data_dir: Path, name: str, folder: Path) -> str:
    """The regular files of `folder`, published as above."""
    return store_files(data_dir, name, {p.name: p.read_bytes() for p in Path(folder).iterdir() if p.is_file()})
