"""Quality of the bundled demo experts on examples/images (docs/demo.md).

    python tools/demo_eval.py            # in-process inference with SPEC section 4 semantics
    python tools/demo_eval.py --out OUT  # score the outputs of `legitseg run examples/images -o OUT`

Metrics (the same definitions as tests/test_demo_quality.py):
  * binary segmentation: per image, IoU of the foreground (1.0 when prediction and
    ground truth are both empty); reported as the mean over images;
  * multi-class segmentation: per image, the mean over non-background classes of the
    per-class IoU (same empty convention); reported as the mean over images;
  * severity: share of images whose predicted grade is within +-1 of the true grade.

Not part of the installed package; imports legitseg only to build the models.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp"}
INTERPOLATION = {"linear": cv2.INTER_LINEAR, "area": cv2.INTER_AREA, "cubic": cv2.INTER_CUBIC, "nearest": cv2.INTER_NEAREST}


# -- metrics ----------------------------------------------------------------------------


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    union = np.logical_or(pred, truth).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(pred, truth).sum() / union)


def mask_score(pred: np.ndarray, truth: np.ndarray, classes: int) -> float:
    """Foreground IoU (binary) or mean IoU over non-background classes (multi-class)."""
    if pred.shape != truth.shape:
        raise ValueError(f"mask shape {pred.shape} differs from ground truth {truth.shape}")
    fg = range(1, max(2, classes))
    return float(np.mean([iou(pred == c, truth == c) for c in fg]))


def example_images(root: Path = ROOT) -> list[Path]:
    folder = root / "examples" / "images"
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def ground_truth_mask(root: Path, model: str, image: Path) -> np.ndarray:
    return np.array(Image.open(root / "examples" / "ground_truth" / model / f"{image.stem}.png"))


def ground_truth_grades(root: Path = ROOT) -> dict[str, int]:
    with open(root / "examples" / "ground_truth" / "severity.csv", newline="") as f:
        return {row["image"]: int(row["grade"]) for row in csv.DictReader(f)}


# -- in-process inference (SPEC section 4, stretch resize only) ------------------------


def decode(path: Path) -> np.ndarray:
    """8-bit RGB with EXIF orientation applied (enough for the bundled 8-bit examples)."""
    bgr = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"cannot decode {path}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def preprocess(image: np.ndarray, size: tuple[int, int], mean, std, interpolation: str = "linear"):
    import torch

    h, w = size
    x = cv2.resize(image, (w, h), interpolation=INTERPOLATION[interpolation]).astype(np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]


def predict(loaded, image: np.ndarray):
    """Mask (H, W) uint8 for segmentation, (grade, score) for severity.

    `loaded` needs .spec, .module (in eval mode), .mean and .std, like legitseg's LoadedModel.
    """
    import torch
    import torch.nn.functional as F

    spec = loaded.spec
    x = preprocess(image, spec.input_size, loaded.mean, loaded.std, spec.interpolation)
    with torch.inference_mode():
        logits = loaded.module(x).float()
    if spec.task == "severity":
        p = torch.softmax(logits / spec.temperature, dim=1)[0]
        return int(p.argmax()), float((p * torch.tensor(spec.values)).sum())
    logits = F.interpolate(logits, size=image.shape[:2], mode="bilinear", align_corners=False)[0]
    if spec.classes == 1:
        return (torch.sigmoid(logits[0]) > spec.threshold).numpy().astype(np.uint8)
    return torch.softmax(logits, 0).argmax(0).numpy().astype(np.uint8)


def predictions_in_process(root: Path = ROOT):
    """{model: {image name: mask or grade}} for every model of root/models.yaml."""
    from legitseg.manifest.spec import load_manifest
    from legitseg.models.factory import load_model

    manifest = load_manifest(root / "models.yaml")
    images = example_images(root)
    decoded = {p.name: decode(p) for p in images}
    out: dict[str, dict] = {}
    for spec in manifest.models.values():
        loaded = load_model(spec)
        out[spec.name] = {}
        for name, image in decoded.items():
            result = predict(loaded, image)
            out[spec.name][name] = result[0] if spec.task == "severity" else result
    return manifest, out


def predictions_from_cli(out_dir: Path, root: Path = ROOT):
    """The same structure read from a `legitseg run` output folder."""
    from legitseg.manifest.spec import load_manifest

    manifest = load_manifest(root / "models.yaml")
    out: dict[str, dict] = {name: {} for name in manifest.models}
    with open(out_dir / "scores.jsonl") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    for row in rows:
        spec = manifest.models[row["model"]]
        name = Path(row["image"]).name
        if row["status"] != "ok":
            continue
        if spec.task == "severity":
            out[spec.name][name] = int(row["grade"])
        else:
            out[spec.name][name] = np.array(Image.open(out_dir / "masks" / spec.name / f"{name}.png"))
    return manifest, out


def report(manifest, predictions, root: Path = ROOT) -> dict[str, float]:
    """Print per-image and per-model quality; return {model: metric}."""
    truth_grades = ground_truth_grades(root)
    images = example_images(root)
    results = {}
    for spec in manifest.models.values():
        preds = predictions[spec.name]
        if spec.task == "severity":
            diffs = {p.name: preds[p.name] - truth_grades[p.name] for p in images if p.name in preds}
            within = float(np.mean([abs(d) <= 1 for d in diffs.values()])) if diffs else 0.0
            exact = float(np.mean([d == 0 for d in diffs.values()])) if diffs else 0.0
            detail = " ".join(f"{n.split('.')[0]}:{truth_grades[n]}->{preds[n]}" for n in diffs)
            print(f"{spec.name:22s} grade within +-1: {within:.3f}  exact: {exact:.3f}  ({len(diffs)} images)")
            print(f"    {detail}")
            results[spec.name] = within
        else:
            scores = {
                p.name: mask_score(preds[p.name], ground_truth_mask(root, spec.name, p), spec.classes)
                for p in images
                if p.name in preds
            }
            mean = float(np.mean(list(scores.values()))) if scores else 0.0
            kind = "foreground IoU" if spec.classes == 1 else "mean non-background IoU"
            print(f"{spec.name:22s} {kind}: {mean:.3f}  (min {min(scores.values()):.3f}, {len(scores)} images)")
            print("    " + " ".join(f"{n.split('.')[0]}:{s:.2f}" for n, s in scores.items()))
            results[spec.name] = mean
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="score this `legitseg run` output folder instead")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if args.out:
        manifest, preds = predictions_from_cli(args.out)
    else:
        manifest, preds = predictions_in_process()
    report(manifest, preds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
