"""`scripts/dev/apply_renames.sh` on a small git repository shaped like this one: it moves the files, rewrites
imports (plain, from-package, parenthesised, function-level), dotted names in strings and paths in docs,
renames the classes, writes the README's layout section, is a fixpoint (a second run and `--check` find
nothing to do), and refuses, changing nothing, when a file it expects is missing."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "dev" / "apply_renames.sh"


def _moves() -> list[tuple[str, str]]:
    return [m for m in re.findall(r'^    \("([\w.]+)", "([\w.]+)"\),$', SCRIPT.read_text(), re.M) if "." in m[0]]


def _run(repo: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=120)


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                          capture_output=True, text=True).stdout


@pytest.fixture
def repo(tmp_path):
    modules = [old for old, _ in _moves()]
    assert len(modules) >= 15
    for module in modules:
        path = tmp_path / Path(*module.split(".")).with_suffix(".py")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f'"""{module}"""\n')
    for package in ("workers", "workers/adapters", "server", "adapters_store"):
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "adapters_store" / "registry.py").write_text("class AdapterStore:\n    pass\n")
    (tmp_path / "workers" / "service.py").write_text(
        "from workers.adapter_loader import AdapterLoader\nKEEP_ALIVE_S = 5\n\n\ndef main():\n    pass\n")
    (tmp_path / "tests" / "layout").mkdir(parents=True)
    (tmp_path / "tests" / "layout" / "test_apply_renames.py").write_text("import workers.heartbeat\n")  # kept as is
    (tmp_path / "tests" / "test_x.py").write_text(
        "from workers import heartbeat, keyed_locks\n"
        "from workers.adapters import (\n    manager,\n)\n"
        "from workers.service import KEEP_ALIVE_S\n"
        "from adapters_store.registry import AdapterStore\n\n\n"
        "def test_x(monkeypatch):\n"
        "    from server.adapter_catalog import AdapterCatalog\n\n"
        '    monkeypatch.setattr("workers.service.KEEP_ALIVE_S", 1)\n'
        "    assert (heartbeat, keyed_locks, manager, AdapterCatalog, AdapterStore, KEEP_ALIVE_S)\n")
    (tmp_path / "README.md").write_text(
        "# x\n\nSee `workers/heartbeat.py`; run `python -m workers.service`.\n\n"
        "## Layout\n\nthe old layout\n\n## Next\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-qm", "before")
    return tmp_path


def test_moves_rewrites_and_is_a_fixpoint(repo):
    done = _run(repo)
    assert done.returncode == 0, done.stderr
    for old, new in _moves():
        assert not (repo / Path(*old.split(".")).with_suffix(".py")).exists()
        assert (repo / Path(*new.split(".")).with_suffix(".py")).exists(), new
    assert (repo / "workers/service/__main__.py").exists() and (repo / "workers/service/__init__.py").exists()
    assert (repo / "tests/layout/test_apply_renames.py").read_text() == "import workers.heartbeat\n"
    test = (repo / "tests/test_x.py").read_text()
    assert "from workers.service import heartbeat, keyed_locks" in test
    assert "from workers.adapters import residency as manager" in test
    assert "from workers.service.app import KEEP_ALIVE_S" in test
    assert "from adapters_store.version_store import VersionStore" in test
    assert "    from server.dropin_adapters import DropInAdapters" in test
    assert '"workers.service.app.KEEP_ALIVE_S"' in test
    assert "AdapterFetcher" in (repo / "workers/service/app.py").read_text()
    readme = (repo / "README.md").read_text()
    assert "`workers/service/heartbeat.py`" in readme and "`python -m workers.service`" in readme
    assert "<!-- layout:start" in readme and "the old layout" not in readme and readme.endswith("## Next\n")
    assert _run(repo, "--check").stdout.strip() == "nothing to do"
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "after")
    again = _run(repo)
    assert again.returncode == 0 and _git(repo, "status", "--porcelain") == ""


def test_refuses_when_an_expected_file_is_missing(repo):
    _git(repo, "rm", "-q", "workers/drain.py")
    _git(repo, "commit", "-qm", "no drain")
    done = _run(repo)
    assert done.returncode == 2 and "workers/drain.py" in done.stderr
    assert _git(repo, "status", "--porcelain") == "" and (repo / "workers/heartbeat.py").exists()
