"""The operator's allow-list of local folders adapters may be read from, and the one place that checks it.

Every entry that takes a local folder goes through here: drop-in adapters (`NAME[/VERSION]` under a root),
the admin import (`POST /v1/adapters/import`), vLLM's `/v1/load_lora_adapter` and LoRAX's
`adapter_source: "local"` (absolute paths). The roots come from `ADAPTERD_ADAPTER_ALLOW_DIRS` (comma-separated;
default `DATA_DIR/adapters`). A folder is allowed when its fully resolved path (symlinks and `..` followed)
lies under a resolved root; a refusal never says whether the path exists. Files are read only if they are
regular files in the folder itself (a symlinked file is skipped), within a byte and a count limit.
Blocking filesystem calls: use off the event loop."""

from __future__ import annotations

import re
from pathlib import Path

from server.errors import InvalidRequestError, PermissionDeniedError

PART = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}$")  # one name or version below a root
MAX_FILES = 32  # files read from one allowed folder


class AllowList:
    def __init__(self, roots: list[Path]):
        self.roots = [Path(r).resolve() for r in roots]

    def allows(self, path: Path) -> bool:
        """Whether `path`, resolved, lies under a root (itself a resolved path)."""
        return any(path.is_relative_to(root) for root in self.roots)

    def check(self, raw: str, param: str) -> Path:
        """An absolute path a caller named → the resolved folder; 400 if it is no path, 403 outside the
        roots (whether or not it exists), 400 if it is not a folder."""
        try:
            folder = Path(raw).resolve()
        except (OSError, ValueError) as exc:  # a NUL byte, a loop of links: not a folder anyone may name
            raise InvalidRequestError(f"{param} is not a valid path", param=param) from exc
        if not Path(raw).is_absolute() or not self.allows(folder):
            raise PermissionDeniedError(f"{param} is not under a folder the operator allows adapters from",
                                        param=param, code="path_not_allowed")
        try:
            is_folder = folder.is_dir()
        except OSError:  # a name too long, say
            is_folder = False
        if not is_folder:
            raise InvalidRequestError(f"{param} is not a folder", param=param)
        return folder

    def name_of(self, raw: str, param: str) -> str:
        """An absolute path to a drop-in folder → the name it is served by (`NAME` or `NAME@VERSION`)."""
        folder = self.check(raw, param)
        root = next(r for r in self.roots if folder.is_relative_to(r))
        parts = folder.relative_to(root).parts
        if not 1 <= len(parts) <= 2 or not all(PART.match(p) for p in parts):
            raise InvalidRequestError(f"{param} must be a folder NAME or NAME/VERSION directly in an allowed folder",
                                      param=param)
        return "@".join(parts)

    def find(self, relative: str) -> Path | None:
        """`NAME` or `NAME/VERSION` → that folder in the first root that has it, if it stays inside the
        roots once resolved; None otherwise."""
        parts = relative.split("/")
        if not 1 <= len(parts) <= 2 or not all(PART.match(p) for p in parts):
            return None
        for root in self.roots:
            folder = (root / Path(*parts)).resolve()
            if folder.is_relative_to(root) and folder.is_dir():
                return folder
        return None

    def files(self, folder: Path) -> list[Path]:
        """The regular files directly in `folder` (not symlinks), by name."""
        return sorted(p for p in folder.iterdir() if p.is_file() and not p.is_symlink())

    def signature(self, folder: Path) -> tuple:
        """Changes when a file of the folder is added, removed or rewritten (name, size, mtime)."""
        return tuple((p.name, st.st_size, st.st_mtime_ns) for p in self.files(folder) for st in (p.stat(),))

    def read(self, folder: Path, max_bytes: int, param: str) -> dict[str, bytes]:
        """The folder's regular files (at most MAX_FILES, `max_bytes` in all): 400 beyond either."""
        if not self.allows(folder.resolve()):
            raise PermissionDeniedError(f"{param} is not under a folder the operator allows adapters from",
                                        param=param, code="path_not_allowed")
        files = self.files(folder)
        if len(files) > MAX_FILES:
            raise InvalidRequestError(f"{param} holds more than {MAX_FILES} files", param=param)
        if sum(p.stat().st_size for p in files) > max_bytes:
            raise InvalidRequestError(f"{param} holds more than {max_bytes} bytes", param=param)
        return {p.name: p.read_bytes() for p in files}
