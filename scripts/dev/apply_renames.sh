#!/usr/bin/env bash
# Issue 13, "names and homes": the pure moves and renames, as one idempotent script (run it again and it
# changes nothing). Run from anywhere inside the repository, on a clean tree:
#
#     scripts/dev/apply_renames.sh            # moves files (git mv), rewrites imports, renames classes
#     scripts/dev/apply_renames.sh --check    # exit 1 if anything is left to do (for CI / after a merge)
#     scripts/dev/apply_renames.sh --also /work/shared/DESIGN.md   # also rewrite references in files outside git
#
# What it does:
#   1. the worker process's loose files at the root of workers/ → the package workers/service/
#      (workers/service.py → workers/service/app.py; `python -m workers.service` still starts a worker,
#      through workers/service/__main__.py); workers/errors.py stays at the root: model/, adapters/,
#      engine/ and service/ all raise its errors, so it belongs to none of them;
#   2. adapters_store/coordination.py → adapters_store/wire.py (Redis keys and payloads, worker HTTP
#      schemas, job records: the cluster's wire protocol);
#   3. each adapter holder named for what it holds (module and class):
#        adapters_store/registry.py  AdapterStore    → adapters_store/version_store.py  VersionStore
#        server/adapter_registry.py  AdapterRegistry → server/tenant_adapters.py        TenantAdapters
#        server/adapter_catalog.py   AdapterCatalog  → server/dropin_adapters.py        DropInAdapters
#        workers/adapters/manager.py AdapterManager  → workers/adapters/residency.py    AdapterResidency
#        workers/adapter_loader.py   AdapterLoader   → workers/service/adapter_fetcher.py AdapterFetcher
#   4. every reference in tracked text files (imports, dotted names in strings, file paths in docs,
#      Dockerfiles, pyproject, README) rewritten with word-boundary patterns; imports re-sorted (ruff, I only);
#   5. the README's layout section (between `<!-- layout:start -->` and `<!-- layout:end -->`, or the
#      `## Layout` section the first time) replaced by the one below, which describes the tree after 1-3.
# It fails loudly (exit 2) when a file it expects is missing, or when old and new both exist.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
# a Python with ruff (imports are re-sorted after the rewrite): $PYTHON, else python3, else the shared venv's
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -m ruff --version >/dev/null 2>&1 && [ -x /work/main/.venv/bin/python ]; then
    PYTHON=/work/main/.venv/bin/python
fi
"$PYTHON" -m ruff --version >/dev/null 2>&1 || { echo "apply_renames: needs a Python with ruff (set PYTHON=...)" >&2; exit 2; }
exec "$PYTHON" - "$@" <<'PY'
import re
import subprocess
import sys
from pathlib import Path

CHECK = "--check" in sys.argv[1:]
ALSO = [Path(a) for a in sys.argv[sys.argv.index("--also") + 1:]] if "--also" in sys.argv else []
for extra in ALSO:
    if not extra.is_file():
        print(f"apply_renames: --also {extra}: no such file", file=sys.stderr)
        sys.exit(2)
ROOT = Path.cwd()

# old module → new module (dotted); files follow (a module is NAME.py)
MOVES = [
    ("workers.service", "workers.service.app"),
    ("workers.service_config", "workers.service.config"),
    ("workers.heartbeat", "workers.service.heartbeat"),
    ("workers.adapter_loader", "workers.service.adapter_fetcher"),
    ("workers.folder_cache", "workers.service.folder_cache"),
    ("workers.keyed_locks", "workers.service.keyed_locks"),
    ("workers.residency_metrics", "workers.service.residency_metrics"),
    ("workers.speculative_metrics", "workers.service.speculative_metrics"),
    ("workers.request_auth", "workers.service.request_auth"),
    ("workers.choices", "workers.service.choices"),
    ("workers.context_length", "workers.service.context_length"),
    ("workers.drain", "workers.service.drain"),
    ("workers.load_report", "workers.service.load_report"),
    ("adapters_store.coordination", "adapters_store.wire"),
    ("adapters_store.registry", "adapters_store.version_store"),
    ("server.adapter_registry", "server.tenant_adapters"),
    ("server.adapter_catalog", "server.dropin_adapters"),
    ("workers.adapters.manager", "workers.adapters.residency"),
]
SYMBOLS = [
    ("AdapterStore", "VersionStore"),
    ("AdapterRegistry", "TenantAdapters"),
    ("AdapterCatalog", "DropInAdapters"),
    ("AdapterManager", "AdapterResidency"),
    ("AdapterLoader", "AdapterFetcher"),
]
# The one move whose old name is the new package's name: `workers.service` stays a valid module name (the
# package, runnable with -m), so a bare `workers.service` is left alone; `workers.service.X` for an
# attribute X, and imports from it, move to `workers.service.app`.
PACKAGE_FROM_MODULE = ("workers.service", "workers.service.app")
NEW_PACKAGE_FILES = {
    "workers/service/__init__.py": '''"""The worker process around the engine: its HTTP service (`app.py`, entry point `python -m
workers.service`), its config, heartbeat and load report, the adapter fetcher and its folder cache, the
cluster-signature middleware, drain, metrics collectors. Imports nothing itself, so importing one of its
modules does not start the app's imports."""
''',
    "workers/service/__main__.py": '''"""`python -m workers.service`: one model worker (see `workers.service.app`)."""

from workers.service.app import main

main()
''',
}
TEXT_SUFFIXES = {".py", ".md", ".toml", ".yml", ".yaml", ".sh", ".txt", ".cfg", ".ini", ".json", ".j2", ".html",
                 ".js", ".rst"}
