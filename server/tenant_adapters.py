"""The gateway's adapter registry: uploads (validate → optional ComPEFT → publish), listing, download and
deletion on the `VersionStore`, tenant visibility, and model-name resolution for inference.

Names are per tenant: the full name is `TENANT/NAME[@VERSION]` (the store keeps it so); a bare `NAME` means
the caller's own `CALLER/NAME`, and the API shows the caller's names bare and other tenants' in full. So the
same bare name in two tenants is two adapters, and an upload never tells whether another tenant has a name.
A version is visible to its owner, and to every tenant when it is public (by its full name); an invisible
adapter looks exactly like a missing one (404). Only the owner deletes. Adapters in the operator's drop-in
folders (the allow-list, default `DATA_DIR/adapters`, see `server.dropin_adapters`) are servable to every
tenant by their bare name, after the caller's own adapters of that name: the first use of a folder (and the
first after its files change) imports it into the store, validated like an upload, as a public version of
`admin/NAME` (the operator's namespace), so workers only ever load store versions.

The store does blocking I/O: call the upload / list / download / delete methods off the event loop.
"""

from __future__ import annotations

import hashlib
import io
import threading
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from adapters_store import bounded_json, kinds, medusa_validation
from adapters_store.adapter_source import store_source
from adapters_store.archives import ArchiveLimits
from adapters_store.backends import open_backend
from adapters_store.base_model import BaseModelSpec
from adapters_store.errors import AdapterNotFoundError, InvalidAdapterError
from adapters_store.ingest import CompressionRequest, check_name, prepare
from adapters_store.manifest import NAMESPACE_PATTERN, Manifest
from adapters_store.mapped_files import Buffer
from adapters_store.materialise import download_files, stored_files
from adapters_store.merge import MergeSpec, merge_files
from adapters_store.validation import UploadedFile, UploadLimits
from adapters_store.version_store import VersionStore, parse_ref
from adapters_store.wire import MergeMember, WorkerMerge, owned_name
from server.auth import ADMIN_TENANT, Tenant
from server.dispatch import MergedAdapter
from server.dropin_adapters import AdapterVersion, DropInAdapters
from server.errors import BaseModelUnknownError, InvalidRequestError, ModelNotFoundError, PermissionDeniedError
from server.protocol import AdapterDeleted, AdapterInfo, AdapterVersionInfo, ModelCard
from server.settings import GatewaySettings


@dataclass(frozen=True)
class StoredAdapter:
    """A resolved stored version, as the dispatcher uses it: `ref` names it on the engine, `source` is what
    the worker materialises from its store (`adapters_store.adapter_source`)."""

    manifest: Manifest
    heads: str | None = None  # the source of the Medusa heads attached to this version

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return str(self.manifest.version)

    @property
    def ref(self) -> str:
        return self.manifest.ref

    @property
    def source(self) -> str:
        return store_source(self.manifest.ref)


def weight_of(spec: MergeSpec, model: str) -> float:
    return spec.weights[spec.ids.index(model)]


def visible(manifest: Manifest, tenant: Tenant) -> bool:
    return manifest.public or manifest.owner == tenant.name


def qualified(model: str, tenant: Tenant) -> str:
    """`NAME[@VERSION]` → `TENANT/NAME[@VERSION]` in the caller's namespace; a full name stays as it is."""
    return model if "/" in model.partition("@")[0] else owned_name(tenant.name, model)


def relative(name: str | None, tenant: Tenant) -> str | None:
    """A full name as `tenant` writes it: bare in its own namespace, full in another's."""
    prefix = f"{tenant.name}/"
    return name[len(prefix):] if name and name.startswith(prefix) else name


