"""S²FT uploads through the store, torch-free: the format checked against the base (typed errors naming
the problem), ComPEFT compression of the deltas with the indices kept exact, download of the dense folder."""

import json

import numpy as np
import pytest
from store_fixtures import BASE_CONFIG

from adapters_store import compeft, s2ft_format
from adapters_store.backends import LocalBackend
from adapters_store.base_model import BaseModelSpec
from adapters_store.errors import IncompatibleAdapterError, InvalidAdapterError
from adapters_store.ingest import CompressionRequest, prepare
from adapters_store.kinds import validate_upload
from adapters_store.materialise import download_files, stored_files
from adapters_store.safetensors_file import read_tensors, write_tensors
from adapters_store.validation import UploadedFile, UploadLimits
from adapters_store.version_store import VersionStore

BASE = BaseModelSpec.from_config(BASE_CONFIG)  # hidden 64, intermediate 128, 4 heads (d 16), 2 KV heads
LIMITS = UploadLimits()


def s2ft_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "model.layers.0.self_attn.o_proj.index": np.array([3, 1], dtype=np.int64),
        "model.layers.0.self_attn.o_proj.delta": rng.normal(0, 0.1, (64, 32)).astype(np.float32),
        "model.layers.1.mlp.down_proj.index": np.array([7, 2, 90], dtype=np.int64),
        "model.layers.1.mlp.down_proj.delta": rng.normal(0, 0.1, (64, 3)).astype(np.float32),
        "model.layers.1.self_attn.v_proj.index": np.array([1], dtype=np.int64),
        "model.layers.1.self_attn.v_proj.delta": rng.normal(0, 0.1, (16, 64)).astype(np.float32),
    }


def s2ft_folder(tensors=None, **config) -> dict[str, bytes]:
    cfg = {"format": "s2ft", "version": 1, "modules": ["o_proj", "down_proj", "v_proj"], **config}
    return {s2ft_format.CONFIG_FILE: json.dumps(cfg).encode(),
            s2ft_format.WEIGHTS_FILE: write_tensors(s2ft_tensors() if tensors is None else tensors)}


def with_tensor(key: str, value: np.ndarray) -> dict[str, bytes]:
    return s2ft_folder({**s2ft_tensors(), key: value})


def test_a_valid_folder_is_recognised_and_described():
    adapter = validate_upload(s2ft_folder(), BASE, LIMITS)
    assert adapter.kind == "s2ft" and adapter.weights_name == s2ft_format.WEIGHTS_FILE
    assert adapter.targets == ("o_proj", "down_proj", "v_proj") and adapter.layers == 2
    assert adapter.dense_bytes == 4 * (64 * 32 + 64 * 3 + 16 * 64)
    assert validate_upload(s2ft_folder(), BASE, LIMITS, kind="s2ft").kind == "s2ft"


BAD = {
    "head out of range": (with_tensor("model.layers.0.self_attn.o_proj.index", np.array([1, 4])),
                          "head 4 out of range"),
    "kv head out of range (GQA)": (with_tensor("model.layers.1.self_attn.v_proj.index", np.array([2])),
                                   "kv_head 2 out of range"),
    "duplicate channels": (with_tensor("model.layers.1.mlp.down_proj.index", np.array([7, 2, 7])), "duplicate"),
    "wrong delta shape": (with_tensor("model.layers.0.self_attn.o_proj.delta", np.zeros((64, 16), np.float32)),
                          "shape"),
    "float index": (with_tensor("model.layers.0.self_attn.o_proj.index", np.array([1.0, 3.0], np.float32)),
                    "not an integer"),
    "layer out of range": (with_tensor("model.layers.2.self_attn.o_proj.index", np.array([0])), "layer 2"),
    "non-finite": (with_tensor("model.layers.1.self_attn.v_proj.delta", np.full((16, 64), np.nan, np.float32)),
                   "non-finite"),
    "bad version": (s2ft_folder(version=3), "version 3"),
    "stray file": ({**s2ft_folder(), "notes.txt": b"hi"}, "unexpected files"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_folders_are_refused_with_the_problem_named(case):
    files, message = BAD[case]
    with pytest.raises((InvalidAdapterError, IncompatibleAdapterError), match=message):
        validate_upload(files, BASE, LIMITS)


def test_a_kind_that_disagrees_with_the_files_is_refused():
    with pytest.raises(InvalidAdapterError, match="kind 'lora' but the files are a s2ft adapter"):
        validate_upload(s2ft_folder(), BASE, LIMITS, kind="lora")


def test_compression_keeps_indices_exact_and_download_gives_the_decoded_dense_folder(tmp_path):
    store = VersionStore(LocalBackend(tmp_path))
    uploads = [UploadedFile(n, b) for n, b in s2ft_folder().items()]
    draft, files = prepare(uploads, BASE, LIMITS, name="s", owner="alice",
                           compression=CompressionRequest(density=0.25, alpha=1.0))
    assert set(files) == {s2ft_format.CONFIG_FILE, compeft.FILENAME, s2ft_format.INDEX_FILE}
    m = store.publish(draft, files)
    assert m.kind == "s2ft" and m.compression["density"] == 0.25 and m.weights_name == compeft.FILENAME
    assert m.compression_ratio > 4
    assert stored_files(store, m) == files  # the worker gets the compressed files as stored
    dense = read_tensors(download_files(store, m)[s2ft_format.WEIGHTS_FILE])
    original, packed = s2ft_tensors(), compeft.decode(files[compeft.FILENAME]).to_dense()
    for key, value in original.items():
        if key.endswith(".index"):
            assert dense[key].dtype == np.int64 and np.array_equal(dense[key], value)
        else:
            assert np.array_equal(dense[key], packed[key])
            kept = dense[key] != 0
            assert kept.mean() == pytest.approx(0.25, abs=0.02)
            assert np.array_equal(np.sign(dense[key][kept]), np.sign(value[kept]))
    validate_upload(download_files(store, m), BASE, LIMITS)  # the download uploads again


def test_an_already_compressed_upload_is_accepted_but_not_compressed_twice(tmp_path):
    packed = s2ft_format.compressed_files(s2ft_folder()[s2ft_format.CONFIG_FILE], s2ft_tensors(), 0.5, 1.0)
    adapter = validate_upload(packed, BASE, LIMITS)
    assert adapter.kind == "s2ft" and adapter.compress is None
    uploads = [UploadedFile(n, b) for n, b in packed.items()]
    with pytest.raises(InvalidAdapterError, match="already ComPEFT-compressed"):
        prepare(uploads, BASE, LIMITS, name="s", owner="a", compression=CompressionRequest())
    no_index = {k: v for k, v in packed.items() if k != s2ft_format.INDEX_FILE}
    with pytest.raises(InvalidAdapterError, match="needs s2ft_index.safetensors"):
        validate_upload(no_index, BASE, LIMITS)