# this script and its test hold the old names on purpose
SELF = {"scripts/dev/apply_renames.sh", "tests/layout/test_apply_renames.py"}


def fail(message: str) -> None:
    print(f"apply_renames: {message}", file=sys.stderr)
    sys.exit(2)


def path_of(module: str) -> Path:
    return Path(*module.split(".")).with_suffix(".py")


def git(*args: str) -> str:
    return subprocess.run(["git", *args], check=True, capture_output=True, text=True).stdout


# ---- 1-3: the moves ---------------------------------------------------------------------------------


def plan_moves() -> list[tuple[Path, Path]]:
    todo = []
    for old, new in MOVES:
        src, dst = path_of(old), path_of(new)
        if src.exists() and dst.exists():
            fail(f"both {src} and {dst} exist: merge them by hand first")
        if src.exists():
            todo.append((src, dst))
        elif not dst.exists():
            fail(f"expected {src} (or, already moved, {dst}); neither exists")
    return todo


def move_files(todo: list[tuple[Path, Path]]) -> None:
    for src, dst in todo:
        dst.parent.mkdir(parents=True, exist_ok=True)
        git("mv", str(src), str(dst))
        print(f"moved {src} -> {dst}")
    for name, text in NEW_PACKAGE_FILES.items():
        if not Path(name).exists():
            Path(name).write_text(text)
            git("add", name)
            print(f"created {name}")


# ---- 4: references ------------------------------------------------------------------------------------


def _from_import_rewrites() -> dict[tuple[str, str], tuple[str, str]]:
    """(package, name) of an old module → (new package, new name), for `from package import name`."""
    table = {}
    for old, new in MOVES:
        old_pkg, _, old_name = old.rpartition(".")
        new_pkg, _, new_name = new.rpartition(".")
        table[(old_pkg, old_name)] = (new_pkg, new_name)
    return table


FROM_IMPORT = re.compile(
    r"^(?P<indent>[ \t]*)from (?P<pkg>[\w.]+) import (?:\((?P<paren>[^)]*)\)|(?P<plain>[^\n(#]+?))(?P<tail>[ \t]*(#[^\n]*)?)$",
    re.M)


def rewrite_from_imports(text: str) -> str:
    """`from workers import heartbeat, engine` → `from workers import engine` + `from workers.service import
    heartbeat` (an alias keeps the name the code uses when the module's name changes)."""
    table = _from_import_rewrites()
    packages = {pkg for pkg, _ in table}

    def one(m: re.Match) -> str:
        pkg = m["pkg"]
        if pkg not in packages:
            return m[0]
        names = [n.strip() for n in (m["paren"] or m["plain"]).replace("\n", " ").split(",") if n.strip()]
        kept, moved = [], []
        for entry in names:
            name, _, alias = (part.strip() for part in entry.partition(" as "))
            if (pkg, name) in table:
                new_pkg, new_name = table[(pkg, name)]
                bound = alias or name
                moved.append(f"from {new_pkg} import {new_name}" + (f" as {bound}" if bound != new_name else ""))
            else:
                kept.append(entry)
        if not moved:
            return m[0]
        lines = ([f"from {pkg} import {', '.join(kept)}"] if kept else []) + moved
        return "\n".join(m["indent"] + line for line in lines) + (m["tail"] or "")

    return FROM_IMPORT.sub(one, text)


