"""The shape of the package (docs/architecture.md): layers, module size, one record format.

Read from the source with `ast`, so the checks cost nothing and cannot be fooled by
lazy imports: an import inside a function counts like one at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "legitseg"

# Lowest first. A module may import modules of its own layer or below, never above.
# (Within a layer, the modules are siblings: the backends, say.)
LAYERS: list[tuple[str, list[str]]] = [
    ("foundation", ["legitseg", "legitseg.errors", "legitseg.fsio", "legitseg.manifest.smp_names", "legitseg.inference.ort_import"]),
    ("data", ["legitseg.output.records", "legitseg.verify.tolerances", "legitseg.output.shard", "legitseg.manifest.safe_yaml", "legitseg.manifest.colours", "legitseg.manifest.modes", "legitseg.manifest.spec", "legitseg.provenance",
              "legitseg.output.lock"]),
    ("models", ["legitseg.models.weights", "legitseg.models.factory", "legitseg.models.convert", "legitseg.models.describe",
                "legitseg.models.check", "legitseg.models.onnx_export"]),
    ("input", ["legitseg.pipeline", "legitseg.images.naming", "legitseg.images.containers",
               "legitseg.images.sources", "legitseg.images.decode", "legitseg.images.device_decode", "legitseg.images.pixels",
               "legitseg.images.geometry"]),
    ("compute", ["legitseg.inference.postprocess", "legitseg.inference.runners", "legitseg.inference.torch_runner",
                 "legitseg.inference.ort_runner", "legitseg.inference.modes", "legitseg.pipeline.tta",
                 "legitseg.pipeline.letterbox", "legitseg.pipeline.tiling", "legitseg.engines.transfer", "legitseg.inference.layout_tuning",
                 "legitseg.engines.profile"]),
    ("output", ["legitseg.output.writers", "legitseg.output.overlay"]),
    ("engines", ["legitseg.engines.local", "legitseg.engines.ray_data"]),
    ("jobs", ["legitseg.run", "legitseg.options", "legitseg.export", "legitseg.evaluate.scoring", "legitseg.evaluate.truth", "legitseg.evaluate.output",
              "legitseg.report", "legitseg.bom", "legitseg.summary", "legitseg.verify.cases",
              "legitseg.verify.compare", "legitseg.verify.package", "legitseg.verify.schema", "legitseg.images.inputs"]),
    ("api", ["legitseg.api"]),
    ("cli", ["legitseg.cli", "legitseg.cli.*", "legitseg.__main__"]),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(name: str) -> int | None:
    for i, (_, names) in enumerate(LAYERS):
        for pattern in names:
            if name == pattern or (pattern.endswith(".*") and name.startswith(pattern[:-1])):
                return i
    return None


def legitseg_imports(path: Path) -> set[str]:
    """Every legitseg module imported anywhere in the file (top level or inside functions)."""
    found = set()
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("legitseg"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.startswith("legitseg"):
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    found.add(sub if (PACKAGE.parent / (sub.replace(".", "/") + ".py")).exists()
                              or (PACKAGE.parent / sub.replace(".", "/")).is_dir() else base)
    return found - {me}


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer():
    missing = [module_name(p) for p in MODULES if layer_of(module_name(p)) is None]
    assert not missing, f"add these modules to LAYERS in {__file__}: {missing}"


def test_no_module_imports_a_higher_layer():
    upward = []
    for path in MODULES:
        me = module_name(path)
        if me == "legitseg":
            continue  # the root holds the version for every layer and re-exports the API lazily (PEP 562)
        mine = layer_of(me)
        for target in sorted(legitseg_imports(path)):
            theirs = layer_of(target)
            if mine is not None and theirs is not None and theirs > mine:
                upward.append(f"{me} ({LAYERS[mine][0]}) imports {target} ({LAYERS[theirs][0]})")
    assert not upward, "\n".join(upward)


def test_writers_do_not_import_the_pipeline():
    assert not {m for m in legitseg_imports(PACKAGE / "writers.py") if m.startswith("legitseg.pipeline")}


def test_no_module_is_over_400_lines():
    big = {module_name(p): n for p in MODULES if (n := len(p.read_text().splitlines())) > 400}
    assert not big, f"split these by concept: {big}"


RECORD_ONLY_KEYS = {"area_fraction", "probability_map", "components", "error_kind", "overlay"}
# Readers still to move to the typed records (removed from this set as they move).
PENDING: set[str] = set()


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
                 if p.name != "records.py" and module_name(p) not in PENDING and (keys := record_keys_spelled(p))}
    assert not elsewhere, f"record keys spelled outside records.py: {elsewhere}"
