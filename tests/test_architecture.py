"""The shape of the package (docs/architecture.md): folders are the layers, imports run one
way, no circles, few floors, small modules, one record format.

Read from the source with `ast`, so the checks cost nothing and cannot be fooled by lazy
imports: an import inside a function counts like one at the top. Layers come from the
folders, so a new module needs no edit here; a new folder needs a place in ORDER.

`python -m tests.test_architecture` prints every module's layer and floor and the longest chain.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "legitseg"

# The layers, lowest first: a module may import its own layer or a lower one, never a higher one.
# A name is a folder of legitseg/, or one of the two groups of top-level modules:
#   LEAVES - the top-level modules everything may import (the version, errors, files, versions);
#   TOP    - every other top-level module: the jobs and the API (run, api, options, summary, ...).
# output/ sits below images/ and the compute layers: the sink takes typed results and knows
# nothing of decoding or torch. verify/ sits above TOP because freezing a package runs a run.
# The package itself (legitseg/__init__.py, the public API) and __main__ are the CLI's layer.
LEAVES = {"legitseg._version", "legitseg.errors", "legitseg.fsio", "legitseg.provenance", "legitseg.timeline"}
# annotations/ reads OUT as evaluate/ does (records, masks, probability maps) and sits beside it.
ORDER = ["LEAVES", "manifest", "output", "images", "models", "inference", "engines", "evaluate", "annotations",
         "TOP", "verify", "cli"]
MAX_FLOORS = 12
MAX_LINES = 400
MODULES = sorted(PACKAGE.rglob("*.py"))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


NAMES = {module_name(p): p for p in MODULES}


def layer_of(name: str) -> int:
    parts = name.split(".")
    if name in ("legitseg", "legitseg.__main__"):
        return ORDER.index("cli")
    if (PACKAGE / parts[1]).is_dir():
        return ORDER.index(parts[1])  # ValueError: a new folder has no place in ORDER yet
    return ORDER.index("LEAVES" if name in LEAVES else "TOP")


def folder_of(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and (PACKAGE / parts[1]).is_dir() else ""


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _target(base: str, alias: str) -> str:
    """`from base import alias`: the module alias if it is one, else base."""
    sub = f"{base}.{alias}"
    return sub if sub in NAMES else base


@cache
def imports(name: str) -> dict[str, bool]:
    """Every legitseg module `name` imports (top level or in a function) -> whether only for type hints."""
    path = NAMES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: dict[str, bool] = {}

    def add(target: str, type_only: bool) -> None:
        if target.startswith("legitseg") and target != name:
            found[target] = found.get(target, True) and type_only

    def visit(node: ast.AST, type_only: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, True)
            for child in node.orelse:
                visit(child, type_only)
            return
        if isinstance(node, ast.Import):
            for a in node.names:
                add(a.name, type_only)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            for a in node.names:
                add(_target(base, a.name), type_only)
        for child in ast.iter_child_nodes(node):
            visit(child, type_only)

    visit(ast.parse(path.read_text()), False)
    return found


def runtime_imports(name: str) -> set[str]:
    return {t for t, type_only in imports(name).items() if not type_only}


def test_every_folder_is_a_layer():
    folders = sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py"))
    missing = [f for f in folders if f not in ORDER]
    assert not missing, f"give these folders a place in ORDER ({__file__}): {missing}"


def test_folders_are_packages_with_thin_inits():
    """Importing one module of a folder must not import its siblings (cli/ is the Typer app)."""
    assert not [p for p in PACKAGE.iterdir() if p.is_dir() and list(p.glob("*.py")) and not (p / "__init__.py").exists()]
    heavy = {module_name(p): sorted(imports(module_name(p))) for p in PACKAGE.glob("*/__init__.py")
             if p.parent.name != "cli" and imports(module_name(p))}
    assert not heavy, heavy


def test_no_import_runs_back_up():
    """Type hints included: a module that names a higher layer's type depends on it."""
    upward = []
    for me in NAMES:
        mine = layer_of(me)
        for target in sorted(imports(me)):
            if layer_of(target) > mine:
                upward.append(f"{me} ({ORDER[mine]}) imports {target} ({ORDER[layer_of(target)]})")
    assert not upward, "\n".join(upward)


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            strong(v)
    return out


def test_no_import_circles():
    """None at run time; at most one through type hints, inside one folder."""
    runtime = {m: runtime_imports(m) for m in NAMES}
    assert not _cycles(runtime), f"import circles: {_cycles(runtime)}"
    typed = _cycles({m: set(imports(m)) for m in NAMES})
    assert all(len({folder_of(m) for m in group}) == 1 for group in typed), f"type-only circles across folders: {typed}"
    assert len(typed) <= 1, f"type-only circles: {typed}"


_FLOORS: dict[str, int] = {}


def floor(name: str, _path: tuple[str, ...] = ()) -> int:
    """1 for a module importing no legitseg module, else one more than the highest it imports."""
    if name in _path:
        raise AssertionError(f"import circle: {' -> '.join(_path[_path.index(name):] + (name,))}")
    if name not in _FLOORS:
        _FLOORS[name] = 1 + max((floor(t, (*_path, name)) for t in runtime_imports(name)), default=0)
    return _FLOORS[name]


def longest_chain() -> list[str]:
    chain = [max(NAMES, key=floor)]
    while below := runtime_imports(chain[-1]):
        chain.append(max(sorted(below), key=floor))
    return chain


def test_few_floors():
    """Floors: the longest path in the import graph (every import that runs, lazy ones too;
    not those under TYPE_CHECKING), counted in modules."""
    chain = longest_chain()
    assert len(chain) == floor(chain[0])
    assert len(chain) <= MAX_FLOORS, f"{len(chain)} floors: {' -> '.join(chain)}"


def test_no_module_is_over_400_lines():
    big = {module_name(p): n for p in MODULES if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, f"split these by concept: {big}"


RECORD_ONLY_KEYS = {"area_fraction", "probability_map", "components", "error_kind", "overlay"}


def record_keys_spelled(path: Path) -> set[str]:
    """Record-only keys used as dict subscripts or .get() arguments in a module."""
    keys = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
            key = node.slice.value
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
              and node.args and isinstance(node.args[0], ast.Constant)):
            key = node.args[0].value
        else:
            continue
        if key in RECORD_ONLY_KEYS:
            keys.add(key)
    return keys


def test_the_record_format_is_defined_in_one_module():
    """Record fields are read and written through legitseg.output.records' types, never by string key elsewhere."""
    elsewhere = {module_name(p): keys for p in MODULES
                 if module_name(p) != "legitseg.output.records" and (keys := record_keys_spelled(p))}
    assert not elsewhere, f"record keys spelled outside output/records.py: {elsewhere}"


if __name__ == "__main__":
    for layer, group in enumerate(ORDER):
        members = sorted((n for n in NAMES if layer_of(n) == layer), key=lambda n: (floor(n), n))
        print(f"{layer:2} {group:9} " + ", ".join(f"{n.removeprefix('legitseg.')}:{floor(n)}" for n in members))
    chain = longest_chain()
    print(f"{len(chain)} floors (modules on the longest import path): {' -> '.join(chain)}")
