"""The gateway's adapter registry remembers store answers briefly (two lookups per inference request),
and its own uploads and deletes are visible at once."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "store"))

from store_fixtures import BASE_CONFIG, lora_folder  # noqa: E402

from adapters_store.backends import LocalBackend  # noqa: E402
from adapters_store.base_model import BaseModelSpec  # noqa: E402
from adapters_store.registry import AdapterStore  # noqa: E402
from adapters_store.validation import UploadedFile, UploadLimits  # noqa: E402
from server.adapter_catalog import AdapterCatalog  # noqa: E402
from server.adapter_registry import AdapterRegistry  # noqa: E402
from server.allowed_folders import AllowList  # noqa: E402
from server.auth import Tenant  # noqa: E402


def test_store_lookups_are_remembered_and_own_writes_forget_them(tmp_path, monkeypatch):
    store = AdapterStore(LocalBackend(tmp_path / "store"))
    catalog = AdapterCatalog(AllowList([tmp_path / "adapters"]))
    registry = AdapterRegistry(store, catalog, BaseModelSpec.from_config(BASE_CONFIG), UploadLimits(max_rank=16),
                               gc_grace_s=600)
    calls = []
    real = store.resolve
    monkeypatch.setattr(store, "resolve", lambda ref: calls.append(ref) or real(ref))
    tenant = Tenant("a")
    assert registry.resolve("ada", tenant) is None
    registry.authorize("ada", tenant)
    assert calls == ["a/ada"]  # the second lookup was remembered (names are in the caller's namespace)
    registry.upload(tenant, "ada", [UploadedFile(n, b) for n, b in lora_folder().items()], None, None, False)
    assert registry.resolve("ada", tenant).version == "1"  # the upload forgot the remembered "absent"
    registry.delete(tenant, "ada")
    assert registry.resolve("ada", tenant) is None
