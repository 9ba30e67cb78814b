"""A stored version → a local folder. Downloads get a PEFT folder (`adapter_config.json` +
`adapter_model.safetensors`) that peft loads: ComPEFT weights are decoded to dense float32. Workers get a
*store reference* from the gateway (`{store url}#{name}@{version}`) and materialise the version's files
as stored into a local cache directory, keyed by the manifest's content id: a ComPEFT adapter stays
compressed there and in the worker's host cache, and is decoded only when it moves onto the device."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from adapters_store import compeft, safetensors_file
from adapters_store.backends import open_backend
from adapters_store.errors import AdapterNotFoundError
from adapters_store.manifest import Manifest
from adapters_store.registry import AdapterStore
from adapters_store.validation import CONFIG_NAME, SAFETENSORS_NAME

_SCHEMES = ("file://", "s3://")


def peft_files(store: AdapterStore, manifest: Manifest) -> dict[str, bytes]:
    weights = store.read_file(manifest, manifest.weights_name)
    if manifest.weights_name == compeft.FILENAME:
        weights = safetensors_file.write_tensors(compeft.decode(weights).to_dense())
    return {CONFIG_NAME: store.read_file(manifest, CONFIG_NAME), SAFETENSORS_NAME: weights}


def stored_files(store: AdapterStore, manifest: Manifest) -> dict[str, bytes]:
    return {CONFIG_NAME: store.read_file(manifest, CONFIG_NAME),
            manifest.weights_name: store.read_file(manifest, manifest.weights_name)}


def store_ref(store_url: str, manifest: Manifest) -> str:
    return f"{store_url}#{manifest.ref}"


def is_store_ref(path: str) -> bool:
    return path.startswith(_SCHEMES) and "#" in path


def materialise(ref: str, cache_dir: str | Path) -> Path:
    """The stored files of `ref`, written once under `cache_dir` (atomically)."""
    url, _, adapter = ref.rpartition("#")
    store = AdapterStore(open_backend(url))
    manifest = store.resolve(adapter)
    if manifest is None:
        raise AdapterNotFoundError(f"adapter {adapter!r} is not in the store at {url}", param="adapter")
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
