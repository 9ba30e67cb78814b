"""The store's torch-free Medusa validation agrees with the engine's parser: v1 and v2 pass, every bad
file the engine refuses is refused at upload too."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_medusa import BAD, BASE, _edit, heads

from adapters_store.base_model import BaseModelSpec
from adapters_store.errors import IncompatibleAdapterError, InvalidAdapterError
from adapters_store.medusa_validation import CONFIG_NAME, WEIGHTS_NAME, is_medusa_upload, validate_medusa
from workers.adapters.medusa import write_medusa

SPEC = BaseModelSpec(model_type="llama", num_layers=BASE.num_layers, hidden_size=BASE.hidden_size,
                     intermediate_size=BASE.intermediate_size, num_heads=BASE.num_heads,
                     num_kv_heads=BASE.num_kv_heads, head_dim=BASE.head_dim, vocab_size=BASE.vocab_size)


def files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.mark.parametrize("version", [1, 2])
def test_both_layouts_pass(tmp_path, version):
    folder = write_medusa(tmp_path / "h", heads(version))
    info = validate_medusa(files(folder), SPEC)
    assert (info.num_heads, info.num_layers, info.version) == (3, 2, version)
    assert info.dense_bytes == sum(t.numel() * 4 for t in load_file(folder / WEIGHTS_NAME).values())
    assert is_medusa_upload(files(folder))


@pytest.mark.parametrize("name,config,tensors,make,match", BAD, ids=[b[0] for b in BAD])
def test_what_the_engine_refuses_the_store_refuses(tmp_path, name, config, tensors, make, match):
    folder = _edit(write_medusa(tmp_path / "h", heads(**make)), config, tensors)
    with pytest.raises((InvalidAdapterError, IncompatibleAdapterError)):
        validate_medusa(files(folder), SPEC)


def test_missing_or_broken_files(tmp_path):
    folder = write_medusa(tmp_path / "h", heads())
    good = files(folder)
    with pytest.raises(InvalidAdapterError, match=CONFIG_NAME):
        validate_medusa({WEIGHTS_NAME: good[WEIGHTS_NAME]}, SPEC)
    with pytest.raises(InvalidAdapterError, match="JSON"):
        validate_medusa({**good, CONFIG_NAME: b"{"}, SPEC)
    with pytest.raises(InvalidAdapterError, match="safetensors"):
        validate_medusa({**good, WEIGHTS_NAME: b"garbage!"}, SPEC)
    cfg = json.loads(good[CONFIG_NAME])
    bf16 = write_medusa(tmp_path / "b", heads())
    t = load_file(bf16 / WEIGHTS_NAME)
    from safetensors.torch import save_file

    save_file({k: v.to(torch.bfloat16) for k, v in t.items()}, bf16 / WEIGHTS_NAME)
    assert validate_medusa({CONFIG_NAME: json.dumps(cfg).encode(), WEIGHTS_NAME: (bf16 / WEIGHTS_NAME).read_bytes()},
                           SPEC).version == 2


# registry uploads --------------------------------------------------------------------------------------
def _registry(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "store"))
    from store_fixtures import BASE_CONFIG, lora_folder

    from adapters_store.backends import LocalBackend
    from adapters_store.validation import UploadLimits
    from adapters_store.version_store import VersionStore
    from server.allowed_folders import AllowList
    from server.dropin_adapters import DropInAdapters
    from server.tenant_adapters import TenantAdapters

    base = BaseModelSpec.from_config(BASE_CONFIG)
    catalog = DropInAdapters(AllowList([tmp_path / "adapters"]))
    registry = TenantAdapters(VersionStore(LocalBackend(tmp_path / "store")), catalog, base, UploadLimits(max_rank=16),
                               gc_grace_s=600)
    return registry, base, lora_folder


def _medusa_files(base, version=2, **config):
    from adapters_store.safetensors_file import write_tensors

    rng = np.random.default_rng(0)
    h, v = base.hidden_size, base.vocab_size
    tensors = {}
    for i in range(3):
        tensors[f"{i}.0.linear.weight"] = rng.normal(0, 0.02, (h, h)).astype(np.float32)
        tensors[f"{i}.0.linear.bias"] = np.zeros(h, np.float32)
        if version == 1:
            tensors[f"{i}.1.weight"] = rng.normal(0, 0.02, (v, h)).astype(np.float32)
    cfg = {"medusa_num_heads": 3, "medusa_num_layers": 1, "version": version, **config}
    return {CONFIG_NAME: json.dumps(cfg).encode(), WEIGHTS_NAME: write_tensors(tensors)}


def test_medusa_heads_upload_through_the_registry(tmp_path):
    from adapters_store.errors import StoreError
    from adapters_store.validation import UploadedFile
    from server.auth import Tenant
    from server.errors import GatewayError, from_store_error

    registry, base, lora_folder = _registry(tmp_path)
    alice = Tenant("alice")

    def upload(name, files, kind="medusa"):
        return registry.upload(alice, name, [UploadedFile(n, b) for n, b in files.items()], kind, None, False)

    for version in (1, 2):
        info = upload(f"heads-v{version}", _medusa_files(base, version))
        assert info.versions[-1].kind == "medusa"
    assert registry.describe(alice, "heads-v2").versions[-1].attach_to is None  # the base's heads
    upload("ada", lora_folder(), kind=None)
    upload("ada-heads", _medusa_files(base, adapter="ada"))
    assert registry.describe(alice, "ada-heads").versions[-1].attach_to == "ada@1"  # the version it fits
    with pytest.raises(GatewayError) as info:  # heads are not a model to run
        registry.resolve("ada-heads", alice)
    assert info.value.status == 400
    bad = [(_medusa_files(base, adapter="nobody"), 404),
           ({**_medusa_files(base), WEIGHTS_NAME: _medusa_files(BaseModelSpec(**{**base.__dict__, "hidden_size": 32}))
             [WEIGHTS_NAME]}, 422),
           (_medusa_files(base, hidden_size=32), 422),
           (_medusa_files(base, medusa_num_heads=0), 400)]
    for files, status in bad:
        with pytest.raises((GatewayError, StoreError)) as info:
            upload("bad", files)
        error = info.value if isinstance(info.value, GatewayError) else from_store_error(info.value)
        assert error.status == status, error.message
    with pytest.raises(StoreError):
        registry.describe(alice, "bad")
