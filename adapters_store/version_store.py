"""The adapter store: immutable, content-addressed versions on a `StoreBackend`, with names and aliases.

Layout (keys on the backend):

    blobs/sha256/{hex}                  file bytes, named by their digest (shared between versions)
    manifests/{name}/{version:010d}     one JSON manifest per version; a tombstone once deleted (a name is
                                        `{tenant}/{name}` when the gateway stores it: one folder per tenant)
    heads/{name}@{version} | heads/@base  the ref of the Medusa heads last attached there (may dangle)

Publishing writes the blobs first, then creates the manifest with `create` (only-if-absent, atomic). A
version is visible exactly when its manifest exists, so a crash at any point leaves either no version
or a complete one; blobs left behind by a crash are removed by `collect_garbage`. Version numbers go
up by one per name and are never reused, even after deletion.

Aliases: `name` and `name@latest` → the highest live version; `name@3` → version 3.
Visibility (owner tenant, public flag) is recorded here and enforced by the callers.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace

from adapters_store import kinds
from adapters_store.backends import StoreBackend
from adapters_store.errors import AdapterNotFoundError, NameConflictError, StoreCorruptionError
from adapters_store.manifest import NAME_PATTERN, FileEntry, Manifest, tombstone
from adapters_store.mapped_files import Buffer, reader

BLOBS = "blobs/sha256/"
MANIFESTS = "manifests/"
_PUBLISH_ATTEMPTS = 8


def heads_key(adapter_ref: str | None) -> str:
    """Where the ref of the Medusa heads of an adapter version (or of the base: `heads/@base`) is kept."""
    return f"heads/{adapter_ref or '@base'}"


def blob_key(sha256: str) -> str:
    return f"{BLOBS}{sha256}"


def manifest_key(name: str, version: int) -> str:
    return f"{MANIFESTS}{name}/{version:010d}"


def parse_ref(ref: str) -> tuple[str, int | None] | None:
    """`name` / `name@latest` → (name, None); `name@3` → (name, 3); None if malformed."""
    name, at, version = ref.partition("@")
    if not NAME_PATTERN.match(name):
        return None
    if not at or version == "latest":
        return name, None
    if version.isdigit() and 0 < int(version) < 10**10:
        return name, int(version)
    return None


class VersionStore:
    def __init__(self, backend: StoreBackend):
        self.backend = backend

    @property
    def url(self) -> str:
        return self.backend.url

    # ---- writing ------------------------------------------------------------------------------

    def publish(self, draft: Manifest, files: dict[str, Buffer]) -> Manifest:
        """Stores `files` and a new version of `draft.name` (its `version` and `files` are filled here)."""
        entries = {name: self._put_blob(data) for name, data in files.items()}
        for _ in range(_PUBLISH_ATTEMPTS):
            manifest = replace(draft, version=self._next_version(draft.name), files=entries)
            if self._publish_manifest(manifest):
                return manifest
        raise NameConflictError(f"could not publish a version of {draft.name!r}: concurrent uploads kept winning")

    def _put_blob(self, data: Buffer) -> FileEntry:
        digest = hashlib.sha256(data).hexdigest()
        key = blob_key(digest)
        if not self.backend.exists(key):
            if isinstance(data, bytes):
                self.backend.write(key, data)
            else:
                with reader(data) as f:  # a mapped upload: copied in pieces
                    self.backend.write_file(key, f)
        return FileEntry(digest, len(data))

    def _publish_manifest(self, manifest: Manifest) -> bool:
        return self.backend.create(manifest_key(manifest.name, manifest.version), manifest.to_json())

    def _next_version(self, name: str) -> int:
        numbers = self._version_numbers(name)
        return (numbers[-1] if numbers else 0) + 1

    def delete_version(self, name: str, version: int) -> Manifest:
        manifest = self.get(name, version)
        self.backend.write(manifest_key(name, version), tombstone(name, version))
        return manifest

    def delete_name(self, name: str) -> list[Manifest]:
        deleted = [self.delete_version(name, m.version) for m in self.versions(name)]
        if not deleted:
            raise AdapterNotFoundError(f"no adapter named {name!r}", param="name")
        return deleted

    def collect_garbage(self, grace_s: float = 600.0) -> int:
        """Deletes blobs no live manifest references and older than `grace_s` (a publish in flight writes
        its blobs before its manifest). Returns how many were removed."""
        live = {f.sha256 for name in self.names() for m in self.versions(name) for f in m.files.values()}
        removed = 0
        for key in self.backend.list(BLOBS):
            if key[len(BLOBS):] not in live and self.backend.age_s(key) >= grace_s:
                self.backend.delete(key)
                removed += 1
        return removed

    # ---- reading ------------------------------------------------------------------------------

    def _version_numbers(self, name: str) -> list[int]:
        """Every version number ever published under `name`, tombstones included, ascending."""
        prefix = f"{MANIFESTS}{name}/"  # a bare name's listing also holds its namespace's names: skip them
        return sorted(int(k[len(prefix):]) for k in self.backend.list(prefix) if k[len(prefix):].isdigit())

    def _read_manifest(self, name: str, version: int) -> Manifest | None:
        raw = self.backend.read(manifest_key(name, version))
        return Manifest.from_json(raw) if raw is not None else None

    def names(self) -> list[str]:
        keys = self.backend.list(MANIFESTS)
        names = sorted({k[len(MANIFESTS):].rsplit("/", 1)[0] for k in keys})
        return [n for n in names if NAME_PATTERN.match(n) and self.latest(n) is not None]

    def versions(self, name: str) -> list[Manifest]:
        found = (self._read_manifest(name, v) for v in self._version_numbers(name))
        return [m for m in found if m is not None]

    def latest(self, name: str) -> Manifest | None:
        for version in reversed(self._version_numbers(name)):
            manifest = self._read_manifest(name, version)
            if manifest is not None:
                return manifest
        return None

    def get(self, name: str, version: int | None = None) -> Manifest:
        manifest = self.latest(name) if version is None else self._read_manifest(name, version)
        if manifest is None:
            what = f"{name}@{version}" if version is not None else name
            raise AdapterNotFoundError(f"no adapter {what!r}", param="name")
        return manifest

    def resolve(self, ref: str) -> Manifest | None:
        parsed = parse_ref(ref)
        if parsed is None:
            return None
        name, version = parsed
        return self.latest(name) if version is None else self._read_manifest(name, version)

    def attach_heads(self, heads: Manifest) -> None:
        """Records `heads` (a Medusa version) as the heads of the adapter version it attaches to (or of the
        base), replacing earlier ones."""
        self.backend.write(heads_key(heads.attach_to), heads.ref.encode())

    def heads_for(self, adapter_ref: str | None) -> Manifest | None:
        """The Medusa heads attached to `adapter_ref` (None: the base), if they still exist."""
        raw = self.backend.read(heads_key(adapter_ref))
        heads = self.resolve(raw.decode()) if raw else None
        return heads if heads is not None and kinds.are_heads(heads.kind) and heads.attach_to == adapter_ref else None

    def read_file(self, manifest: Manifest, filename: str) -> bytes:
        entry = manifest.files[filename]
        data = self.backend.read(blob_key(entry.sha256))
        if data is None or hashlib.sha256(data).hexdigest() != entry.sha256:
            raise StoreCorruptionError(f"{manifest.ref}: {filename} is missing or does not match its digest")
        return data
