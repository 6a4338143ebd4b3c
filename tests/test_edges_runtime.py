"""Issue 23, item 11 and low items: ONNX Runtime's telemetry, predict_one's input check,
big-endian arrays, `models convert` on a non-tensor, and the shard layout recorded in OUT."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from legitseg.errors import UsageError
from tests.conftest import REPO, ModelKit, invoke_cli

PACKAGE = REPO / "legitseg"
TELEMETRY = Path(".cache/Microsoft/DeveloperTools/.onnxruntime")


def _photos(folder: Path, n: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        img = cv2.GaussianBlur(rng.integers(0, 255, (48 + 4 * i, 64, 3), dtype=np.uint8), (5, 5), 0)
        cv2.imwrite(str(folder / f"p{i}.png"), img)
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("edges")
    kit = ModelKit(root)
    kit.add("seg")
    return kit.write(), _photos(root / "photos")


# -- item 11: ONNX Runtime's telemetry ---------------------------------------------------------
def _onnxruntime_imports(path: Path) -> list[str]:
    """`import onnxruntime...` / `from onnxruntime... import` / import_module("onnxruntime...") in a
    file, outside `if TYPE_CHECKING:` blocks (never executed)."""
    tree = ast.parse(path.read_text(), str(path))
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
               and ast.unparse(node.test).endswith("TYPE_CHECKING") for n in ast.walk(node)}
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            if ast.unparse(node.func).endswith(("import_module", "__import__")):
                names = [str(node.args[0].value)]
        found += [f"{path.relative_to(REPO)}:{node.lineno}" for name in names
                  if name == "onnxruntime" or name.startswith("onnxruntime.")]
    return found


def test_item11_every_onnxruntime_import_goes_through_the_guarded_function():
    imports = {str(p.relative_to(REPO)): _onnxruntime_imports(p) for p in PACKAGE.rglob("*.py")}
    assert imports.get("legitseg/inference/ort_import.py"), "legitseg/inference/ort_import.py must be where ONNX Runtime is imported"
    others = sorted(hit for name, hits in imports.items() if name != "legitseg/inference/ort_import.py" for hit in hits)
    assert others == [], f"import ONNX Runtime through legitseg.inference.ort_import.onnxruntime(): {others}"
    # The checker itself finds the forms it looks for.
    probe = PACKAGE.parent / "tests" / "__edges_probe.py"
    try:
        probe.write_text("import os, onnxruntime\nfrom onnxruntime.capi import x\n"
                         "importlib.import_module('onnxruntime')\n")
        assert len(_onnxruntime_imports(probe)) == 3
    finally:
        probe.unlink()


# ONNX Runtime writes no telemetry files when it sees one of these (a CI machine sets
# them): they are removed so the tests below see what a user's shell sees.
CI_MARKERS = ("CI", "TF_BUILD", "GITHUB_ACTIONS", "GITLAB_CI", "CIRCLECI", "TRAVIS", "JENKINS_URL",
              "CODEBUILD_BUILD_ID", "BUILDKITE", "TEAMCITY_VERSION", "APPVEYOR", "BITBUCKET_BUILD_NUMBER")


def _clean_env(home: Path, **extra: str) -> dict[str, str]:
    """This environment with HOME at `home`, nothing that moves a cache elsewhere and no CI marker."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("XDG_", "LEGITSEG_", "ORT_", "HF_", "TORCH_", "RAY_"))
           and k not in ("PYTEST_CURRENT_TEST", *CI_MARKERS)}
    env.update(HOME=str(home), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **extra)
    return env


def _home_files(home: Path) -> list[str]:
    return sorted(p.relative_to(home).as_posix() for p in home.rglob("*") if p.is_file())