def version_info(m: Manifest, tenant: Tenant) -> AdapterVersionInfo:
    return AdapterVersionInfo(
        id=relative(m.ref, tenant), name=relative(m.name, tenant), version=m.version, kind=m.kind, rank=m.rank,
        alpha=m.alpha, targets=m.targets,
        base_fingerprint=m.base_fingerprint, stored_bytes=m.stored_bytes, original_bytes=m.original_bytes,
        dense_bytes=m.dense_bytes, compression=m.compression, compression_ratio=round(m.compression_ratio, 3),
        owner=m.owner, public=m.public, created=m.created, attach_to=relative(m.attach_to, tenant),
    )


RESOLVE_TTL_S = 1.0
RESOLVE_CACHE_SIZE = 4096


class TenantAdapters:
    def __init__(self, store: VersionStore, catalog: DropInAdapters, base: BaseModelSpec | None,
                 limits: UploadLimits, gc_grace_s: float,
                 published_base: Callable[[], BaseModelSpec | None] = lambda: None):
        self._store = store
        self._catalog = catalog
        self._base = base  # the operator's override (--base-model-path); else what the workers publish
        self._published_base = published_base
        self._limits = limits
        self._gc_grace_s = gc_grace_s
        self._writes = threading.Lock()  # one publish / delete / collection at a time in this process
        self._imports = threading.Lock()  # one drop-in import at a time (two first uses import once)
        self._dropins: dict[Path, tuple[tuple, Manifest]] = {}  # folder → (its files' signature, stored version)
        self._resolved: dict[str, tuple[float, Manifest | None]] = {}  # model name → (when, manifest)

    # ---- inference ---------------------------------------------------------------------------

    def resolve(self, model: str, tenant: Tenant) -> StoredAdapter | None:
        """For the dispatcher: a stored version (in the caller's namespace unless named in full), else a
        drop-in adapter (imported into the store), else None. No visibility check: routes call `authorize`
        first."""
        manifest = self._manifest(qualified(model, tenant))
        if manifest is None and "/" not in model:
            folder = self._catalog.resolve(model)
            manifest = self._dropin(folder) if folder is not None else None
        if manifest is not None and kinds.are_heads(manifest.kind):
            raise InvalidRequestError(f"{model!r} is a set of Medusa heads, not a model: request the base or the "
                                      "adapter they attach to", param="model")
        return StoredAdapter(manifest, self.heads_path(manifest.ref)) if manifest is not None else None

    def _dropin(self, folder: AdapterVersion) -> Manifest:
        """The stored version of a drop-in folder: imported the first time it is used and again when its files
        change (remembered by their names, sizes and mtimes; the store keeps one version per content)."""
        signature = self._catalog.allow.signature(folder.path)
        hit = self._dropins.get(folder.path)
        if hit is not None and hit[0] == signature and self._manifest(hit[1].ref) is not None:  # not deleted since
            return hit[1]
        with self._imports:
            manifest = self._import_dropin(folder)
        self._dropins[folder.path] = (signature, manifest)
        return manifest

    def _import_dropin(self, folder: AdapterVersion) -> Manifest:
        files = self._catalog.allow.read(folder.path, self._limits.max_total_bytes, param="model")
        uploads = [UploadedFile(filename, data) for filename, data in files.items()]
        draft, files = prepare(uploads, self._require_base(), self._limits, name=owned_name(ADMIN_TENANT, folder.name),
                               owner=ADMIN_TENANT, public=True)
        digests = {filename: hashlib.sha256(data).hexdigest() for filename, data in files.items()}
        for manifest in self._store.versions(draft.name):
            if manifest.public and {n: f.sha256 for n, f in manifest.files.items()} == digests:
                return manifest  # imported before (by this gateway or another, or before a restart)
        with self._writes:
            published = self._store.publish(draft, files)
            self._resolved.clear()
        return published

    def heads_path(self, adapter_ref: str | None) -> str | None:
        """The source of the Medusa heads attached to `adapter_ref` (None: the base's), remembered
        for RESOLVE_TTL_S like manifests."""
        key, now = f"heads {adapter_ref}", time.monotonic()
        hit = self._resolved.get(key)
        if hit is None or now - hit[0] >= RESOLVE_TTL_S:
            hit = (now, self._store.heads_for(adapter_ref))
            self._resolved[key] = hit
        return None if hit[1] is None else store_source(hit[1].ref)

    def _manifest(self, model: str) -> Manifest | None:
        """The store's answer for `model`, remembered for RESOLVE_TTL_S: an inference request asks twice
        (authorize, resolve) and a remote store costs a round trip each. This gateway's own uploads and
        deletes forget everything at once; another gateway's are seen within the TTL."""
        now = time.monotonic()
        hit = self._resolved.get(model)
        if hit is not None and now - hit[0] < RESOLVE_TTL_S:
            return hit[1]
        manifest = self._store.resolve(model)
        if len(self._resolved) >= RESOLVE_CACHE_SIZE:
            self._resolved.clear()
        self._resolved[model] = (now, manifest)
        return manifest

    def admit(self, model: str | None, merged_adapters: dict | None, tenant: Tenant) -> MergedAdapter | None:
        """`authorize`, then `resolve_merge`: what an inference route checks first (blocking store reads:
        routes call it off the event loop)."""
        self.authorize(model, tenant)
        return self.resolve_merge(merged_adapters, tenant)

    def local_name(self, adapter_id: str | None, adapter_source: str | None) -> str | None:
        """LoRAX's `adapter_source: "local"` names a folder by its path: one in the allow-list is served as the
        drop-in it is (`NAME[@VERSION]`), anything else is a 403. Other ids stay as they are (blocking: stats)."""
        if adapter_source != "local" or not adapter_id or not adapter_id.startswith("/"):
            return adapter_id
        return self._catalog.allow.name_of(adapter_id, param="adapter_id")

    def authorize(self, model: str | None, tenant: Tenant) -> None:
        """404 if `model` is a stored adapter the tenant may not use (as if it did not exist)."""
        manifest = self._manifest(qualified(model, tenant)) if model else None
        if manifest is not None and not visible(manifest, tenant):
            raise ModelNotFoundError(f"the model {model!r} does not exist", param="model")

    def resolve_merge(self, raw: dict | None, tenant: Tenant) -> MergedAdapter | None:
        """A request's `merged_adapters` → the merge the workers build (None when absent). Each member must
        be an adapter the tenant may use; the merge is named by a key over the members' contents."""
        if raw is None:
            return None
        spec = MergeSpec.from_dict(raw)
        members, keys = [], []
        for model in spec.ids:
            adapter = self._merge_member(model, tenant)
            members.append(MergeMember(path=adapter.source, weight=weight_of(spec, model)))
            keys.append(adapter.manifest.content_id)
        merge = WorkerMerge(members=members, strategy=spec.strategy, density=spec.density,
                            majority_sign_method=spec.majority_sign_method)
        return MergedAdapter(f"merge:{spec.key(keys)[:32]}", merge)

    def _merge_member(self, model: str, tenant: Tenant) -> StoredAdapter:
        self.authorize(model, tenant)
        adapter = self.resolve(model, tenant)
        if adapter is None:
            raise ModelNotFoundError(f"merged_adapters: no adapter {model!r}", param="merged_adapters")
        return adapter

    def model_cards(self, tenant: Tenant, base: str | None) -> list[ModelCard]:
        cards, named = [], set()
        for adapter in self._catalog.list():
            if adapter.version and adapter.name not in named:
                named.add(adapter.name)  # the bare name, meaning the latest version
                cards.append(ModelCard(id=adapter.name, root=adapter.name, parent=base))
            cards.append(ModelCard(id=adapter.ref, root=adapter.ref, parent=base))
        for info in self.list(tenant):
            cards.append(ModelCard(id=info.name, root=info.name, parent=base, owned_by=info.owner))
            cards += [ModelCard(id=v.id, root=v.id, parent=base, owned_by=v.owner) for v in info.versions]
        return cards

    # ---- the adapters API ------------------------------------------------------------------------

    def upload(self, tenant: Tenant, name: str, uploads: list[UploadedFile], kind: str | None,
               compression: CompressionRequest | None, public: bool) -> AdapterInfo:
        base = self._require_base()
        name = self._own_name(name, tenant)
        draft, files = prepare(uploads, base, self._limits, name=name, owner=tenant.name, public=public,
                               kind=kind, compression=compression)
        if kinds.are_heads(draft.kind):
            draft = replace(draft, attach_to=self._heads_owner(files, tenant))
        with self._writes:
            published = self._store.publish(draft, files)
            if kinds.are_heads(published.kind):
                self._store.attach_heads(published)  # served with that adapter version (or the base) from now
            self._resolved.clear()
        return self.describe(tenant, name)

    def _heads_owner(self, files: dict[str, Buffer], tenant: Tenant) -> str | None:
        """Medusa heads serve the base, or the adapter their config names (`adapter`, as our trainer writes
        it), pinned to its current version: heads fit the hidden states of the weights they were trained on."""
        adapter = bounded_json.loads(files[medusa_validation.CONFIG_NAME]).get("adapter")
        if adapter is None:
            return None
        manifest = self._manifest(qualified(adapter, tenant))
        if manifest is None or not visible(manifest, tenant):
            raise ModelNotFoundError(f"the heads attach to adapter {adapter!r}, which does not exist", param="files")
        if kinds.are_heads(manifest.kind):
            raise InvalidAdapterError("Medusa heads attach to a LoRA or S²FT adapter, not to other heads",
                                      param="files")
        return manifest.ref

    def save_merge(self, tenant: Tenant, name: str, raw: dict, public: bool) -> AdapterInfo:
        """Computes a merge (`merged_adapters` shape) and publishes it as a new version of `name`."""
        base = self._require_base()
        name = self._own_name(name, tenant)
        spec = MergeSpec.from_dict(raw)
        members = [(self._member_files(self._merge_member(m, tenant)), weight_of(spec, m)) for m in spec.ids]
        parts = merge_files(members, spec, base)
        if len(parts) != 1:
            raise InvalidAdapterError("a merge of LoRA and S²FT adapters is served per request but cannot be "
                                      "saved as one version (no single kind holds both)", param="merged_adapters")
        (files,) = parts.values()
        uploads = [UploadedFile(filename, data) for filename, data in files.items()]
        draft, files = prepare(uploads, base, self._limits, name=name, owner=tenant.name, public=public)
        with self._writes:
            self._store.publish(draft, files)
            self._resolved.clear()
        return self.describe(tenant, name)

    def import_folder(self, folder: str, owner: str, name: str | None, public: bool) -> AdapterInfo:
        """An operator's import: the folder `NAME[/VERSION]` in an allow-listed root (default
        `DATA_DIR/adapters`), validated like an upload and published as a version of `owner`'s `name`
        (default: the folder's NAME)."""
        if not NAMESPACE_PATTERN.match(owner):
            raise InvalidRequestError("owner must be a tenant's name", param="owner")
        path = self._catalog.allow.find(folder)
        if path is None:
            raise AdapterNotFoundError(f"no folder {folder!r} in the allowed folders", param="folder")
        files = self._catalog.allow.read(path, self._limits.max_total_bytes, param="folder")
        uploads = [UploadedFile(filename, data) for filename, data in files.items()]
        return self.upload(Tenant(owner), name or folder.split("/")[0], uploads, None, None, public)

    def _member_files(self, adapter: StoredAdapter) -> dict[str, bytes]:
        return stored_files(self._store, adapter.manifest)

    def _require_base(self) -> BaseModelSpec:
        base = self._base or self._published_base()
        if base is None:
            raise BaseModelUnknownError(
                "the gateway does not know the base model's config, so it cannot check adapters: no worker has "
                "published it yet (start a worker), or set ADAPTERD_BASE_MODEL_PATH to the base model folder")
        return base

    def _own_name(self, name: str, tenant: Tenant) -> str:
        """An upload's name, in full: a bare name, or a full one in the caller's own namespace."""
        check_name(name)
        full = qualified(name, tenant)
        if full.split("/", 1)[0] != tenant.name:
            raise PermissionDeniedError("adapters are uploaded into your own namespace: name them NAME or "
                                        f"{tenant.name}/NAME", param="name")
        return full

    def list(self, tenant: Tenant) -> list[AdapterInfo]:
        found = []
        for name in self._store.names():  # every tenant's; `_info` keeps the visible ones
            info = self._info(name, tenant)
            if info is not None:
                found.append(info)
        return found

    def describe(self, tenant: Tenant, name: str) -> AdapterInfo:
        full = qualified(name, tenant)
        info = self._info(full, tenant) if parse_ref(full) == (full, None) else None
        if info is None:
            raise AdapterNotFoundError(f"no adapter named {name!r}", param="name")
        return info

    def _info(self, name: str, tenant: Tenant) -> AdapterInfo | None:
        versions = [m for m in self._store.versions(name) if visible(m, tenant)]
        if not versions:
            return None
        latest = versions[-1]
        return AdapterInfo(name=relative(name, tenant), latest=latest.version, owner=latest.owner,
                           public=latest.public, versions=[version_info(m, tenant) for m in versions])

    def _visible_manifest(self, tenant: Tenant, ref: str) -> Manifest:
        manifest = self._store.resolve(qualified(ref, tenant))
        if manifest is None or not visible(manifest, tenant):
            raise AdapterNotFoundError(f"no adapter {ref!r}", param="name")
        return manifest

    def download(self, tenant: Tenant, ref: str) -> tuple[Manifest, bytes]:
        """A zip of the adapter folder (for a LoRA: adapter_config.json + adapter_model.safetensors), decoded
        if it is stored compressed."""
        manifest = self._visible_manifest(tenant, ref)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
            for filename, data in download_files(self._store, manifest).items():
                archive.writestr(filename, data)
        return manifest, buf.getvalue()

    def delete(self, tenant: Tenant, ref: str) -> AdapterDeleted:
        """`name@version` deletes that version; `name` deletes every version."""
        parsed = parse_ref(qualified(ref, tenant))
        if parsed is None:
            raise AdapterNotFoundError(f"no adapter {ref!r}", param="name")
        name, version = parsed
        targets = [self._visible_manifest(tenant, ref)] if version is not None else [
            m for m in self._store.versions(name) if visible(m, tenant)]
        if not targets:
            raise AdapterNotFoundError(f"no adapter named {relative(name, tenant)!r}", param="name")
        if any(m.owner != tenant.name for m in targets):
            raise PermissionDeniedError(f"only the owner may delete {ref!r}", param="name")
        with self._writes:
            deleted = [self._store.delete_version(name, m.version).version for m in targets]
            self._resolved.clear()
            self._store.collect_garbage(self._gc_grace_s)
        return AdapterDeleted(name=relative(name, tenant), versions=deleted)


ADAPTER_UPLOAD_PATH = "/v1/adapters"


def build_tenant_adapters(settings: GatewaySettings, catalog: DropInAdapters,
                           published_base: Callable[[], BaseModelSpec | None] = lambda: None) -> TenantAdapters:
    limits = UploadLimits(
        max_rank=settings.max_adapter_rank,
        max_file_bytes=settings.max_adapter_file_bytes,
        max_total_bytes=settings.max_upload_bytes,
        archive=ArchiveLimits(max_entry_bytes=settings.max_adapter_file_bytes,
                              max_total_bytes=settings.max_archive_bytes, max_ratio=settings.max_archive_ratio),
    )
    base = BaseModelSpec.from_folder(settings.base_model_path) if settings.base_model_path else None
    store = VersionStore(open_backend(settings.resolved_store_url))
    return TenantAdapters(store, catalog, base, limits, settings.store_gc_grace_s, published_base)
