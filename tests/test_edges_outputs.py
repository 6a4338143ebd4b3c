"""Issue 23 at the edges of the outputs: unique labels (1), overlay colours per record (8),
provenance per model entry (9), the OUT of an empty run (10), bidi-isolated names and tile
fields (low). Tests are named by the issue's item."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from legitseg.errors import EXIT_INTEGRITY
from legitseg.manifest import load_manifest
from tests.conftest import invoke_cli
from tests.images import picture, save

MAIN = Path("/work/main")
SHA = "9f2c" + "0" * 60


def manifest_text(root: Path, **fields) -> Path:
    (root / "w.safetensors").write_bytes(b"not read by the parser")
    body = {"task": "segmentation", "arch": "Unet", "encoder": "resnet18", "weights": "w.safetensors",
            "sha256": SHA, "input_size": [64, 64], **fields}
    body = {k: v for k, v in body.items() if v is not None}
    path = root / "models.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "models": {"lesion": body}}, sort_keys=False))
    return path


def check(path: Path):
    return invoke_cli("models", "check", "-m", path)


# -- item 1: labels are unique ------------------------------------------------------------
@pytest.mark.parametrize(("fields", "message"), [
    ({"classes": 3, "labels": ["background", "lesion", "lesion"]},
     "model 'lesion': labels: 'lesion' names both class 1 and class 2; every class needs its own name"),
    ({"classes": 3, "labels": ["background", "Lesion", "lesion"]},
     "model 'lesion': labels: 'lesion' names both class 1 and class 2 (as 'Lesion': names that differ "
     "only in case count as one); every class needs its own name"),
    ({"classes": 2, "labels": ["background", "Background"]},
     "labels: 'Background' names both class 0 and class 1"),
    ({"task": "severity", "arch": None, "classes": 3, "labels": ["mild", "severe", "mild "]},
     "labels: 'mild ' names both class 0 and class 2"),
])
def test_item1_repeated_labels_are_a_manifest_error(tmp_path, fields, message):
    path = manifest_text(tmp_path, **fields)
    r = check(path)
    assert r.returncode == EXIT_INTEGRITY, r.stdout + r.stderr
    assert message in r.stderr and str(path) in r.stderr
    assert r.stderr.count("\n") == 1  # one line


def test_item1_a_binary_model_named_background_gets_no_repeated_default_label(tmp_path):
    """Default labels of a binary model are [background, <model name>]: a model called
    `background` would name class 1 like class 0."""
    (tmp_path / "w.safetensors").write_bytes(b"x")
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "models": {"background": {
        "task": "segmentation", "arch": "Unet", "encoder": "resnet18", "weights": "w.safetensors",
        "sha256": SHA, "input_size": [64, 64]}}}))
    r = check(path)
    assert r.returncode == EXIT_INTEGRITY
    assert "model 'background': labels: the default name of class 1 is the model name 'background'" in r.stderr
    path.write_text(path.read_text().replace("task: segmentation", "task: segmentation\n    labels: [bg, background]"))
    assert load_manifest(path).models["background"].label_names == ("bg", "background")


def test_item1_every_class_keeps_its_area_in_records_and_scores(kit, tmp_path):
    """With unique names, a three-class model's record and scores.csv hold both drawn classes."""
    kit.add("multi", classes=3, labels=["background", "lesion", "Lesion_b"], seed=4)
    kit.models["multi"]["labels"] = ["background", "lesion", "lesion"]
    manifest = kit.write()
    photos = tmp_path / "photos"
    save(photos / "a.png", picture(48, 64, seed=1))
    out = tmp_path / "out"
    r = invoke_cli("run", photos, "-m", manifest, "-o", out, "--device", "cpu")
    assert r.returncode == EXIT_INTEGRITY and "'lesion' names both class 1 and class 2" in r.stderr
    assert not out.exists()
    kit.models["multi"]["labels"] = ["background", "lesion", "Lesion_b"]
    manifest = kit.write()
    r = invoke_cli("run", photos, "-m", manifest, "-o", out, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    entry = json.loads((out / "records" / "a.png.json").read_text())["models"]["multi"]
    mask = cv2.imread(str(out / entry["mask"]), cv2.IMREAD_UNCHANGED)
    want = {name: float(np.mean(mask == c)) for c, name in ((1, "lesion"), (2, "Lesion_b"))}
    assert entry["area_fraction"].keys() == want.keys()
    assert entry["area_fraction"] == pytest.approx(want)


# -- low: tile fields ---------------------------------------------------------------------
@pytest.mark.parametrize(("fields", "message"), [
    ({"resize": "tile", "tile_size": 64, "input_size": [64, 64]},
     "model 'lesion': field 'input_size' does not apply to resize 'tile'"),
    ({"resize": "tile", "tile_size": 0, "input_size": None},
     "model 'lesion', field 'tile_size': tile_size 0 is out of range: one number or [height, width], each 8..16384"),
    ({"resize": "tile", "tile_size": [64, 99999], "input_size": None},
     "model 'lesion', field 'tile_size': tile_size [64, 99999] is out of range"),
])
def test_low_tile_fields_are_refused_by_name(tmp_path, fields, message):
    r = check(manifest_text(tmp_path, **fields))
    assert r.returncode == EXIT_INTEGRITY, r.stdout + r.stderr
    assert message in r.stderr and r.stderr.count("\n") == 1
    assert "tile_size.1" not in r.stderr and "tile_size.0" not in r.stderr


def test_low_tile_size_one_number_still_means_a_square(tmp_path):
    spec = load_manifest(manifest_text(tmp_path, resize="tile", tile_size=96, input_size=None)).models["lesion"]
    assert spec.tile_size == (96, 96)
