"""Statistics beside the means of `legitseg evaluate` (docs/evaluate.md): per-image failure
rate, bootstrap confidence intervals, uncertainty against failure (AUROC, risk-coverage),
and subgroups from a metadata CSV (`evaluate.subgroups`).

Everything is a pure function of the scored pairs of a `ModelEvaluation` and the options;
the resampling uses one recorded seed, so two evaluations of the same OUT give the same
numbers. No printing; no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

# `scoring.ModelEvaluation` (scoring imports this module for StatsOptions, so not imported back).
ModelEvaluation = Any

FAIL_BELOW = 0.65  # the ISIC 2018 rule: an image with IoU below it failed
SEVERITY_FAIL = 2  # a grade off by 2 or more failed
RESAMPLES = 2000
SEED = 20180601
CONFIDENCE = 0.95
_CHUNK = 200  # resamples drawn at once: memory is CHUNK x images x classes, whatever RESAMPLES
# Record keys of the uncertainty block that are settings, not measures.
NOT_MEASURES = ("band_width", "members")


@dataclass(frozen=True)
class StatsOptions:
    """How `evaluate` computes its statistics; written into evaluation.json as given."""

    fail_below: float = FAIL_BELOW
    seed: int = SEED
    resamples: int = RESAMPLES
    confidence: float = CONFIDENCE
    metadata: Any = None  # subgroups.Metadata, when --metadata was given
    by: tuple[str, ...] = field(default_factory=tuple)

    def to_json(self) -> dict[str, Any]:
        return {"fail_below": self.fail_below, "severity_fail_at_error": SEVERITY_FAIL,
                "bootstrap": {"resamples": self.resamples, "seed": self.seed, "confidence": self.confidence,
                              "method": "percentile; images drawn with replacement"},
                "metadata": None if self.metadata is None else str(self.metadata.path), "by": list(self.by)}


# -- bootstrap -----------------------------------------------------------------------------------
def resample_indices(n: int, options: StatsOptions):
    """Chunks of the (resamples, n) image indices, drawn with numpy's default_rng(seed).

    Drawn row block by row block from one generator: the same numbers as a single
    `default_rng(seed).integers(0, n, size=(resamples, n))`.
    """
    rng = np.random.default_rng(options.seed)
    for start in range(0, options.resamples, _CHUNK):
        yield rng.integers(0, n, size=(min(_CHUNK, options.resamples - start), n))


def _interval(samples: np.ndarray, confidence: float) -> list[float | None]:
    ok = samples[np.isfinite(samples)]
    if not ok.size:
        return [None, None]
    lo, hi = np.quantile(ok, [(1 - confidence) / 2, 1 - (1 - confidence) / 2])
    return [float(lo), float(hi)]


def bootstrap(table: np.ndarray, options: StatsOptions) -> dict[str, Any]:
    """Percentile CIs of the column means (NaN cells left out) and of their mean (the macro mean)
    of an (images, columns) table. Returns {"columns": [[lo, hi], ...], "macro": [lo, hi]}."""
    n, k = table.shape
    if n == 0:
        return {"columns": [[None, None]] * k, "macro": [None, None]}
    cols, macro = [], []
    defined = np.isfinite(table)
    values = np.where(defined, table, 0.0)
    for idx in resample_indices(n, options):
        counts = defined[idx].sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            means = values[idx].sum(axis=1) / counts  # NaN where a column has no defined value
        cols.append(means)
        finite = np.isfinite(means)
        count = finite.sum(axis=1)
        macro.append(np.where(count > 0, np.where(finite, means, 0.0).sum(axis=1) / np.maximum(count, 1), np.nan))
    all_cols, all_macro = np.concatenate(cols), np.concatenate(macro)
    return {"columns": [_interval(all_cols[:, j], options.confidence) for j in range(k)],
            "macro": _interval(all_macro, options.confidence)}


def mean_ci(values: list[float] | np.ndarray, options: StatsOptions) -> dict[str, Any]:
    """{"n", "mean", "ci"} of one list of per-image values (NaN left out of the mean)."""
    v = np.asarray(values, dtype=np.float64).reshape(-1, 1)
    ok = v[np.isfinite(v)]
    return {"n": int(ok.size), "mean": float(ok.mean()) if ok.size else None,
            "ci": bootstrap(v, options)["columns"][0]}


# -- per image -----------------------------------------------------------------------------------
def segmentation_images(m: ModelEvaluation) -> tuple[list[str], np.ndarray, list[str]]:
    """Images (first-scored order), their per-class IoU and Dice tables, and the labels.

    Returns (images, table of shape (images, 2, classes): [:, 0] IoU, [:, 1] Dice; labels)."""
    images = list(dict.fromkeys(s.image for s in m.scores))
    row = {image: i for i, image in enumerate(images)}
    col = {label: j for j, label in enumerate(m.labels)}
    table = np.full((len(images), 2, len(m.labels)), np.nan)
    for s in m.scores:
        table[row[s.image], 0, col[s.label]] = s.iou
        table[row[s.image], 1, col[s.label]] = s.dice
    return images, table, list(m.labels)


def per_image_errors(m: ModelEvaluation, fail_below: float) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(images, error, failed) per scored image. Segmentation: error = 1 - IoU, the IoU being
    the image's mean over its classes with a defined IoU (images with none are left out);
    failed = IoU < fail_below. Severity: error = |predicted - true grade|, failed = error >= 2."""
    if m.task == "severity":
        names = [i for i, _, _, _ in m.grades]
        err = np.array([abs(p - t) for _, t, p, _ in m.grades], dtype=np.float64)
        return names, err, err >= SEVERITY_FAIL
    images, table, _ = segmentation_images(m)
    iou = table[:, 0]
    has = np.isfinite(iou).any(axis=1) if len(images) else np.zeros(0, bool)
    with np.errstate(invalid="ignore"):
        mean_iou = np.where(has, np.nansum(np.where(np.isfinite(iou), iou, 0), axis=1)
                            / np.maximum(np.isfinite(iou).sum(axis=1), 1), np.nan)
    keep = np.flatnonzero(has)
    return [images[i] for i in keep], 1.0 - mean_iou[keep], mean_iou[keep] < fail_below


