"""The adapter-kind contract holds in the production code: outside the kind registries
(`adapters_store/kinds.py`, `workers/adapters/kinds.py`) nothing tests an adapter's type (`isinstance` on a
kind's classes) or dispatches on a kind's name (`x.kind == "lora"`, `kind in ("s2ft", "combined")`).
Read from the AST of every production module; the checker itself is tested on snippets."""

import ast
from pathlib import Path

from adapters_store import kinds as store_kinds
from adapters_store import medusa_validation, s2ft_format, validation
from workers.adapters import kinds as worker_kinds

ROOT = Path(__file__).resolve().parents[2]
PRODUCTION = ("adapters_store", "server", "workers")
REGISTRIES = {"adapters_store/kinds.py", "workers/adapters/kinds.py"}
# training *methods* are named like the kinds they train and dispatch on their method type; issue 13's item 4
# (branch issue-13b) registers them the way kinds are — drop these two once it lands
KIND_MODULES = ("workers/adapters/kind.py", "workers/adapters/lora.py", "workers/adapters/lora_kind.py",
                "workers/adapters/compeft.py", "workers/adapters/combined.py", "workers/adapters/s2ft.py",
                "workers/adapters/s2ft_kind.py", "workers/adapters/medusa.py")


# a kind's own format module may tell its own names apart (the LoRA check: "lora" or "compeft" weights)
OWN_NAMES = {"adapters_store/validation.py": validation.STORE_KIND.names,
             "adapters_store/s2ft_format.py": s2ft_format.STORE_KIND.names,
             "adapters_store/medusa_validation.py": medusa_validation.STORE_KIND.names}


def kind_names() -> set[str]:
    return set(store_kinds.kind_names()) | {kind.name for kind in worker_kinds.registered()}


def kind_classes() -> set[str]:
    """Every class a kind module defines (its weights, its host copy, its kind, its device)."""
    return {node.name for path in KIND_MODULES for node in ast.walk(ast.parse((ROOT / path).read_text()))
            if isinstance(node, ast.ClassDef)}


def _names(node: ast.expr) -> set[str]:
    if isinstance(node, ast.Tuple):
        return {n for element in node.elts for n in _names(element)}
    if isinstance(node, ast.Name):
        return {node.id}
    if isinstance(node, ast.Attribute):
        return {node.attr}
    return set()


def _kind_literals(node: ast.expr, names: set[str]) -> bool:
    if isinstance(node, ast.Constant):
        return node.value in names
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return any(_kind_literals(e, names) for e in node.elts)
    return False


def violations(source: str, classes: set[str], names: set[str]) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in ("isinstance", "issubclass") and len(node.args) == 2
                and _names(node.args[1]) & classes):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if (any(_kind_literals(o, names) for o in operands)
                    and any("kind" in ast.unparse(o) for o in operands if not _kind_literals(o, names))):
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_no_kind_dispatch_outside_the_kind_registries():
    classes, names = kind_classes(), kind_names()
    assert {"LoRAWeights", "S2FTWeights", "CombinedSource", "MedusaWeights"} <= classes
    assert {"lora", "compeft", "s2ft", "medusa", "combined"} <= names
    problems = []
    for package in PRODUCTION:
        for path in sorted((ROOT / package).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            if relative not in REGISTRIES:
                others = names - set(OWN_NAMES.get(relative, ()))
                problems += [f"{relative} {v}" for v in violations(path.read_text(), classes, others)]
    assert problems == []


def test_the_checker_finds_type_tests_and_kind_name_dispatch():
    classes, names = {"LoRAWeights", "S2FTWeights"}, {"lora", "s2ft"}
    snippet = """
if isinstance(w, LoRAWeights): pass
if isinstance(w, (int, weights.S2FTWeights)): pass
if source.kind == "lora": pass
if "s2ft" != manifest.kind: pass
if body.kind in ("lora", "combined"): pass
if update.kind == "col": pass            # not a kind name
if isinstance(x, nn.Linear): pass        # not a kind class
if name == "lora": pass                  # no kind on the other side
"""
    assert [v.split(":")[0] for v in violations(snippet, classes, names)] == [
        "line 2", "line 3", "line 4", "line 5", "line 6"]
