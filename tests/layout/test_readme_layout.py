"""The README's layout section matches the tree: every path it names exists (a path inside an entry may be
relative to the entry's folder: `server/ ... routes/console.py`), and every package of the server-side code
and every top-level folder with code is named in it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PATH_TOKEN = re.compile(r"(?<![\w./-])((?:[\w.-]+/)+[\w.-]*)")  # tokens with a slash: `workers/service/app.py`


def layout_entries() -> dict[str, str]:
    """The layout's code block: entry path (its first column) → the entry's text (continuation lines too)."""
    text = (ROOT / "README.md").read_text()
    section = re.search(r"<!-- layout:start.*?<!-- layout:end -->", text, re.S) or re.search(
        r"^## Layout\n.*?(?=^## )", text, re.S | re.M)
    assert section, "README.md has no layout section"
    block = re.search(r"```\n(.*?)```", section.group(0), re.S)
    assert block, "the layout section has no code block"
    entries: dict[str, str] = {}
    current = None
    for line in block.group(1).splitlines():
        if line[:1].strip():
            current = line.split()[0]
            entries[current] = line
        elif current is not None:
            entries[current] += "\n" + line
    return entries


def _folder(entry: str) -> str:
    return entry if entry.endswith("/") else entry.rpartition("/")[0] + "/"


def test_every_path_the_layout_names_exists():
    missing = []
    for entry, text in layout_entries().items():
        for token in (t.rstrip(".,;:") for t in PATH_TOKEN.findall(text)):
            if not ((ROOT / token).exists() or (ROOT / _folder(entry) / token).exists()):
                missing.append(f"{entry}: {token}")
    assert missing == []


def test_every_package_is_in_the_layout():
    entries = layout_entries()
    tops = ["workers", "server", "adapters_store", "clients", "tests", "bench", "docker"]
    absent = [f"{top}/" for top in tops if not any(e == f"{top}/" or e.startswith(f"{top}/") for e in entries)]
    for top in ("workers", "server", "adapters_store"):
        for init in sorted((ROOT / top).glob("*/__init__.py")):
            sub = init.parent.name
            named = f"{top}/{sub}" in "\n".join(entries) or f"{sub}/" in entries.get(f"{top}/", "")
            absent += [] if named else [f"{top}/{sub}/"]
    assert absent == []
