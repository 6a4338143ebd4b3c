"""The bundled demo experts (models.yaml, examples/) are small, pinned and good enough.

Runs the real CLI over examples/images and scores its outputs against
examples/ground_truth (docs/demo.md defines the metrics):
  * binary segmentation: per image, IoU of the foreground (1.0 when both are empty),
    averaged over the images;
  * multi-class segmentation: per image, the mean over non-background classes of the
    per-class IoU (same convention), averaged over the images;
  * severity: share of images whose grade is within +-1 of the true grade.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from legitseg.manifest.spec import load_manifest

REPO = Path(__file__).resolve().parent.parent
IMAGES = REPO / "examples" / "images"
TRUTH = REPO / "examples" / "ground_truth"
MAX_WEIGHTS_BYTES = 12_000_000
MIN_IOU = 0.80
MIN_WITHIN_ONE_GRADE = 0.80


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    union = np.logical_or(pred, truth).sum()
    return 1.0 if union == 0 else float(np.logical_and(pred, truth).sum() / union)


def mask_score(pred: np.ndarray, truth: np.ndarray, classes: int) -> float:
    return float(np.mean([iou(pred == c, truth == c) for c in range(1, max(2, classes))]))


@pytest.fixture(scope="module")
def manifest():
    return load_manifest(REPO / "models.yaml")


@pytest.fixture(scope="module")
def images() -> list[Path]:
    found = sorted(p for p in IMAGES.iterdir() if p.is_file())
    assert len(found) >= 10
    return found


def test_weights_are_small_and_pinned(manifest):
    total = 0
    for spec in manifest.models.values():
        assert spec.weights.suffix == ".safetensors"
        data = spec.weights.read_bytes()
        total += len(data)
        assert hashlib.sha256(data).hexdigest() == spec.sha256, spec.name
    assert total <= MAX_WEIGHTS_BYTES, f"demo weights take {total} bytes"


def test_examples_have_ground_truth(manifest, images):
    grades = ground_truth_grades()
    suffixes = {p.suffix.lower() for p in images}
    assert {".jpg", ".png", ".tif", ".webp"} <= suffixes
    for image in images:
        assert image.name in grades
        with Image.open(image) as im:
            size = im.size
        assert size[0] % 32 or size[1] % 32, f"{image.name} is {size}: a side must not be a multiple of 32"
        for spec in manifest.models.values():
            if spec.task == "segmentation":
                truth = np.array(Image.open(TRUTH / spec.name / f"{image.stem}.png"))
                assert truth.shape == (size[1], size[0]) and truth.dtype == np.uint8
                assert truth.max() < max(2, spec.classes)


def ground_truth_grades() -> dict[str, int]:
    with open(TRUTH / "severity.csv", newline="") as f:
        return {row["image"]: int(row["grade"]) for row in csv.DictReader(f)}


@pytest.fixture(scope="module")
def cli_out(tmp_path_factory) -> Path:
    """`legitseg run examples/images -m models.yaml` as `make demo` runs it (shared with the
    evaluate and report tests)."""
    from tests.conftest_demo import run_demo

    return run_demo(tmp_path_factory)


@pytest.fixture(scope="module")
def rows(cli_out) -> list[dict]:
    with open(cli_out / "scores.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.mark.slow
def test_cli_covers_every_image_and_model(manifest, images, rows):
    got = {(Path(r["image"]).name, r["model"]): r["status"] for r in rows}
    want = {(p.name, name): "ok" for p in images for name in manifest.models}
    assert got == want


@pytest.mark.slow
@pytest.mark.parametrize("model", ["erythema_segmenter", "lesion_segmenter"])
def test_segmentation_quality(model, manifest, images, cli_out):
    spec = manifest.models[model]
    scores = {}
    for image in images:
        pred = np.array(Image.open(cli_out / "masks" / model / f"{image.name}.png"))
        truth = np.array(Image.open(TRUTH / model / f"{image.stem}.png"))
        assert pred.shape == truth.shape, image.name
        scores[image.name] = mask_score(pred, truth, spec.classes)
    mean = float(np.mean(list(scores.values())))
    assert mean >= MIN_IOU, f"{model}: mean IoU {mean:.3f} < {MIN_IOU}; per image {scores}"


@pytest.mark.slow
def test_severity_quality(images, rows):
    truth = ground_truth_grades()
    grades = {Path(r["image"]).name: int(r["grade"]) for r in rows if r["model"] == "severity_classifier"}
    assert set(grades) == {p.name for p in images}
    within = float(np.mean([abs(grades[n] - truth[n]) <= 1 for n in grades]))
    assert within >= MIN_WITHIN_ONE_GRADE, f"grade within +-1 on {within:.0%}: predicted {grades}, truth {truth}"
