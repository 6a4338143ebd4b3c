"""Score the outputs of a run (OUT) against ground truth: the core of `legitseg evaluate`.

Segmentation: per image, model and non-background class, the pixel counts TP/FP/FN of
the predicted mask against a label map, and from them Dice, IoU, precision and recall.
Severity: predicted grade against a CSV of true grades (MAE, RMSE, confusion matrix).

Conventions (docs/evaluate.md is the user's statement of them):
  * a class absent from both prediction and truth in an image has no Dice/IoU (NaN,
    excluded from means and counted as `empty_both`), as nnU-Net does;
  * ground truth of another size than the prediction is an error for that image
    (never resized);
  * binary label maps may hold 0/1 or 0/255;
  * ground truth without a usable prediction is a `missing` entry, listed, not dropped.
Reads records as `records.ImageRecord`s (unknown fields are kept aside, never needed).
No printing; no torch.
"""

from __future__ import annotations

import csv
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image

from legitseg.errors import ImageError, UsageError
from legitseg.records import ImageRecord, ModelEntry
from legitseg.writers import scan_records

log = logging.getLogger(__name__)

SEVERITY_CSV = "severity.csv"
METRICS = ("dice", "iou", "precision", "recall")


# -- metrics --------------------------------------------------------------------------
def _ratio(num: float, den: float) -> float:
    return num / den if den else math.nan