def rewrite_dotted(text: str) -> str:
    pkg_old, pkg_new = PACKAGE_FROM_MODULE
    submodules = sorted({new.rpartition(".")[2] for _, new in MOVES if new.startswith(pkg_old + ".")}
                        | {"__main__"})
    for old, new in MOVES:
        if (old, new) == PACKAGE_FROM_MODULE:
            continue
        text = re.sub(rf"(?<![\w.]){re.escape(old)}(?!\w)", new, text)
    o = re.escape(pkg_old)
    not_sub = rf"(?!(?:{'|'.join(submodules)})\b)"
    text = re.sub(rf"^([ \t]*)from {o} import {not_sub}", rf"\1from {pkg_new} import ", text, flags=re.M)
    text = re.sub(rf"^([ \t]*)import {o}([ \t]*(?:#.*)?)$", rf"\1import {pkg_new}\2", text, flags=re.M)
    text = re.sub(rf"(?<![\w.]){o}\.{not_sub}(?=[A-Za-z_])", pkg_new + ".", text)
    return text


def rewrite_paths(text: str) -> str:
    for old, new in MOVES:
        text = re.sub(rf"(?<![\w/.]){re.escape(str(path_of(old)))}(?!\w)", str(path_of(new)), text)
    return text


def rewrite_symbols(text: str) -> str:
    for old, new in SYMBOLS:
        text = re.sub(rf"\b{old}\b", new, text)
    return text


def text_files() -> list[Path]:
    files = []
    for name in git("ls-files", "-z").split("\0"):
        path = Path(name)
        if not name or name in SELF or not path.is_file():
            continue
        if path.suffix in TEXT_SUFFIXES or path.name.startswith("Dockerfile"):
            files.append(path)
    return files + ALSO


def rewrite_references() -> list[Path]:
    changed = []
    for path in text_files():
        try:
            before = path.read_text()
        except UnicodeDecodeError:
            continue
        after = rewrite_symbols(rewrite_paths(rewrite_dotted(before)))
        if path.suffix == ".py":
            after = rewrite_from_imports(after)
        if after != before:
            changed.append(path)
            if not CHECK:
                path.write_text(after)
    return changed


# ---- 5: the README's layout section -----------------------------------------------------------------

