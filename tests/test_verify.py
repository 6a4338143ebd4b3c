"""`legitseg verify --make` freezes real photographs as a package; `legitseg verify` re-runs and compares.

Tiny real models (ModelKit) and JPEG photographs written with Pillow; the bundled demo
package is verified with the bundled models.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from legitseg.cli import app
from legitseg.errors import EXIT_INTEGRITY, EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, EXIT_VERIFY_FAILED
from tests.conftest import REPO, ModelKit
from tests.images import picture, save

PHOTOS = {"arm.jpg": (75, 101, 1), "back.jpg": (88, 64, 2), "knee.jpg": (61, 93, 3)}


def invoke(*args: str):
    return CliRunner().invoke(app, [*map(str, args)])


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict:
    """A package made with the torch backend from three JPEG photos, a binary and a severity model."""
    root = tmp_path_factory.mktemp("verify")
    kit = ModelKit(root)
    kit.add("seg", seed=3)
    kit.add("sev", task="severity", classes=4, seed=4)
    manifest = kit.write()
    photos = [save(root / "photos" / n, picture(h, w, s), quality=90) for n, (h, w, s) in PHOTOS.items()]
    package = root / "package"
    result = invoke("verify", "--make", package, *photos, "-m", manifest, "--backend", "torch",
                    "--device", "cpu", "-q")
    assert result.exit_code == EXIT_OK, result.output
    return {"root": root, "kit": kit, "manifest": manifest, "package": package, "photos": photos}


def _manifest_with(made: dict, tmp_path: Path, model: str, **changes) -> Path:
    models = {}
    for name, entry in made["kit"].models.items():
        entry = {**entry, "weights": str(made["root"] / entry["weights"])}
        if name == model:
            entry.update(changes)
        models[name] = entry
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "models": models}, sort_keys=False))
    return path


def _cases(made: dict) -> list[str]:
    return [c["name"] for c in json.loads((made["package"] / "package.json").read_text())["cases"]]


def test_make_freezes_inputs_expected_outputs_models_and_provenance(made):
    from legitseg.manifest.spec import load_manifest
    from legitseg.output.records import settings_digest

    package = made["package"]
    data = json.loads((package / "package.json").read_text())
    specs = load_manifest(made["manifest"]).models
    assert data["kind"] == "legitseg verification package" and data["version"] == 1
    for name in ("seg", "sev"):
        model = data["models"][name]
        assert model["weights_sha256"] == specs[name].sha256
        assert model["settings"] == settings_digest(specs[name])
        assert model["backend"] == "torch"
        assert model["tolerances"] == {"max_dp": 0.01, "min_agreement": 0.999, "max_score_delta": 0.01}
    assert sorted(_cases(made)) == sorted(PHOTOS)
    # Provenance: the content of the run file of the run that made the package.
    assert data["provenance"]["run_id"] and data["provenance"]["arguments"]["save_probabilities"] is True
    for case in data["cases"]:
        folder = package / "cases" / case["name"]
        source = made["root"] / "photos" / case["name"]
        assert (package / case["input"]).read_bytes() == source.read_bytes()
        with np.load(folder / "expected" / "seg.npz") as npz:
            q = npz["probabilities"]
        h, w, _ = PHOTOS[case["name"]]
        assert q.dtype == np.uint8 and q.shape == (1, h, w)
        scores = json.loads((folder / "scores.json").read_text())["models"]
        assert set(scores) == {"seg", "sev"} and scores["sev"]["grade"] in range(4)
        assert (folder / "expected" / "seg.png").is_file()
    # Every file of the package is pinned by its sha256.
    assert set(data["files"]) == {p.relative_to(package).as_posix()
                                  for p in (package / "cases").rglob("*") if p.is_file()}


def test_verify_passes_and_writes_json_and_report(made, tmp_path):
    out = tmp_path / "result"
    result = invoke("verify", made["package"], "-m", made["manifest"], "--backend", "torch",
                    "--device", "cpu", "-o", out, "-q")
    assert result.exit_code == EXIT_OK, result.output
    for case in _cases(made):
        assert f"PASS {case}\n" in result.output
    assert "verification PASSED: 3/3" in result.output
    doc = json.loads((out / "verification.json").read_text())
    assert doc["ok"] is True and doc["counts"] == {"cases": 3, "passed": 3, "failed": 0}
    seg = doc["cases"][0]["models"]["seg"]
    assert seg["mask_agreement"]["value"] == 1.0 and seg["max_dp"]["value"] <= 0.0025
    assert (out / "report.md").read_text().startswith("# Verification PASSED")
    assert (out / "outputs" / "run.json").is_file()


def test_package_made_with_torch_verifies_under_onnxruntime(made, tmp_path):
    out = tmp_path / "ort"
    result = invoke("verify", made["package"], "-m", made["manifest"], "--backend", "onnxruntime",
                    "--device", "cpu", "-o", out, "-q")
    assert result.exit_code == EXIT_OK, result.output
    doc = json.loads((out / "verification.json").read_text())
    assert doc["models"]["seg"]["backend"] == {"package": "torch", "now": "onnxruntime"}
    assert doc["models"]["sev"]["backend"] == {"package": "torch", "now": "onnxruntime"}


def _changed_weights(made: dict, tmp_path: Path) -> dict:
    """The seg weights re-saved with one tensor changed (its head bias), and the manifest's new sha256."""
    from safetensors.torch import load_file, save_file

    from legitseg.models.weights import sha256_file

    state = load_file(str(made["root"] / made["kit"].models["seg"]["weights"]))
    key = next(k for k in state if k.startswith("segmentation_head") and k.endswith("bias"))
    state[key] = state[key] + 1.5
    path = tmp_path / "seg-changed.safetensors"
    save_file(state, str(path))
    return {"weights": str(path), "sha256": sha256_file(path)}


