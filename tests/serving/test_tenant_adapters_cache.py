"""The gateway's adapter registry remembers store answers briefly (two lookups per inference request),
and its own uploads and deletes are visible at once."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "store"))

from store_fixtures import BASE_CONFIG, lora_folder  # noqa: E402

from adapters_store.backends import LocalBackend  # noqa: E402
from adapters_store.base_model import BaseModelSpec  # noqa: E402
from adapters_store.validation import UploadedFile, UploadLimits  # noqa: E402
from adapters_store.version_store import VersionStore  # noqa: E402
from server import tenant_adapters  # noqa: E402
from server.allowed_folders import AllowList  # noqa: E402
from server.auth import Tenant  # noqa: E402
from server.dropin_adapters import DropInAdapters  # noqa: E402
from server.tenant_adapters import TenantAdapters  # noqa: E402


def test_store_lookups_are_remembered_and_own_writes_forget_them(tmp_path, monkeypatch):
    store = VersionStore(LocalBackend(tmp_path / "store"))
    catalog = DropInAdapters(AllowList([tmp_path / "adapters"]))
    registry = TenantAdapters(store, catalog, BaseModelSpec.from_config(BASE_CONFIG), UploadLimits(max_rank=16),
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


def test_a_drop_in_is_imported_once_per_content_and_again_when_it_changes_or_goes(tmp_path, monkeypatch):
    """A drop-in folder's first use imports it as the operator's public `admin/NAME`; later uses reuse that
    version (also after a restart: the store is asked by content); new files make a new version; a deleted
    version is imported again."""
    store = VersionStore(LocalBackend(tmp_path / "store"))
    monkeypatch.setattr(tenant_adapters, "RESOLVE_TTL_S", 0.0)  # every store answer is asked afresh

    def registry() -> TenantAdapters:
        return TenantAdapters(store, DropInAdapters(AllowList([tmp_path / "adapters"])),
                               BaseModelSpec.from_config(BASE_CONFIG), UploadLimits(max_rank=16), gc_grace_s=600)

    folder = tmp_path / "adapters" / "ada"
    folder.mkdir(parents=True)
    for name, data in lora_folder(seed=1).items():
        (folder / name).write_bytes(data)
    gateway, tenant = registry(), Tenant("a")
    first = gateway.resolve("ada", tenant)
    assert first.ref == "admin/ada@1" and first.manifest.public and first.manifest.owner == "admin"
    assert first.source == "store:admin/ada@1"
    assert gateway.resolve("ada", tenant).ref == registry().resolve("ada", Tenant("b")).ref == "admin/ada@1"
    (folder / "adapter_model.safetensors").write_bytes(lora_folder(seed=2)["adapter_model.safetensors"])
    assert gateway.resolve("ada", tenant).ref == "admin/ada@2"
    store.delete_version("admin/ada", 2)
    assert gateway.resolve("ada", tenant).ref == "admin/ada@3"
    assert [m.version for m in store.versions("admin/ada")] == [1, 3]
