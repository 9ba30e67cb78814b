"""Which adapters exist and where their files are: a plain directory until the registry (a later issue)
replaces this module.

Layout under `DATA_DIR/adapters/`:

- `{name}/adapter_config.json` (+ weights): an unversioned adapter, addressed as `name`.
- `{name}/{version}/adapter_config.json`: versions, addressed as `name@version`; a bare `name` means
  the version written in `{name}/LATEST` if that file exists, else the highest version in natural
  order (v2 < v10).

Names and versions: letters, digits, `.`, `_`, `-` (no leading dot), at most 100 characters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from adapters_store.adapter_source import dropin_source

_PART = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}$")
_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class AdapterVersion:
    name: str
    version: str | None
    path: Path
    heads: str | None = None  # registry-attached Medusa heads (a folder's own heads sit in its `medusa/`)

    @property
    def ref(self) -> str:
        """The name the engine knows this exact version by (and the model id that addresses it)."""
        return f"{self.name}@{self.version}" if self.version else self.name

    @property
    def source(self) -> str:
        """How workers find it: in their own drop-in folder, by name (never by this gateway's path)."""
        return dropin_source(self.name, self.version)


def _natural_key(s: str) -> list:
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", s) if t]


class AdapterCatalog:
    def __init__(self, root: Path):
        self.root = Path(root)

    def heads_path(self, adapter_ref: str | None) -> str | None:
        """Directory adapters carry their heads in a `medusa/` subfolder; none come from here."""
        return None

    def resolve(self, model: str) -> AdapterVersion | None:
        """`name` or `name@version` → that adapter version, or None if there is no such adapter."""
        name, at, version = model.partition("@")
        if not _PART.match(name) or (at and not _PART.match(version)):
            return None
        folder = self.root / name
        if version:
            return (
                AdapterVersion(name, version, folder / version)
                if (folder / version / _CONFIG).is_file()
                else None
            )
        if (folder / _CONFIG).is_file():
            return AdapterVersion(name, None, folder)
        latest = self._latest_version(folder)
        return AdapterVersion(name, latest, folder / latest) if latest else None

    def read_folder(self, folder: str, max_bytes: int) -> dict[str, bytes] | None:
        """The regular files of `NAME` or `NAME/VERSION` under the root (the operator's allow-list), or None
        if there is no such folder inside it; symlinks are not followed out, nothing above `max_bytes` is read."""
        parts = folder.split("/")
        if not 1 <= len(parts) <= 2 or not all(_PART.match(p) for p in parts):
            return None
        root = self.root.resolve()
        path = (root / Path(*parts)).resolve()
        if not path.is_relative_to(root) or not path.is_dir():
            return None
        files = [p for p in path.iterdir() if p.is_file() and not p.is_symlink()]
        if sum(p.stat().st_size for p in files) > max_bytes:
            raise ValueError(f"the folder holds more than {max_bytes} bytes")
        return {p.name: p.read_bytes() for p in files}

    def list(self) -> list[AdapterVersion]:
        found: list[AdapterVersion] = []
        if not self.root.is_dir():
            return found
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir() and _PART.match(p.name)):
            if (folder / _CONFIG).is_file():
                found.append(AdapterVersion(folder.name, None, folder))
                continue
            for version in self._versions(folder):
                found.append(AdapterVersion(folder.name, version, folder / version))
        return found

    def _versions(self, folder: Path) -> list[str]:
        if not folder.is_dir():
            return []
        names = [p.name for p in folder.iterdir() if _PART.match(p.name) and (p / _CONFIG).is_file()]
        return sorted(names, key=_natural_key)

    def _latest_version(self, folder: Path) -> str | None:
        pointer = folder / "LATEST"
        if pointer.is_file():
            version = pointer.read_text().strip()
            if _PART.match(version) and (folder / version / _CONFIG).is_file():
                return version
        versions = self._versions(folder)
        return versions[-1] if versions else None