def _threshold_that_flips(made: dict) -> dict:
    """A threshold that flips at least a fifth of the first case's pixels."""
    case = _cases(made)[0]
    with np.load(made["package"] / "cases" / case / "expected" / "seg.npz") as npz:
        p = npz["probabilities"].astype(np.float64) / 255
    value = round(float(np.quantile(p, 0.25 if np.mean(p > 0.5) > 0.5 else 0.75)), 3)
    assert abs(np.mean(p > value) - np.mean(p > 0.5)) > 0.2
    return {"threshold": value}


@pytest.mark.parametrize(("change", "model_problem", "measure"), [
    ("weights", "weights sha256", "max_dp"),
    ("threshold", "setting threshold", "mask_agreement"),
    ("resize", "setting resize: 'pad' in the manifest, '(default)' in the package", "max_dp"),
])
def test_a_changed_model_fails_naming_the_case_and_the_measure(made, tmp_path, change, model_problem, measure):
    changes = {"weights": lambda: _changed_weights(made, tmp_path),
               "threshold": lambda: _threshold_that_flips(made),
               "resize": lambda: {"resize": "pad"}}[change]()
    manifest = _manifest_with(made, tmp_path, "seg", **changes)
    out = tmp_path / "result"
    result = invoke("verify", made["package"], "-m", manifest, "--backend", "torch", "--device", "cpu",
                    "-o", out, "-q")
    assert result.exit_code == EXIT_VERIFY_FAILED, result.output
    assert f"FAIL model seg: {model_problem}" in result.output
    first = _cases(made)[0]
    line = next(x for x in result.output.splitlines() if x.startswith(f"FAIL {first}: "))
    assert f"seg: {measure} " in line and "limit" in line
    assert "sev" not in line  # the unchanged model holds
    assert "verification FAILED" in result.output
    doc = json.loads((out / "verification.json").read_text())
    assert doc["ok"] is False and doc["models"]["seg"]["ok"] is False and doc["models"]["sev"]["ok"] is True
    assert doc["cases"][0]["models"]["seg"][measure]["ok"] is False
    assert "**FAIL**" in (out / "report.md").read_text()


def test_make_refuses_a_non_empty_package_folder(made):
    before = (made["package"] / "package.json").read_bytes()
    result = invoke("verify", "--make", made["package"], made["photos"][0], "-m", made["manifest"])
    assert result.exit_code == EXIT_USAGE
    assert f"package folder {made['package']} already exists and is not empty" in result.output
    assert (made["package"] / "package.json").read_bytes() == before


def test_make_with_an_image_that_fails_leaves_no_package(made, tmp_path):
    bad = tmp_path / "x.jpg"
    bad.write_text("not a picture")
    package = tmp_path / "package"
    result = invoke("verify", "--make", package, made["photos"][0], bad, "-m", made["manifest"],
                    "--backend", "torch", "--device", "cpu", "-q")
    assert result.exit_code == EXIT_RUNTIME
    assert "x.jpg" in result.output and "failed" in result.output
    assert not package.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".package")]


@pytest.mark.parametrize(("args", "message"), [
    (["--max-dp", "0.001"], "max_dp 0.001: must be between 0.0024"),
    (["--min-agreement", "1.5"], "min_agreement 1.5: must be between 0 and 1"),
])
def test_make_refuses_tolerances_out_of_range(made, tmp_path, args, message):
    result = invoke("verify", "--make", tmp_path / "p", made["photos"][0], "-m", made["manifest"], *args)
    assert result.exit_code == EXIT_USAGE and message in result.output
    assert not (tmp_path / "p").exists()


def test_a_model_missing_from_the_manifest_is_an_integrity_error(made, tmp_path):
    kit = ModelKit(tmp_path)
    kit.models = {"seg": {**made["kit"].models["seg"], "weights": str(made["root"] / made["kit"].models["seg"]["weights"])}}
    result = invoke("verify", made["package"], "-m", kit.write(), "-o", tmp_path / "r")
    assert result.exit_code == EXIT_INTEGRITY
    assert "model 'sev' of verification package" in result.output and "it has: seg" in result.output


def test_an_altered_package_file_is_an_integrity_error(made, tmp_path):
    package = tmp_path / "package"
    shutil.copytree(made["package"], package)
    case = _cases(made)[1]
    target = package / "cases" / case / "expected" / "seg.png"
    target.write_bytes(target.read_bytes() + b"\0")
    result = invoke("verify", package, "-m", made["manifest"], "-o", tmp_path / "r")
    assert result.exit_code == EXIT_INTEGRITY
    assert f"package file cases/{case}/expected/seg.png was altered" in result.output
    assert not (tmp_path / "r").exists()


def test_bundled_demo_package_verifies_with_the_bundled_models(tmp_path):
    package = REPO / "examples" / "verification"
    data = json.loads((package / "package.json").read_text())
    assert 3 <= len(data["cases"]) <= 4
    assert sum(p.stat().st_size for p in package.rglob("*") if p.is_file()) < 2_000_000
    cwd = os.getcwd()
    os.chdir(REPO)  # the demo manifest names its weights relative to the repository
    try:
        # Made with torch; the default backend on the CPU is ONNX Runtime.
        result = invoke("verify", "examples/verification", "-m", "models.yaml", "--device", "cpu",
                        "-o", tmp_path / "r", "-q")
    finally:
        os.chdir(cwd)
    assert result.exit_code == EXIT_OK, result.output
    assert result.output.count("PASS ") == len(data["cases"])
    assert {m["backend"]["now"] for m in json.loads((tmp_path / "r" / "verification.json").read_text())
            ["models"].values()} == {"onnxruntime"}
