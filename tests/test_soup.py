"""SOUP evidence: `legitseg info --json` (CycloneDX bill of materials) and the
traceability matrix docs/soup/traceability.md, checked so that it cannot go stale."""

from __future__ import annotations

import ast
import json
import platform
import re
import subprocess
import sys
from functools import cache
from importlib import metadata
from pathlib import Path

import pytest
from typer.testing import CliRunner

from legitseg import __version__
from legitseg.cli import app
from legitseg.errors import EXIT_INTEGRITY, EXIT_OK, EXIT_USAGE
from legitseg.provenance import installed_distributions
from tests.conftest import REPO

MATRIX = REPO / "docs" / "soup" / "traceability.md"
ANOMALIES = REPO / "docs" / "soup" / "known-anomalies.md"


def invoke(*args, env: dict | None = None):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "4000", **(env or {})})


def bom(*args, env: dict | None = None) -> dict:
    r = invoke("info", "--json", *args, env=env)
    assert r.exit_code == EXIT_OK, r.output
    return json.loads(r.stdout)


def by_name(doc: dict) -> dict[str, dict]:
    return {c["name"]: c for c in doc["components"]}


def props(component: dict) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for p in component.get("properties", []):
        out.setdefault(p["name"], []).append(p["value"])
    return out


@pytest.fixture(scope="module")
def default_bom() -> dict:
    return bom()


@pytest.fixture
def matching_lock(tmp_path) -> Path:
    """A lock file that pins exactly what is installed here."""
    lock = tmp_path / "lock.txt"
    lock.write_text("".join(f"{name}=={version}\n" for key, (name, version) in installed_distributions().items()
                            if key != "legitseg"))
    return lock


# -- info --json --------------------------------------------------------------------------------
def test_info_json_is_a_cyclonedx_document_for_this_legitseg(default_bom):
    assert (default_bom["bomFormat"], default_bom["specVersion"]) == ("CycloneDX", "1.6")
    assert re.fullmatch(r"urn:uuid:[0-9a-f-]{36}", default_bom["serialNumber"])
    root = default_bom["metadata"]["component"]
    assert (root["name"], root["version"], root["type"]) == ("legitseg", __version__, "application")


def test_info_json_lists_every_installed_distribution_with_its_version(default_bom):
    components = by_name(default_bom)
    for dist in ("torch", "segmentation_models_pytorch", "timm", "numpy", "onnxruntime", "safetensors"):
        c = next(c for c in default_bom["components"] if c.get("purl", "").startswith(
            f"pkg:pypi/{dist.replace('_', '-').lower()}@"))
        assert c["version"] == metadata.version(dist), dist
        assert c["type"] == "library"
    listed = {c["purl"].split("@")[0].removeprefix("pkg:pypi/") for c in default_bom["components"] if "purl" in c}
    assert listed == set(installed_distributions()) - {"legitseg"}
    assert components["torch"]["purl"] == f"pkg:pypi/torch@{metadata.version('torch')}"