def test_item11_the_guarded_import_leaves_nothing_even_when_telemetry_was_asked_for(tmp_path):
    bare, guarded = tmp_path / "bare", tmp_path / "guarded"
    bare.mkdir(), guarded.mkdir()
    code = ("import os; from legitseg.inference.ort_import import onnxruntime; ort = onnxruntime(); "
            "assert ort.InferenceSession; print(os.environ['ORT_DISABLE_TELEMETRY'])")
    r = subprocess.run([sys.executable, "-c", code], env=_clean_env(guarded, ORT_DISABLE_TELEMETRY="0"),
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "1"  # forced off, whatever the caller set
    assert _home_files(guarded) == []

    # Control: a bare import with the same environment writes the telemetry files, so the
    # empty HOME above means the guard worked, not that this ONNX Runtime never writes.
    env_bare = _clean_env(bare, ORT_DISABLE_TELEMETRY="0")
    subprocess.run([sys.executable, "-c", "import onnxruntime"], env=env_bare, check=True, timeout=120)
    if not any(f.startswith(TELEMETRY.as_posix()) for f in _home_files(bare)):
        pytest.skip("this ONNX Runtime writes no telemetry here even unguarded, so the empty HOME "
                    "above proves nothing on this machine")


def test_item11_cli_run_and_export_leave_nothing_in_home_but_legitseg_cache(world, tmp_path):
    manifest, photos = world
    home = tmp_path / "home"
    home.mkdir()
    env = _clean_env(home)
    base = [sys.executable, "-m", "legitseg"]
    run = subprocess.run([*base, "run", str(photos), "-m", str(manifest), "-o", str(tmp_path / "out"),
                          "--device", "cpu", "--backend", "onnxruntime", "--workers", "1"],
                         env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert json.loads((tmp_path / "out" / "run.json").read_text())["models"]["seg"]["backend"] == "onnxruntime"
    export = subprocess.run([*base, "export", "seg", "-m", str(manifest), "-o", str(tmp_path / "seg.onnx")],
                            env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert export.returncode == 0, export.stderr
    files = _home_files(home)
    # legitseg's own cache (~/.cache/legitseg, docs/onnx.md) and nothing else: no
    # ONNX Runtime telemetry, and nothing from torch, timm or huggingface_hub.
    assert files and all(f.startswith(".cache/legitseg/") for f in files), files


def test_item11_python_api_in_a_process_leaves_nothing_in_home_but_legitseg_cache(world, tmp_path):
    manifest, photos = world
    home = tmp_path / "home"
    home.mkdir()
    code = (f"from legitseg import Predictor\n"
            f"p = Predictor({str(manifest)!r}, device='cpu', backend='onnxruntime', workers=0)\n"
            f"assert p.backends == {{'seg': 'onnxruntime'}}, p.backends\n"
            f"assert p.predict_one({str(photos / 'p0.png')!r}).ok\n")
    r = subprocess.run([sys.executable, "-c", code], env=_clean_env(home), capture_output=True, text=True,
                       timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    files = _home_files(home)
    assert files and all(f.startswith(".cache/legitseg/") for f in files), files


# -- low: predict_one's input, big-endian arrays -----------------------------------------------
@pytest.fixture(scope="module")
def predictor(world):
    from legitseg import Predictor

    return Predictor(world[0], device="cpu", backend="torch", workers=0)


@pytest.mark.parametrize("item", [{"a": 1}, {"p0.png"}, 7, 2.5, None], ids=repr)
def test_low_predict_one_dict(predictor, item):
    with pytest.raises(UsageError) as err:
        predictor.predict_one(item)
    assert str(err.value) == (f"predict_one: an image of type {type(item).__name__}: give one file path, "
                              "a numpy array or a PIL image (predict() takes folders, lists and generators)")
    assert err.value.exit_code == 2


def test_low_big_endian_uint16(predictor):
    rng = np.random.default_rng(3)
    native = rng.integers(0, 65536, (40, 52, 3), dtype=np.uint16)
    big = native.astype(">u2")
    assert big.dtype.byteorder == ">" and (big == native).all()
    got, want = predictor.predict_one(big), predictor.predict_one(native)
    assert got.ok and want.ok, (got.error, want.error)
    assert (got["seg"].mask == want["seg"].mask).all()
    assert got.sha256 == want.sha256  # the same pixels, hashed after conversion
    gray = predictor.predict_one(native[:, :, 0].astype(">u2"))
    assert gray.ok and (gray["seg"].mask == predictor.predict_one(native[:, :, 0])["seg"].mask).all()


# -- low: models convert on a non-tensor -------------------------------------------------------
def test_low_convert_non_tensor(tmp_path):
    import torch

    cases = [
        ({"enc.weight": torch.zeros(2), "enc.step": 3}, [],
         "in the state_dict at the top level, entry 'enc.step' is an int, not a tensor"),
        ({"state_dict": {"enc.weight": torch.zeros(2), "note": "x", "n": 1}, "epoch": 2}, [],
         "in the state_dict at entry 'state_dict', entry 'note' is a str, not a tensor (and 1 more such entry)"),
        ({"weights": {"enc.weight": torch.zeros(2), 5: torch.zeros(1)}}, ["--key", "weights"],
         "in the state_dict at entry 'weights', key 5 is an int, not a string"),
    ]
    for i, (obj, extra, message) in enumerate(cases):
        src, dst = tmp_path / f"c{i}.pt", tmp_path / f"c{i}.safetensors"
        torch.save(obj, src)
        r = invoke_cli("models", "convert", str(src), str(dst), *extra)
        assert r.returncode == 3, r.stderr
        assert r.stderr.strip() == (f"legitseg: error: {src}: {message}; a weights file holds tensors under "
                                    "string names only: remove it from the state_dict before saving")
        assert "model 'convert'" not in r.stderr
        assert not dst.exists() and not list(tmp_path.glob(".*tmp*"))


# -- low: the shard layout recorded in OUT -----------------------------------------------------
def test_low_shard_layout(world, tmp_path):
    manifest, photos = world
    out = tmp_path / "out"

    def run(shard: str):
        return invoke_cli("run", str(photos), "-m", str(manifest), "-o", str(out), "--shard", shard,
                          "--device", "cpu", "--backend", "torch", "--workers", "0", "-q")

    first = run("0/2")
    assert first.returncode == 0, first.stderr
    layout = json.loads((out / "shards.json").read_text())
    assert (layout["count"], layout["first_shard"], layout["split"]) == (2, "0/2", "sha256(output name) mod N")
    records = sorted(p.name for p in (out / "records").glob("*.json"))
    runs = sorted((out / "runs").glob("*.json"))

    # Later, with nothing else running (no lock to see), another N is still refused.
    other = run("1/3")
    assert other.returncode == 2, other.stderr
    line = other.stderr.strip()
    assert line.startswith(f"legitseg: error: --shard 1/3: output folder {out} is split as N=2 "
                           "(sha256(output name) mod N; first_shard 0/2, host "), line
    assert f"({out / 'shards.json'}), this run as N=3 (sha256(output name) mod N)" in line
    assert "use --shard i/2, another -o, or delete shards.json" in line
    assert sorted(p.name for p in (out / "records").glob("*.json")) == records
    assert sorted((out / "runs").glob("*.json")) == runs
    assert json.loads((out / "shards.json").read_text()) == layout

    second = run("1/2")  # the rest of the same split runs, and the set is complete
    assert second.returncode == 0, second.stderr
    assert len(list((out / "records").glob("*.json"))) == 3


def test_low_shard_layout_first_writer_wins_and_damage_is_named(tmp_path):
    from legitseg.output.shard import Shard, claim_layout

    out = tmp_path / "out"
    claim_layout(out, Shard(1, 4))
    claim_layout(out, Shard(3, 4))  # same split: accepted, the record is the first shard's
    assert json.loads((out / "shards.json").read_text())["first_shard"] == "1/4"
    with pytest.raises(UsageError, match=r"split as N=4 .* this run as N=2"):
        claim_layout(out, Shard(0, 2))
    (out / "shards.json").write_text("{not json")
    with pytest.raises(UsageError, match=r"shards.json is not a shard layout"):
        claim_layout(out, Shard(0, 4))
    assert not [p for p in out.iterdir() if p.name != "shards.json"]  # no temporary left