@dataclass(frozen=True)
class ClassScore:
    """Pixel counts of one class in one image; the metrics derive from them."""

    image: str
    model: str
    label: str
    tp: int
    fp: int
    fn: int

    @property
    def dice(self) -> float:
        return _ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn)

    @property
    def iou(self) -> float:
        return _ratio(self.tp, self.tp + self.fp + self.fn)

    @property
    def precision(self) -> float:
        return _ratio(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> float:
        return _ratio(self.tp, self.tp + self.fn)

    @property
    def empty_both(self) -> bool:
        return self.tp + self.fp + self.fn == 0


def class_counts(pred: np.ndarray, truth: np.ndarray, classes: int) -> list[tuple[int, int, int]]:
    """(tp, fp, fn) for classes 1..classes-1 of two label maps of equal shape."""
    if pred.shape != truth.shape:
        raise ValueError(f"shapes differ: {pred.shape} vs {truth.shape}")
    k = max(classes, int(pred.max(initial=0)) + 1, int(truth.max(initial=0)) + 1)
    cm = np.bincount(truth.astype(np.int64).ravel() * k + pred.astype(np.int64).ravel(),
                     minlength=k * k).reshape(k, k)  # rows: truth, columns: prediction
    out = []
    for c in range(1, classes):
        tp = int(cm[c, c])
        out.append((tp, int(cm[:, c].sum()) - tp, int(cm[c, :].sum()) - tp))
    return out


def summarize(values: list[float]) -> dict[str, Any]:
    """mean/std/median/min/max over the finite values, with n and the NaN count."""
    finite = np.array([v for v in values if not math.isnan(v)], dtype=np.float64)
    stats: dict[str, Any] = {"n": int(finite.size), "undefined": len(values) - int(finite.size)}
    for name, fn in (("mean", np.mean), ("std", np.std), ("median", np.median),
                     ("min", np.min), ("max", np.max)):
        stats[name] = float(fn(finite)) if finite.size else None
    return stats


# -- ground truth ---------------------------------------------------------------------
def read_label_map(path: Path, classes: int, size: tuple[int, int]) -> np.ndarray:
    """A ground-truth PNG as class indices of shape `size` (H, W). Raises ImageError."""
    try:
        with Image.open(path) as im:
            arr = np.asarray(im)
    except (OSError, ValueError) as err:
        raise ImageError(f"ground truth {path} cannot be read: {err}") from err
    if arr.ndim == 3:
        if arr.shape[2] >= 3 and not (np.array_equal(arr[..., 0], arr[..., 1])
                                      and np.array_equal(arr[..., 0], arr[..., 2])):
            raise ImageError(f"ground truth {path} is a colour image; expected a single-channel label map")
        arr = arr[..., 0]
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if arr.shape != tuple(size):
        h, w = size
        hint = " (rotated? masks are upright, EXIF orientation applied)" if arr.shape == (w, h) else ""
        raise ImageError(f"ground truth {path} is {arr.shape[1]}x{arr.shape[0]} but the prediction "
                         f"is {w}x{h} (width x height){hint}; it is not resized")
    values = np.unique(arr)
    if classes == 2 and set(values.tolist()) <= {0, 255}:
        return (arr == 255).astype(np.uint8)
    if values.size and (values.min() < 0 or values.max() >= classes):
        bad = [int(v) for v in values if v < 0 or v >= classes][:5]
        raise ImageError(f"ground truth {path} holds values {bad} outside 0..{classes - 1}"
                         + (" (binary maps may hold 0/1 or 0/255)" if classes == 2 else ""))
    return arr


def _truth_files(folder: Path) -> dict[str, Path]:
    """Label maps under one model folder, keyed by their path without `.png`."""
    return {p.relative_to(folder).as_posix()[:-4]: p
            for p in sorted(folder.rglob("*.png")) if p.is_file()}


def _strip_suffix(name: str) -> str:
    p = PurePosixPath(name)
    return str(p.with_suffix("")) if p.suffix else name


# -- evaluation -----------------------------------------------------------------------
@dataclass
class ModelEvaluation:
    model: str
    task: str
    labels: list[str] = field(default_factory=list)
    scores: list[ClassScore] = field(default_factory=list)
    grades: list[tuple[str, int, int, float | None]] = field(default_factory=list)  # image, true, pred, score
    grade_classes: int = 0
    missing: list[tuple[str, str]] = field(default_factory=list)   # ground truth without prediction
    errors: list[tuple[str, str]] = field(default_factory=list)    # unusable pairs
    no_truth: list[str] = field(default_factory=list)              # predictions without ground truth
    weights_sha256: set[str] = field(default_factory=set)

    def class_summary(self) -> dict[str, dict[str, Any]]:
        out = {}
        for label in self.labels:
            rows = [s for s in self.scores if s.label == label]
            out[label] = {m: summarize([getattr(s, m) for s in rows]) for m in METRICS}
            out[label]["empty_both"] = sum(s.empty_both for s in rows)
        return out

    def mean(self) -> dict[str, float | None]:
        """Macro mean: the mean over classes of each class's mean over images."""
        summary = self.class_summary()
        out = {}
        for m in METRICS:
            means = [summary[label][m]["mean"] for label in self.labels]
            means = [v for v in means if v is not None]
            out[m] = float(np.mean(means)) if means else None
        return out

    def per_image(self) -> dict[str, dict[str, float | None]]:
        """Per image, the mean over its classes with a defined value."""
        by_image: dict[str, list[ClassScore]] = {}
        for s in self.scores:
            by_image.setdefault(s.image, []).append(s)
        out = {}
        for image, rows in by_image.items():
            out[image] = {}
            for m in METRICS:
                vals = [getattr(s, m) for s in rows if not math.isnan(getattr(s, m))]
                out[image][m] = float(np.mean(vals)) if vals else None
        return out

    def severity(self) -> dict[str, Any]:
        if not self.grades:
            return {"n": 0, "mae": None, "rmse": None, "exact": None, "within_one": None,
                    "confusion": []}
        diff = np.array([p - t for _, t, p, _ in self.grades], dtype=np.float64)
        k = max([self.grade_classes] + [max(t, p) + 1 for _, t, p, _ in self.grades])
        cm = np.zeros((k, k), dtype=np.int64)  # rows: true grade, columns: predicted grade
        for _, t, p, _ in self.grades:
            cm[t, p] += 1
        return {"n": len(self.grades), "mae": float(np.abs(diff).mean()),
                "rmse": float(np.sqrt((diff ** 2).mean())),
                "exact": float((diff == 0).mean()), "within_one": float((np.abs(diff) <= 1).mean()),
                "confusion": cm.tolist()}


def _entry_ok(record: ImageRecord, model: str) -> tuple[ModelEntry | None, str | None]:
    entry = record.models.get(model)
    if entry is None:
        return None, "the model did not run on this image"
    if not entry.ok:
        return None, f"prediction failed: {entry.error or record.error or 'no reason recorded'}"
    return entry, None


def _ran_ok(record: ImageRecord, model: str) -> bool:
    entry = record.models.get(model)
    return entry is not None and entry.ok


def _evaluate_segmentation(out: Path, records: list[ImageRecord], model: str, folder: Path) -> ModelEvaluation:
    ev = ModelEvaluation(model, "segmentation")
    truth = _truth_files(folder)
    used: set[str] = set()
    stems = Counter(_strip_suffix(r.name) for r in records)
    for record in records:
        name = record.name
        key = name if name in truth else _strip_suffix(name) if _strip_suffix(name) in truth else None
        if key is None:
            if _ran_ok(record, model):
                ev.no_truth.append(name)
            continue
        used.add(key)
        if key != name and stems[key] > 1:
            ev.errors.append((name, f"ground truth {truth[key]} matches several images; "
                                    f"name it {name}.png"))
            continue
        entry, why = _entry_ok(record, model)
        if entry is None:
            ev.missing.append((name, why))
            continue
        labels = list((entry.area_fraction or {}).keys())
        if not labels:
            ev.errors.append((name, "the record has no area_fraction, so its labels are unknown"))
            continue
        if not ev.labels:
            ev.labels = labels
        elif labels != ev.labels:
            ev.errors.append((name, f"labels {labels} differ from {ev.labels} of earlier images"))
            continue
        if not entry.mask:
            ev.missing.append((name, "the record names no mask"))
            continue
        mask_file = out / entry.mask
        try:
            with Image.open(mask_file) as im:
                pred = np.asarray(im)
        except (OSError, ValueError) as err:
            ev.missing.append((name, f"mask {mask_file} cannot be read: {err}"))
            continue
        try:
            gt = read_label_map(truth[key], len(labels) + 1, pred.shape[:2])
        except ImageError as err:
            ev.errors.append((name, str(err)))
            continue
        if entry.weights_sha256:
            ev.weights_sha256.add(entry.weights_sha256)
        for label, (tp, fp, fn) in zip(labels, class_counts(pred, gt, len(labels) + 1), strict=True):
            ev.scores.append(ClassScore(name, model, label, tp, fp, fn))
    for key in sorted(set(truth) - used):
        ev.missing.append((key, f"no image in OUT for ground truth {truth[key]}"))
    return ev


def read_grades(path: Path) -> dict[str, int]:
    """`image,grade` rows of a severity CSV. Raises UsageError naming the file and line."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"image", "grade"} <= set(reader.fieldnames):
                raise UsageError(f"{path}: needs the columns image,grade; found {reader.fieldnames}")
            grades: dict[str, int] = {}
            for line, row in enumerate(reader, 2):
                image, grade = (row.get("image") or "").strip(), (row.get("grade") or "").strip()
                if not grade.isdigit():
                    raise UsageError(f"{path}:{line}: grade {grade!r} of {image!r} is not a whole number >= 0")
                if image in grades:
                    raise UsageError(f"{path}:{line}: image {image!r} is listed twice")
                grades[image] = int(grade)
    except OSError as err:
        raise UsageError(f"cannot read severity ground truth {path}: {err.strerror or err}") from err
    return grades


def _evaluate_severity(records: list[ImageRecord], model: str, grades: dict[str, int]) -> ModelEvaluation:
    ev = ModelEvaluation(model, "severity")
    used: set[str] = set()
    for record in records:
        name = record.name
        key = name if name in grades else record.image if record.image in grades else None
        if key is None:
            if _ran_ok(record, model):
                ev.no_truth.append(name)
            continue
        used.add(key)
        entry, why = _entry_ok(record, model)
        if entry is None or not isinstance(entry.grade, int):
            ev.missing.append((name, why or "the record has no grade"))
            continue
        ev.grade_classes = max(ev.grade_classes, len(entry.probabilities or []))
        ev.grades.append((name, grades[key], entry.grade, entry.score))
        if entry.weights_sha256:
            ev.weights_sha256.add(entry.weights_sha256)
    for key in sorted(set(grades) - used):
        ev.missing.append((key, "no image in OUT for this row of the severity CSV"))
    return ev


@dataclass
class Evaluation:
    out: Path
    truth: Path
    models: dict[str, ModelEvaluation]
    images: int

    @property
    def problems(self) -> int:
        return sum(len(m.missing) + len(m.errors) for m in self.models.values())


def evaluate(out: Path, truth: Path, models: list[str] | None = None,
             severity_csv: Path | None = None) -> Evaluation:
    """Score OUT against the ground-truth folder. Raises UsageError when nothing can be scored.

    `truth/<model>/` holds label maps for segmentation models; severity models are scored
    against `truth/<model>.csv` if present, else `severity_csv` or `truth/severity.csv`.
    """
    if not out.is_dir() or not (out / "records").is_dir():
        raise UsageError(f"{out} is not a legitseg output folder (no records/ folder in it)")
    if not truth.is_dir():
        raise UsageError(f"ground truth folder {truth} does not exist or is not a folder")
    if severity_csv is not None and not severity_csv.is_file():
        raise UsageError(f"severity ground truth {severity_csv} does not exist")
    records = scan_records(out).records
    tasks: dict[str, str] = {}
    for record in records:
        for model, entry in record.models.items():
            if entry.task in ("segmentation", "severity"):
                tasks.setdefault(model, entry.task)
    if models:
        unknown = [m for m in models if m not in tasks]
        if unknown:
            raise UsageError(f"model(s) {', '.join(unknown)} not found in the records of {out}; "
                             f"found: {', '.join(sorted(tasks)) or 'none'}")
        tasks = {m: tasks[m] for m in models}
    result: dict[str, ModelEvaluation] = {}
    default_csv = severity_csv or truth / SEVERITY_CSV
    for model, task in tasks.items():
        if task == "segmentation" and (truth / model).is_dir():
            result[model] = _evaluate_segmentation(out, records, model, truth / model)
        elif task == "severity":
            csv_path = truth / f"{model}.csv"
            csv_path = csv_path if csv_path.is_file() else default_csv
            if csv_path.is_file():
                result[model] = _evaluate_severity(records, model, read_grades(csv_path))
        if model not in result:
            log.warning("%s: no ground truth for model %s in %s; not evaluated", truth, model, task)
    if not result:
        raise UsageError(f"nothing to evaluate: {truth} has no folder named after a segmentation "
                         f"model ({', '.join(m for m, t in tasks.items() if t == 'segmentation') or 'none'}) "
                         f"and no severity CSV")
    return Evaluation(out, truth, result, len(records))