LAYOUT = """<!-- layout:start (written by scripts/dev/apply_renames.sh; edit freely after it ran) -->
## Layout

Words used for the places adapters live, from the bytes at rest to the rows on the device:

- **version store** (`VersionStore`, `adapters_store/version_store.py`): every published version's
  files, content-addressed, with names and aliases, on a local folder or S3. The only place adapters persist.
- **tenant adapters** (`TenantAdapters`, `server/tenant_adapters.py`): the gateway's view of the version store
  for one caller: uploads, listing, deletion, who sees which name, and which version a model name means.
- **drop-in adapters** (`DropInAdapters`, `server/dropin_adapters.py`): the operator's plain folders under
  `DATA_DIR/adapters/`, servable by bare name without an upload.
- **adapter fetcher** (`AdapterFetcher`, `workers/service/adapter_fetcher.py`): on a worker, turns the
  gateway's source (`store:…`, `dropin:…`, a merge) into a local folder and asks for it to be made resident,
  one fetch per name at a time.
- **adapter residency** (`AdapterResidency`, `workers/adapters/residency.py`): which adapters a worker holds in
  host memory and on the device, pinned while requests use them, evicted least-recently-used.
- **wire** (`adapters_store/wire.py`): what crosses process boundaries: Redis keys and payloads, worker
  HTTP schemas, job records. `server/protocol.py` is the public (OpenAI-compatible) API's schemas.

```
adapters_store/    torch-free leaf every server-side role imports: version_store.py (VersionStore on
                   backends.py: local FS / S3), wire.py (the cluster's wire protocol), upload validation per
                   kind (kinds.py, validation.py, s2ft_format.py, medusa_validation.py), ComPEFT codec,
                   merges (merge.py), training methods and their hyperparameters, cluster signatures,
                   error_shape.py (the JSON error shape both HTTP boundaries convert to), event_stream.py
                   (the one SSE writer)
server/            FastAPI gateway (no torch): OpenAI + native routes (routes/), protocol.py (public API
                   schemas), tenant_adapters.py, dropin_adapters.py, dispatch to workers (worker_client.py,
                   worker_registry.py), auth, metrics, launcher and operator commands (operator_cli.py);
                   console/static: the web console at /ui
workers/model/     the decoder (llama, qwen2, mistral) as plain modules, loader, KV cache, RoPE, kernels
workers/adapters/  adapter kinds, one module each (lora.py, compeft.py, s2ft.py, medusa.py, combined.py)
                   under one contract, registered once; residency.py (AdapterResidency), row bank and
                   slots, kernels, fusion (merge a hot adapter into the base)
workers/engine/    continuous-batching engine: scheduler, runner, sampler, detokenizer, async Engine,
                   speculative.py (Medusa tree verification)
workers/service/   the worker process around the engine: app.py (HTTP service, `python -m workers.service`),
                   config.py, heartbeat.py (registers in Redis) + load_report.py, adapter_fetcher.py +
                   folder_cache.py + keyed_locks.py, request_auth.py (cluster signatures), choices.py
                   (token events → answers), drain.py, context_length.py, *_metrics.py
workers/trainer/   fine-tune trainer process (worker.py) and job queue; the shared loop (training.py), the
                   methods (lora.py, s2ft.py, medusa.py) registered in method_registry.py against
                   method_contract.py
workers/errors.py  the worker's error hierarchy, raised by every package above, converted in service/app.py
clients/           Python SDK (adapterd_client: Client, AsyncClient) and the `adapterd` CLI: its own
                   distribution (clients/pyproject.toml); operator commands in server/operator_cli.py
docker/            Dockerfiles (gateway, worker, trainer), k8s/ (kustomize base + GPU overlay);
                   docker-compose.yml and docker-compose.gpu.yml at the root
tests/             unit and oracle tests (transformers, peft), tiny random models built at test time
bench/             benchmarks; figures land in bench/results/*.json
scripts/           setup and developer scripts (scripts/dev/)
```
<!-- layout:end -->
"""
MARKED = re.compile(r"<!-- layout:start.*?<!-- layout:end -->\n?", re.S)
SECTION = re.compile(r"^## Layout\n.*?(?=^## )", re.S | re.M)


def rewrite_readme() -> bool:
    readme = Path("README.md")
    if not readme.exists():
        fail("README.md is missing")
    text = readme.read_text()
    if MARKED.search(text):
        new = MARKED.sub(lambda _: LAYOUT, text, count=1)
    elif SECTION.search(text):
        new = SECTION.sub(lambda _: LAYOUT + "\n", text, count=1)
    else:
        fail("README.md has neither layout markers nor a '## Layout' section followed by another '## ' section")
    if new != text and not CHECK:
        readme.write_text(new)
    return new != text


def sort_imports(paths: list[Path]) -> None:
    """Import blocks re-sorted (and wrapped) by ruff; lines a longer name pushed past the limit are listed."""
    py = [str(p) for p in paths if p.suffix == ".py" and p.exists()]
    if py:
        subprocess.run([sys.executable, "-m", "ruff", "check", "--select", "I", "--fix", "--quiet", *py], check=False)
        found = subprocess.run([sys.executable, "-m", "ruff", "check", "--select", "E501", "--output-format",
                                "concise", "--quiet", *py], capture_output=True, text=True).stdout
        long = "\n".join(line for line in found.splitlines() if " E501 " in line)
        if long:
            print(f"apply_renames: wrap these lines by hand (a longer name pushed them past the limit):\n{long}")


def main() -> None:
    todo = plan_moves()
    if CHECK:
        pending = [f"move {s} -> {d}" for s, d in todo]
        pending += [f"rewrite {p}" for p in rewrite_references()] if not todo else []
        pending += ["rewrite README.md layout"] if rewrite_readme() else []
        print("\n".join(pending) or "nothing to do")
        sys.exit(1 if pending else 0)
    move_files(todo)
    changed = rewrite_references()
    sort_imports(changed)
    readme = rewrite_readme()
    print(f"rewrote references in {len(changed)} files" + ("; README layout section" if readme else ""))
    loose = sorted(p.name for p in Path("workers").glob("*.py") if p.name not in ("__init__.py", "errors.py"))
    if loose:
        print(f"apply_renames: new loose files at the root of workers/ (move them by hand if they are the "
              f"worker process's): {loose}")
    leftovers = rewrite_references()
    if leftovers:
        fail(f"a second pass would still change {leftovers}: the rewrite is not a fixpoint")


main()
PY
