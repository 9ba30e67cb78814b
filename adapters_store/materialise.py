"""A stored version → a local folder. Downloads get the kind's plain folder (for a LoRA, a PEFT folder that
peft loads): ComPEFT-compressed weights are decoded to dense float32. Workers get a pinned version's
name from the gateway (`adapters_store.adapter_source`) and materialise its files as stored, from their
own configured store, into a local cache directory, keyed by the manifest's content id: a ComPEFT adapter
stays compressed there and in the worker's host cache, and is decoded only when it moves onto the device."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from adapters_store import compeft, kinds
from adapters_store.errors import AdapterNotFoundError
from adapters_store.manifest import Manifest
from adapters_store.version_store import VersionStore


def download_files(store: VersionStore, manifest: Manifest) -> dict[str, bytes]:
    """The folder a user downloads: ComPEFT-compressed weights decoded to dense float32 safetensors."""
    files = stored_files(store, manifest)
    if compeft.FILENAME not in files:
        return files
    return kinds.by_name(manifest.kind).dense_files(files)


def stored_files(store: VersionStore, manifest: Manifest) -> dict[str, bytes]:
    return {name: store.read_file(manifest, name) for name in manifest.files}


def materialise(store: VersionStore, ref: str, cache_dir: str | Path) -> Path:
    """The stored files of version `ref` (`name@3`), written once under `cache_dir` (atomically)."""
    manifest = store.resolve(ref)
    if manifest is None:
        raise AdapterNotFoundError(f"adapter {ref!r} is not in the store", param="adapter")
    cache = Path(cache_dir)
    folder = cache / manifest.content_id
    if (folder / manifest.weights_name).is_file():
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".partial-"))
    try:
        for name, data in stored_files(store, manifest).items():
            (tmp / name).write_bytes(data)
        os.rename(tmp, folder)
    except OSError:
        if not (folder / manifest.weights_name).is_file():  # not a lost race with another materialiser
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
