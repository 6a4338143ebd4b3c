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
  * ground truth without a usable prediction is a `missing` entry, listed, not dropped;
  * predictions made with different model settings are not pooled unless asked;
  * a model with ground truth but nothing scored is NothingToScore (exit 6).
Ground truth is read by `evaluate_truth`.
Reads records as `records.ImageRecord`s (unknown fields are kept aside, never needed).
No printing; no torch.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image

from legitseg.errors import ImageError, NothingToScore, UsageError
from legitseg.evaluate.stats import StatsOptions
from legitseg.evaluate.truth import (
    PIL_READ_ERRORS,
    check_grade_range,
    read_grades,
    read_label_map,
    severity_csv_for,
    truth_files,
)
from legitseg.images.sources import OUT_MARKER
from legitseg.output.records import ImageRecord, ModelEntry
from legitseg.output.writers import RECORDS, scan_records

log = logging.getLogger(__name__)

UNRECORDED = "unrecorded"  # settings key of format-1 records, which carry no settings digest
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
    truth: Path | None = None                                      # folder or CSV scored against
    settings: dict[str, list[str]] = field(default_factory=dict)  # settings digest -> images scored
    uncertainty: dict[str, dict[str, Any]] = field(default_factory=dict)  # image -> recorded measures

    def add_provenance(self, image: str, entry: ModelEntry) -> None:
        if entry.weights_sha256:
            self.weights_sha256.add(entry.weights_sha256)
        if isinstance(entry.uncertainty, dict):
            self.uncertainty[image] = entry.uncertainty
        self.settings.setdefault(entry.settings or UNRECORDED, []).append(image)

    @property
    def scored(self) -> int:
        """Images scored: pairs of a usable prediction and its ground truth."""
        return len({s.image for s in self.scores}) if self.task == "segmentation" else len(self.grades)

    def why_nothing(self) -> str:
        """Why no pair was scored, naming the model and its ground truth."""
        if self.task == "segmentation" and not (self.missing or self.errors):
            what = f"ground truth folder {self.truth} holds no label maps (.png, .tif)"
        elif self.task == "severity" and not self.missing:
            what = f"severity ground truth {self.truth} lists no images"
        else:
            what = (f"none of the ground truth in {self.truth} was paired with a usable prediction "
                    f"({len(self.missing)} missing a prediction, {len(self.errors)} not scored)")
        return f"nothing to score for model {self.model}: {what}"

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
    ev = ModelEvaluation(model, "segmentation", truth=folder)
    found = truth_files(folder)
    truth = found.files
    ev.errors.extend(found.skipped)
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
        except PIL_READ_ERRORS as err:
            ev.missing.append((name, f"mask {mask_file} cannot be read: {err}"))
            continue
        try:
            gt = read_label_map(truth[key], len(labels) + 1, pred.shape[:2])
        except ImageError as err:
            ev.errors.append((name, str(err)))
            continue
        ev.add_provenance(name, entry)
        for label, (tp, fp, fn) in zip(labels, class_counts(pred, gt, len(labels) + 1), strict=True):
            ev.scores.append(ClassScore(name, model, label, tp, fp, fn))
    for key in sorted(set(truth) - used):
        ev.missing.append((key, f"no image in OUT for ground truth {truth[key]}"))
    return ev


def _evaluate_severity(records: list[ImageRecord], model: str, csv_path: Path) -> ModelEvaluation:
    ev = ModelEvaluation(model, "severity", truth=csv_path)
    grades = read_grades(csv_path)
    entries = [r.models[model] for r in records if model in r.models]
    ev.grade_classes = max((len(e.probabilities or []) for e in entries), default=0)
    if ev.grade_classes:  # format-1 records without probabilities leave the range unknown
        check_grade_range(csv_path, grades, model, ev.grade_classes)
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
        ev.grades.append((name, grades[key].grade, entry.grade, entry.score))
        ev.add_provenance(name, entry)
    for key in sorted(set(grades) - used):
        ev.missing.append((key, "no image in OUT for this row of the severity CSV"))
    return ev