def test_info_json_names_the_interpreter_os_cpu_and_cuda_build(default_bom):
    import torch

    kinds = {c["bom-ref"]: c for c in default_bom["components"]}
    python = kinds["python"]
    assert (python["name"], python["version"]) == (platform.python_implementation(), platform.python_version())
    assert props(python)["legitseg:python:executable"] == [sys.executable]
    assert (kinds["os"]["type"], kinds["os"]["name"], kinds["os"]["version"]) == (
        "operating-system", platform.system(), platform.release())
    assert kinds["cpu"]["type"] == "device"
    if Path("/proc/cpuinfo").is_file():
        flags = props(kinds["cpu"])["legitseg:cpu:flags"][0].split()
        assert flags == sorted(flags) and len(flags) > 5
    if torch.version.cuda:
        assert kinds["cuda-runtime"]["version"] == torch.version.cuda
        assert kinds["cudnn"]["version"].startswith(f"{torch.backends.cudnn.version() // 10000}.")
    gpus = [c for c in default_bom["components"] if c["bom-ref"].startswith("cuda:")]
    assert [g["name"] for g in gpus] == [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def test_info_json_marks_every_package_as_matching_a_lock_of_what_is_installed(matching_lock):
    doc = bom("--lock", matching_lock)
    meta = props(doc["metadata"])
    assert meta["legitseg:lock:status"] == ["match"]
    assert meta["legitseg:lock:file"] == [str(matching_lock)]
    assert "legitseg:lock:different" not in meta and "legitseg:lock:missing" not in meta
    states = {c["name"]: props(c)["legitseg:lock"] for c in doc["components"] if "purl" in c}
    assert set(map(tuple, states.values())) == {("match",)}


def test_a_changed_lock_is_reported_package_by_package(matching_lock, tmp_path):
    torch_version = metadata.version("torch")
    changed = tmp_path / "changed.txt"
    text = re.sub(r"(?m)^torch==.*$", "torch==2.0.0", matching_lock.read_text())
    changed.write_text(text + "no-such-dist-for-legitseg==1.2.3\n")
    doc = bom(env={"LEGITSEG_LOCK_FILE": str(changed)})  # the variable works like --lock
    meta = props(doc["metadata"])
    assert meta["legitseg:lock:status"] == ["differs"]
    assert meta["legitseg:lock:different"] == [f"torch==2.0.0 installed {torch_version}"]
    assert meta["legitseg:lock:missing"] == ["no-such-dist-for-legitseg==1.2.3"]
    assert props(by_name(doc)["torch"])["legitseg:lock"] == ["different (locked 2.0.0)"]
    assert props(by_name(doc)["numpy"])["legitseg:lock"] == ["match"]
    # the table says the same
    r = invoke("info", "--lock", changed)
    assert r.exit_code == EXIT_OK
    assert f"torch: locked 2.0.0, installed {torch_version}" in r.stdout
    assert "no-such-dist-for-legitseg: locked 1.2.3, installed none" in r.stdout


def test_an_unlisted_package_is_marked_not_locked(matching_lock):
    matching_lock.write_text(re.sub(r"(?m)^numpy==.*\n", "", matching_lock.read_text()))
    doc = bom("--lock", matching_lock)
    assert props(doc["metadata"])["legitseg:lock:status"] == ["match"]  # extras do not break the lock
    assert props(by_name(doc)["numpy"])["legitseg:lock"] == ["not-locked"]


def test_a_lock_file_named_but_absent_is_a_usage_error(tmp_path):
    r = invoke("info", "--json", "--lock", tmp_path / "nope.txt")
    assert r.exit_code == EXIT_USAGE
    assert f"lock file {tmp_path / 'nope.txt'} does not exist" in r.stderr
    r = invoke("info", "--json", env={"LEGITSEG_LOCK_FILE": str(tmp_path / "gone.txt")})
    assert r.exit_code == EXIT_USAGE and "gone.txt does not exist" in r.stderr


def test_the_repository_lock_pins_every_declared_dependency():
    """requirements_lock.txt is the SOUP version lock: every pyproject dependency is pinned with ==."""
    import tomllib

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pinned = {re.sub(r"[-_.]+", "-", line.split("==")[0]).lower()
              for line in (REPO / "requirements_lock.txt").read_text().splitlines()
              if "==" in line and not line.startswith("#")}
    names = {re.sub(r"[-_.]+", "-", re.split(r"[<>=!~ \[;]", d)[0]).lower() for d in declared}
    assert names - pinned == set()


def test_importing_legitseg_turns_hub_access_off():
    code = "import os; os.environ.pop('HF_HUB_OFFLINE', None); import legitseg; print(os.environ['HF_HUB_OFFLINE'])"
    env = {k: v for k, v in __import__("os").environ.items() if k != "HF_HUB_OFFLINE"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert r.stdout.strip() == "1", r.stderr


def test_check_refuses_weights_that_give_non_finite_outputs(kit):
    """PR-004: a model whose outputs are NaN is refused by `models check` (exit 3), named."""
    import torch
    from safetensors.torch import load_file, save_file

    from legitseg.models.weights import sha256_file

    entry = kit.add("broken")
    path = kit.root / entry["weights"]
    state = load_file(str(path))
    key = next(k for k in state if k.startswith("segmentation_head") and k.endswith("bias"))
    state[key] = torch.full_like(state[key], float("nan"))
    save_file(state, str(path))
    entry["sha256"] = sha256_file(path)
    r = invoke("models", "check", "-m", kit.write())
    assert r.exit_code == EXIT_INTEGRITY, r.output
    assert "broken" in r.output and "output has NaN or Inf values" in r.output


# -- the traceability matrix ------------------------------------------------------------------
ROW = re.compile(r"^\|\s*(?P<id>(?:FR|PR|HR|SR|SEC)-\d{3})\s*\|(?P<rest>.*)$")
TEST_REF = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")


def matrix_rows() -> dict[str, list[tuple[str, str]]]:
    rows: dict[str, list[tuple[str, str]]] = {}
    for line in MATRIX.read_text().splitlines():
        m = ROW.match(line)
        if m:
            assert m["id"] not in rows, f"requirement {m['id']} appears twice in {MATRIX.name}"
            rows[m["id"]] = TEST_REF.findall(m["rest"])
    return rows


@cache
def defined_tests(test_file: str) -> frozenset[str]:
    """Test functions defined in a file (module level or in a Test* class); parsed, not imported."""
    path = REPO / test_file
    if not path.is_file():
        return frozenset()
    tree = ast.parse(path.read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            names.update(n.name for n in node.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef))
    return frozenset(n for n in names if n.startswith("test_"))


def test_traceability_matrix_names_only_tests_that_exist():
    rows = matrix_rows()
    stale = [f"{req}: {file}::{name}" for req, refs in rows.items() for file, name in refs
             if name not in defined_tests(file)]
    assert not stale, (f"{MATRIX.relative_to(REPO)} names tests that do not exist (renamed or removed?); "
                       "update these rows:\n  " + "\n  ".join(stale))


def test_every_requirement_row_has_a_test():
    rows = matrix_rows()
    expected = ({f"FR-{i:03d}" for i in range(1, 10)} | {f"PR-{i:03d}" for i in range(1, 5)})
    assert expected <= set(rows), f"rows missing from the matrix: {sorted(expected - set(rows))}"
    assert any(r.startswith("HR-") for r in rows) and any(r.startswith("SR-") for r in rows)
    assert any(r.startswith("SEC-") for r in rows)
    untested = sorted(req for req, refs in rows.items() if not refs)
    assert not untested, f"requirements with no test in {MATRIX.name}: {untested}"


def test_every_known_anomaly_names_a_test_that_exists():
    entries = re.split(r"(?m)^## ", ANOMALIES.read_text())[1:]
    assert entries, f"{ANOMALIES.name} lists no anomaly"
    untested = [e.splitlines()[0] for e in entries if not TEST_REF.search(e)]
    assert not untested, f"anomalies in {ANOMALIES.name} without a test: {untested}"
    stale = [f"{e.split()[0]}: {file}::{name}" for e in entries for file, name in TEST_REF.findall(e)
             if name not in defined_tests(file)]
    assert not stale, (f"{ANOMALIES.name} names tests that do not exist; update these entries:\n  "
                       + "\n  ".join(stale))
