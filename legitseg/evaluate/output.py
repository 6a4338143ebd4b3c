"""Write an Evaluation: segmentation.csv, severity.csv, evaluation.json and PNG plots.

The files are written as a set: into a temporary sibling folder, which then replaces the
destination folder, so a failure part-way (disk full) leaves the previous complete set,
never new files beside old ones. NaN never reaches JSON (it becomes null) or CSV (an
empty cell). Plots use matplotlib's Agg renderer through Figure objects (no pyplot
state, no display).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import secrets
import shutil
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from legitseg._version import __version__
from legitseg.errors import RuntimeFailure, UsageError
from legitseg.evaluate.scoring import METRICS, Evaluation
from legitseg.evaluate.stats import model_statistics
from legitseg.evaluate.subgroups import subgroup_tables
from legitseg.evaluate.uncertainty_plot import risk_coverage_plot
from legitseg.output.writers import (
    atomic_write,
    run_folder_holding,
)

log = logging.getLogger(__name__)

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
            "settings_digests": {d: images for d, images in sorted(m.settings.items())},
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
        entry["statistics"] = model_statistics(m, ev.stats)
        if ev.stats.metadata is not None and ev.stats.by:
            entry["statistics"]["subgroups"] = subgroup_tables(m, ev.stats)
        if ev.adequacy:  # only with a quality: policy, so evaluations without one stay as they were
            from legitseg.evaluate.adequacy import by_adequacy

            entry["by_adequacy"] = by_adequacy(m, ev.adequacy)
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
        "statistics": ev.stats.to_json(),
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


def _is_evaluation_file(name: str) -> bool:
    return (name in ("segmentation.csv", "severity.csv", "evaluation.json", "dice_boxplot.png")
            or (name.startswith(("severity_confusion_", "risk_coverage_")) and name.endswith(".png")))


def check_destination(out: Path, dest: Path) -> None:
    """Refuse a destination that is a file, lies inside OUT's own folders, or holds files
    that are not a previous evaluation (the set replaces the whole folder). Raises UsageError."""
    if dest.exists() and not dest.is_dir():
        raise UsageError(f"--out {dest} is a file; give a folder for the evaluation")
    owned = run_folder_holding(out, dest)
    if owned is not None:
        raise UsageError(f"--out {dest} is inside {owned}, which belongs to the run; "
                         f"give a folder outside it [default: {out / 'evaluation'}]")
    if dest.is_dir():
        others = sorted(p.name for p in dest.iterdir() if not (p.is_file() and _is_evaluation_file(p.name)))
        if others:
            raise UsageError(f"--out {dest} holds other files than an evaluation ({', '.join(others[:5])}); "
                             f"the evaluation replaces the whole folder, so give a new or empty folder")


def _contents(ev: Evaluation, plots: bool) -> Iterator[tuple[str, bytes]]:
    """(file name, bytes) of each file of the set; plots drawn one at a time."""
    seg = [m for m in ev.models.values() if m.task == "segmentation"]
    sev = [m for m in ev.models.values() if m.task == "severity"]
    if seg:
        rows = [{"image": s.image, "model": s.model, "label": s.label,
                 **{k: getattr(s, k) for k in METRICS}, "tp": s.tp, "fp": s.fp, "fn": s.fn}
                for m in seg for s in m.scores]
        yield "segmentation.csv", _csv(rows, SEGMENTATION_FIELDS)
    if sev:
        rows = [{"image": i, "model": m.model, "true_grade": t, "predicted_grade": p,
                 "error": p - t, "score": s} for m in sev for i, t, p, s in m.grades]
        yield "severity.csv", _csv(rows, SEVERITY_FIELDS)
    data = to_json(ev)
    yield "evaluation.json", (json.dumps(data, indent=1, allow_nan=False) + "\n").encode()
    if plots:
        for name, entry in data["models"].items():
            curves = entry["statistics"].get("uncertainty_vs_failure")
            if curves:
                yield f"risk_coverage_{name}.png", risk_coverage_plot(name, curves, ev.stats.fail_below, entry["task"])
        if any(m.scores for m in seg):
            yield "dice_boxplot.png", dice_boxplot(seg)
        for m in sev:
            if m.grades:
                yield f"severity_confusion_{m.model}.png", confusion_plot(m)


def write_evaluation(ev: Evaluation, dest: Path, plots: bool = True) -> list[Path]:
    """Write the set of files as folder `dest` (replacing a previous evaluation there); return
    their paths. Raises UsageError for a bad `dest`, RuntimeFailure on I/O errors (then the
    previous folder is left as it was)."""
    check_destination(ev.out, dest)
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    names = []
    try:
        tmp.mkdir(parents=True)
        for name, data in _contents(ev, plots):
            atomic_write(tmp / name, data)
            names.append(name)
        _replace_folder(tmp, dest)
    except (OSError, RuntimeFailure) as err:
        _remove(tmp)
        if isinstance(err, RuntimeFailure):
            raise
        raise RuntimeFailure(f"cannot write the evaluation to {dest}: {err.strerror or err}") from err
    return [dest / name for name in names]


def _replace_folder(new: Path, dest: Path) -> None:
    """Rename `new` to `dest`. A previous `dest` is first renamed aside and removed only
    after `new` is in place (Python has no atomic exchange of two folders)."""
    old = None
    if dest.exists():
        old = dest.parent / f".{dest.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
        os.rename(dest, old)
    try:
        os.rename(new, dest)
    except OSError:
        if old is not None:
            os.rename(old, dest)
        raise
    if old is not None:
        _remove(old)
    try:
        fd = os.open(dest.parent, os.O_RDONLY)
        try:
            os.fsync(fd)  # the renames reach the disk with the files
        finally:
            os.close(fd)
    except OSError as err:
        log.debug("cannot fsync %s: %s", dest.parent, err)  # some file systems refuse it; not fatal


def _remove(folder: Path) -> None:
    try:
        shutil.rmtree(folder)
    except FileNotFoundError:
        pass  # never created (mkdir failed) or already gone
    except OSError as err:
        # A leftover hidden folder is untidy but harmless; the command's outcome stands.
        log.warning("cannot remove %s: %s", folder, err.strerror or err)


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
