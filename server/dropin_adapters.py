"""The operator's drop-in adapters: folders in the allow-listed roots (`server.allowed_folders`; default
`DATA_DIR/adapters/`), found by name. The registry imports a folder into the store when it is used
(`TenantAdapters.resolve`), so workers only ever load store versions.

Layout under each root (the first root holding a name wins):

- `{name}/adapter_config.json` (+ weights): an unversioned adapter, addressed as `name`.
- `{name}/{version}/adapter_config.json`: versions, addressed as `name@version`; a bare `name` means
  the version written in `{name}/LATEST` if that file exists, else the highest version in natural
  order (v2 < v10).

Names and versions: letters, digits, `.`, `_`, `-` (no leading dot), at most 100 characters. A folder that
resolves (through a symlink) outside the roots is not there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from server.allowed_folders import PART as _PART
from server.allowed_folders import AllowList

_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class AdapterVersion:
    """A drop-in folder (never sent to a worker: the registry imports it and sends the stored version)."""

    name: str
    version: str | None
    path: Path

    @property
    def ref(self) -> str:
        """How the catalog names it: `name` or `name@version` (the folder's version, not a store version)."""
        return f"{self.name}@{self.version}" if self.version else self.name


def _natural_key(s: str) -> list:
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", s) if t]


class DropInAdapters:
    def __init__(self, allow: AllowList):
        self.allow = allow

    def resolve(self, model: str) -> AdapterVersion | None:
        """`name` or `name@version` → that adapter version, or None if there is no such adapter."""
        name, at, version = model.partition("@")
        if not _PART.match(name) or (at and not _PART.match(version)):
            return None
        for root in self.allow.roots:
            found = self._resolve_in(root / name, name, version)
            if found is not None:
                return found
        return None

    def _resolve_in(self, folder: Path, name: str, version: str) -> AdapterVersion | None:
        if version:
            return AdapterVersion(name, version, folder / version) if self._is_adapter(folder / version) else None
        if self._is_adapter(folder):
            return AdapterVersion(name, None, folder)
        latest = self._latest_version(folder)
        return AdapterVersion(name, latest, folder / latest) if latest else None

    def _is_adapter(self, folder: Path) -> bool:
        return (folder / _CONFIG).is_file() and self.allow.allows(folder.resolve())

    def list(self) -> list[AdapterVersion]:
        found: list[AdapterVersion] = []
        for root in self.allow.roots:
            if not root.is_dir():
                continue
            for folder in sorted(p for p in root.iterdir() if p.is_dir() and _PART.match(p.name)):
                if any(a.name == folder.name for a in found):
                    continue  # an earlier root has it
                if self._is_adapter(folder):
                    found.append(AdapterVersion(folder.name, None, folder))
                    continue
                found += [AdapterVersion(folder.name, v, folder / v) for v in self._versions(folder)]
        return found

    def _versions(self, folder: Path) -> list[str]:
        if not folder.is_dir():
            return []
        names = [p.name for p in folder.iterdir() if _PART.match(p.name) and self._is_adapter(p)]
        return sorted(names, key=_natural_key)

    def _latest_version(self, folder: Path) -> str | None:
        pointer = folder / "LATEST"
        if pointer.is_file():
            version = pointer.read_text().strip()
            if _PART.match(version) and self._is_adapter(folder / version):
                return version
        versions = self._versions(folder)
        return versions[-1] if versions else None