# -- uncertainty against failure -------------------------------------------------------------------
def auroc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the ROC curve of `scores` predicting `positive` (Mann-Whitney U with mid-ranks,
    so tied scores count one half); None without both classes."""
    pos = np.asarray(positive, bool)
    n1, n0 = int(pos.sum()), int((~pos).sum())
    if n1 == 0 or n0 == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), np.float64)
    sorted_scores = np.asarray(scores, np.float64)[order]
    i = 0
    while i < len(order):  # mid-rank of each run of ties (ranks from 1)
        j = i
        while j + 1 < len(order) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def risk_coverage(scores: np.ndarray, error: np.ndarray, failed: np.ndarray,
                  names: list[str]) -> list[dict[str, Any]]:
    """Refer the most uncertain images first (ties: by image name, the later first); for each
    number referred, the coverage and the failure rate and mean error of the images kept."""
    n = len(scores)
    order = sorted(range(n), key=lambda i: (scores[i], names[i]))  # most certain first
    curve = []
    for kept in range(n, 0, -1):
        idx = order[:kept]
        curve.append({"referred": n - kept, "coverage": kept / n,
                      "failure_rate": float(np.mean(failed[idx])), "mean_error": float(np.mean(error[idx]))})
    return curve


def uncertainty_vs_failure(m: ModelEvaluation, options: StatsOptions) -> dict[str, Any]:
    """Per recorded uncertainty measure: images with a value, AUROC of predicting a failure,
    and the risk-coverage curve."""
    names, error, failed = per_image_errors(m, options.fail_below)
    measures = list(dict.fromkeys(k for u in m.uncertainty.values() for k in u if k not in NOT_MEASURES))
    out: dict[str, Any] = {}
    for measure in measures:
        idx = [i for i, name in enumerate(names)
               if isinstance(m.uncertainty.get(name, {}).get(measure), int | float)]
        if not idx:
            continue
        scores = np.array([m.uncertainty[names[i]][measure] for i in idx], dtype=np.float64)
        out[measure] = {"n": len(idx), "failures": int(failed[idx].sum()),
                        "auroc": auroc(scores, failed[idx]),
                        "risk_coverage": risk_coverage(scores, error[idx], failed[idx], [names[i] for i in idx])}
    return out


# -- the block per model ---------------------------------------------------------------------------
def metric_block(m: ModelEvaluation, options: StatsOptions, images: set[str] | None = None) -> dict[str, Any]:
    """Means with CIs and the failure rate, over all scored images or the subset `images`."""
    names, error, failed = per_image_errors(m, options.fail_below)
    sel = [i for i, name in enumerate(names) if images is None or name in images]
    block: dict[str, Any] = {"failure": {**mean_ci(failed[sel].astype(np.float64), options),
                                         "failures": int(failed[sel].sum())}}
    block["failure"]["rate"] = block["failure"].pop("mean")
    if m.task == "severity":
        err = np.array([p - t for _, t, p, _ in m.grades], dtype=np.float64)[sel]
        block["mae"] = mean_ci(np.abs(err), options)
        block["exact"] = mean_ci((err == 0).astype(np.float64), options)
        block["within_one"] = mean_ci((np.abs(err) <= 1).astype(np.float64), options)
        block["rmse"] = _rmse_ci(err, options)
        return block
    all_images, table, labels = segmentation_images(m)
    rows = [i for i, image in enumerate(all_images) if images is None or image in images]
    for j, metric in enumerate(("iou", "dice")):
        t = table[rows, j]
        ci = bootstrap(t, options)
        class_means = [float(np.nanmean(t[:, c])) if np.isfinite(t[:, c]).any() else None
                       for c in range(len(labels))]
        defined = [v for v in class_means if v is not None]
        block[metric] = {"n": len(rows), "mean": float(np.mean(defined)) if defined else None, "ci": ci["macro"],
                         "classes": {label: {"mean": class_means[c], "ci": ci["columns"][c]}
                                     for c, label in enumerate(labels)}}
    return block


def _rmse_ci(err: np.ndarray, options: StatsOptions) -> dict[str, Any]:
    if not err.size:
        return {"n": 0, "mean": None, "ci": [None, None]}
    samples = np.concatenate([np.sqrt((err[idx] ** 2).mean(axis=1)) for idx in resample_indices(err.size, options)])
    return {"n": int(err.size), "mean": float(np.sqrt((err ** 2).mean())), "ci": _interval(samples, options.confidence)}


def model_statistics(m: ModelEvaluation, options: StatsOptions) -> dict[str, Any]:
    """evaluation.json's `statistics` of one model (subgroups aside: `subgroups.subgroup_tables`)."""
    out = metric_block(m, options)
    if m.uncertainty:
        out["uncertainty_vs_failure"] = uncertainty_vs_failure(m, options)
    return out

