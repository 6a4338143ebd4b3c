"""Write an Evaluation: segmentation.csv, severity.csv, evaluation.json and PNG plots.

Every file is written atomically; NaN never reaches JSON (it becomes null) or CSV (an
empty cell). Plots use matplotlib's Agg renderer through Figure objects (no pyplot
state, no display).
"""

from __future__ import annotations

import csv
import io
import json
import math
from datetime import datetime
from pathlib import Path
from typing import Any

from legitseg import __version__
from legitseg.evaluate import METRICS, Evaluation
from legitseg.writers import atomic_write

SEGMENTATION_FIELDS = ["image", "model", "label", *METRICS, "tp", "fp", "fn"]
SEVERITY_FIELDS = ["image", "model", "true_grade", "predicted_grade", "error", "score"]


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def to_json(ev: Evaluation) -> dict[str, Any]:
    """The whole evaluation as plain JSON data (no NaN)."""
    run: dict[str, Any] = {}
    try:
        run = json.loads((ev.out / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass  # an OUT without run.json is still scored; provenance then comes from records
    models: dict[str, Any] = {}
    for name, m in ev.models.items():
        entry: dict[str, Any] = {
            "task": m.task,
            "weights_sha256": sorted(m.weights_sha256),
            "missing": [{"image": i, "reason": r} for i, r in m.missing],
            "errors": [{"image": i, "error": r} for i, r in m.errors],
            "no_ground_truth": m.no_truth,
        }
        if m.task == "segmentation":
            entry.update(labels=m.labels, images=len({s.image for s in m.scores}),
                         mean=m.mean(), classes=m.class_summary(), per_image=m.per_image())
        else:
            entry.update(m.severity(), grades=[
                {"image": i, "true_grade": t, "predicted_grade": p, "score": s}
                for i, t, p, s in m.grades])
        models[name] = entry
    return _finite({
        "legitseg": __version__,
        "created": datetime.now().astimezone().isoformat(timespec="seconds"),
        "out": str(ev.out.resolve()),
        "ground_truth": str(ev.truth.resolve()),
        "run": {k: run.get(k) for k in ("started", "ended", "manifest", "versions") if k in run},
        "records": ev.images,
        "conventions": {
            "empty_both": "class absent from prediction and ground truth: Dice/IoU undefined "
                          "(null), excluded from means, counted as empty_both",
            "mean": "mean over classes of each class's mean over images",
            "size_mismatch": "error for that image; ground truth is never resized",
        },
        "models": models,
    })


def _cell(value: Any) -> Any:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _csv(rows: list[dict[str, Any]], fields: list[str]) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(v) for k, v in row.items()})
    return buf.getvalue().encode()


def write_evaluation(ev: Evaluation, dest: Path, plots: bool = True) -> list[Path]:
    """Write the files under `dest`; return their paths. Raises RuntimeFailure on I/O errors."""
    written = []
    seg = [m for m in ev.models.values() if m.task == "segmentation"]
    sev = [m for m in ev.models.values() if m.task == "severity"]
    if seg:
        rows = [{"image": s.image, "model": s.model, "label": s.label,
                 **{k: getattr(s, k) for k in METRICS}, "tp": s.tp, "fp": s.fp, "fn": s.fn}
                for m in seg for s in m.scores]
        written.append(_write(dest / "segmentation.csv", _csv(rows, SEGMENTATION_FIELDS)))
    if sev:
        rows = [{"image": i, "model": m.model, "true_grade": t, "predicted_grade": p,
                 "error": p - t, "score": s} for m in sev for i, t, p, s in m.grades]
        written.append(_write(dest / "severity.csv", _csv(rows, SEVERITY_FIELDS)))
    data = json.dumps(to_json(ev), indent=1, allow_nan=False) + "\n"
    written.append(_write(dest / "evaluation.json", data.encode()))
    if plots:
        if any(m.scores for m in seg):
            written.append(_write(dest / "dice_boxplot.png", dice_boxplot(seg)))
        for m in sev:
            if m.grades:
                written.append(_write(dest / f"severity_confusion_{m.model}.png", confusion_plot(m)))
    return written


def _write(path: Path, data: bytes) -> Path:
    atomic_write(path, data)
    return path


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return buf.getvalue()


def dice_boxplot(models) -> bytes:
    """One box per (model, class) of the per-image Dice values (undefined ones left out)."""
    from matplotlib.figure import Figure

    series, names = [], []
    for m in models:
        for label in m.labels:
            series.append([s.dice for s in m.scores if s.label == label and not s.empty_both])
            names.append(f"{m.model}\n{label}")
    fig = Figure(figsize=(max(4.0, 1.6 * len(series)), 4.5), layout="constrained")
    ax = fig.subplots()
    ax.boxplot(series, tick_labels=names, showmeans=True)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("Dice per image")
    ax.set_title("Dice per class")
    ax.grid(axis="y", alpha=0.3)
    ax.tick_params(axis="x", labelsize=8)
    return _png(fig)


def confusion_plot(m) -> bytes:
    """Counts of (true grade, predicted grade), true grades as rows."""
    from matplotlib.figure import Figure

    cm = m.severity()["confusion"]
    k = len(cm)
    fig = Figure(figsize=(1.5 + 0.5 * k, 1.2 + 0.5 * k), layout="constrained")
    ax = fig.subplots()
    ax.imshow(cm, cmap="Blues")
    top = max(max(row) for row in cm) or 1
    for t in range(k):
        for p in range(k):
            if cm[t][p]:
                ax.text(p, t, str(cm[t][p]), ha="center", va="center",
                        color="white" if cm[t][p] > top / 2 else "black", fontsize=8)
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xlabel("predicted grade")
    ax.set_ylabel("true grade")
    ax.set_title(f"{m.model} (n={len(m.grades)})")
    return _png(fig)