@dataclass
class Evaluation:
    out: Path
    truth: Path
    models: dict[str, ModelEvaluation]
    images: int
    adequacy: dict[str, bool] = field(default_factory=dict)  # image -> verdict of a quality: policy
    stats: StatsOptions = field(default_factory=StatsOptions)  # failure cut, bootstrap, subgroups

    @property
    def problems(self) -> int:
        return sum(len(m.missing) + len(m.errors) for m in self.models.values())

    def nothing_to_score(self) -> NothingToScore | None:
        """The error for the models with ground truth but no scored pair, if any."""
        empty = [m.why_nothing() for m in self.models.values() if not m.scored]
        return NothingToScore("; ".join(empty)) if empty else None


def _check_out(out: Path) -> None:
    # Any run writes the marker, even over an empty folder (then there is no records/);
    # older OUTs have records/ only.
    if not out.is_dir() or not ((out / OUT_MARKER).exists() or (out / RECORDS).is_dir()):
        raise UsageError(f"{out} is not a legitseg output folder (no {RECORDS}/ and no {OUT_MARKER} in it)")


def _check_settings(ev: ModelEvaluation, out: Path) -> None:
    if len(ev.settings) < 2:
        return
    groups = "; ".join(f"{digest[:12]}: {', '.join(images[:3])}"
                       + (f" and {len(images) - 3} more" if len(images) > 3 else "")
                       for digest, images in sorted(ev.settings.items()))
    raise UsageError(f"model {ev.model}: the predictions in {out} were made with {len(ev.settings)} "
                     f"different settings ({groups}); one score would pool them. Re-run the images "
                     f"with one setting, or pass --allow-mixed-settings")


def evaluate(out: Path, truth: Path, models: list[str] | None = None,
             severity_csv: Path | None = None, allow_mixed_settings: bool = False,
             stats: StatsOptions | None = None) -> Evaluation:
    """Score OUT against the ground-truth folder.

    `truth/<model>/` holds label maps for segmentation models; severity models are scored
    against `severity_csv` when given, else `truth/<model>.csv`, else `truth/severity.csv`.
    Raises UsageError for bad folders, malformed ground truth, ground truth for no model,
    or (without `allow_mixed_settings`) predictions of one model made with different
    settings; NothingToScore when OUT holds no records at all. A model with ground truth
    but no scored pair is reported by `Evaluation.nothing_to_score`.
    """
    _check_out(out)
    if not truth.is_dir():
        raise UsageError(f"ground truth folder {truth} does not exist or is not a folder")
    if severity_csv is not None and not severity_csv.is_file():
        raise UsageError(f"severity ground truth {severity_csv} does not exist")
    records = scan_records(out).records
    if not records:
        raise NothingToScore(f"nothing to score: {out} holds no image records (a run over no images?), "
                             f"so the ground truth in {truth} has nothing to pair with")
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
    for model, task in tasks.items():
        if task == "segmentation" and (truth / model).is_dir():
            result[model] = _evaluate_segmentation(out, records, model, truth / model)
        elif task == "severity":
            csv_path = severity_csv_for(truth, model, severity_csv)
            if csv_path is not None:
                result[model] = _evaluate_severity(records, model, csv_path)
        if model not in result:
            log.warning("%s: no ground truth for %s model %s; not evaluated", truth, task, model)
        elif not allow_mixed_settings:
            _check_settings(result[model], out)
    if not result:
        raise UsageError(f"nothing to evaluate: {truth} has no folder named after a segmentation "
                         f"model ({', '.join(m for m, t in tasks.items() if t == 'segmentation') or 'none'}) "
                         f"and no severity CSV")
    from legitseg.evaluate.adequacy import adequacy_of

    return Evaluation(out, truth, result, len(records), adequacy=adequacy_of(records), stats=stats or StatsOptions())
