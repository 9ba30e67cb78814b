"""The store on both backends (local filesystem and S3 via moto): versions, aliases, content addressing,
deletion, crash safety, materialisation."""

import pytest
from store_fixtures import BASE_CONFIG, lora_folder

from adapters_store import compeft
from adapters_store.base_model import BaseModelSpec
from adapters_store.errors import AdapterNotFoundError, StoreCorruptionError
from adapters_store.ingest import CompressionRequest, prepare
from adapters_store.materialise import download_files, materialise
from adapters_store.safetensors_file import read_tensors
from adapters_store.validation import UploadedFile, UploadLimits
from adapters_store.version_store import BLOBS, blob_key

BASE = BaseModelSpec.from_config(BASE_CONFIG)


def publish(store, name="ada", seed=0, compression=None, owner="tenant-a", public=False):
    uploads = [UploadedFile(n, b) for n, b in lora_folder(seed=seed).items()]
    draft, files = prepare(uploads, BASE, UploadLimits(max_rank=16), name=name, owner=owner, public=public,
                           compression=compression)
    return store.publish(draft, files)


def test_versions_and_aliases_resolve(store):
    v1, v2 = publish(store, seed=0), publish(store, seed=1)
    assert (v1.version, v2.version) == (1, 2)
    assert store.resolve("ada").version == 2 and store.resolve("ada@latest").version == 2
    assert store.resolve("ada@1") == v1 and store.get("ada", 2) == v2
    assert store.resolve("ada@9") is None and store.resolve("no such!") is None and store.resolve("ada@x") is None
    assert store.names() == ["ada"] and [m.version for m in store.versions("ada")] == [1, 2]
    assert v1.owner == "tenant-a" and not v1.public and v1.base_fingerprint == BASE.fingerprint


def test_identical_bytes_share_one_blob(store):
    a, b = publish(store, name="one"), publish(store, name="two")
    assert a.files == b.files
    assert len(store.backend.list(BLOBS)) == 2  # config + weights, stored once


def test_deleted_versions_stay_deleted_and_numbers_are_not_reused(store):
    publish(store, seed=0)
    publish(store, seed=1)
    store.delete_version("ada", 2)
    assert store.resolve("ada").version == 1 and store.resolve("ada@2") is None
    assert publish(store, seed=2).version == 3
    store.delete_name("ada")
    assert store.names() == [] and store.resolve("ada") is None
    with pytest.raises(AdapterNotFoundError):
        store.get("ada")
    with pytest.raises(AdapterNotFoundError):
        store.delete_name("ada")


def test_crash_between_blobs_and_manifest_leaves_no_version(store, monkeypatch):
    publish(store, name="kept")

    def crash(manifest):
        raise RuntimeError("power cut")

    monkeypatch.setattr(store, "_publish_manifest", crash)
    with pytest.raises(RuntimeError):
        publish(store, name="lost", seed=5)
    monkeypatch.undo()
    assert store.names() == ["kept"] and store.resolve("lost") is None
    assert store.collect_garbage(grace_s=0) == 1  # the orphaned weights blob (the config blob is shared)
    assert store.resolve("kept") is not None and store.read_file(store.resolve("kept"), "adapter_config.json")


def test_corrupted_blob_is_detected(store):
    m = publish(store)
    store.backend.write(blob_key(m.files["adapter_config.json"].sha256), b"{}")
    with pytest.raises(StoreCorruptionError):
        store.read_file(m, "adapter_config.json")


def test_compressed_version_materialises_compressed_and_downloads_dense(store, tmp_path):
    m = publish(store, compression=CompressionRequest(density=0.2, alpha=1.0))
    assert m.kind == "compeft" and m.compression_ratio > 4
    folder = materialise(store, m.ref, tmp_path / "cache")  # what a worker gets: as stored
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", compeft.FILENAME]
    assert (folder / compeft.FILENAME).read_bytes() == store.read_file(m, compeft.FILENAME)
    tensors = read_tensors(download_files(store, m)["adapter_model.safetensors"])  # what a download gets
    for t in tensors.values():  # ternary: one magnitude per tensor
        assert len({abs(float(v)) for v in t.ravel() if v}) == 1
    assert materialise(store, m.ref, tmp_path / "cache") == folder  # cached
    with pytest.raises(AdapterNotFoundError):
        materialise(store, "ada@9", tmp_path / "cache")
