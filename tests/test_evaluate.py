"""`legitseg evaluate`: metrics against an independent numpy computation, the ground-truth
conventions (empty vs empty, 0/255 maps, other sizes, missing predictions), the CLI's
files and exit codes, and the bundled demo's numbers (docs/demo.md)."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from legitseg.cli import app
from legitseg.errors import ImageError
from legitseg.evaluate.scoring import ClassScore, class_counts, read_label_map
from tests.conftest_demo import DEMO_IMAGES, DEMO_TRUTH, REPO, demo_out  # noqa: F401


def reference(pred: np.ndarray, truth: np.ndarray, c: int) -> dict[str, float]:
    """Dice/IoU/precision/recall of class c with boolean algebra; NaN where 0/0."""
    p, t = pred == c, truth == c
    inter, ps, ts = np.logical_and(p, t).sum(), p.sum(), t.sum()
    union = np.logical_or(p, t).sum()
    nan = float("nan")
    return {"dice": 2 * inter / (ps + ts) if ps + ts else nan,
            "iou": inter / union if union else nan,
            "precision": inter / ps if ps else nan,
            "recall": inter / ts if ts else nan}


def scores(pred, truth, classes):
    return [ClassScore("x", "m", str(c), *counts)
            for c, counts in enumerate(class_counts(pred, truth, classes), 1)]


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) < 1e-12


rng = np.random.default_rng(7)
CASES = {
    "random binary": (rng.integers(0, 2, (37, 53)), rng.integers(0, 2, (37, 53)), 2),
    "random 4 classes": (rng.integers(0, 4, (40, 31)), rng.integers(0, 4, (40, 31)), 4),
    "both empty": (np.zeros((8, 9), int), np.zeros((8, 9), int), 2),
    "prediction empty": (np.zeros((8, 9), int), np.eye(8, 9, dtype=int), 2),
    "truth empty": (np.eye(8, 9, dtype=int), np.zeros((8, 9), int), 2),
    "class 2 absent from both": (np.eye(6, dtype=int), np.eye(6, dtype=int) * 1, 3),
    "identical": (np.arange(30).reshape(5, 6) % 3, np.arange(30).reshape(5, 6) % 3, 3),
}


@pytest.mark.parametrize("case", CASES)
def test_metrics_equal_an_independent_numpy_computation(case):
    pred, truth, classes = CASES[case]
    got = scores(pred.astype(np.uint8), truth.astype(np.uint8), classes)
    assert len(got) == classes - 1
    for s in got:
        want = reference(pred, truth, int(s.label))
        for metric, value in want.items():
            assert same(getattr(s, metric), value), (case, s.label, metric, getattr(s, metric), value)


def test_empty_conventions():
    empty, dot = np.zeros((4, 4), np.uint8), np.eye(4, dtype=np.uint8)
    (both,) = scores(empty, empty, 2)
    assert both.empty_both and math.isnan(both.dice) and math.isnan(both.iou)
    (missed,) = scores(empty, dot, 2)
    assert (missed.dice, missed.recall) == (0.0, 0.0) and math.isnan(missed.precision)
    (false_alarm,) = scores(dot, empty, 2)
    assert (false_alarm.dice, false_alarm.precision) == (0.0, 0.0) and math.isnan(false_alarm.recall)


def save(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def test_label_maps_0_255_sizes_and_values(tmp_path):
    truth = np.zeros((5, 7), np.uint8)
    truth[1:3, 2:5] = 255
    got = read_label_map(save(tmp_path / "a.png", truth), 2, (5, 7))
    assert got.dtype == np.uint8 and set(np.unique(got)) == {0, 1} and got.sum() == 6
    with pytest.raises(ImageError, match=r"is 7x5 but the prediction is 5x7.*rotated.*not resized"):
        read_label_map(tmp_path / "a.png", 2, (7, 5))
    with pytest.raises(ImageError, match=r"values \[3\] outside 0..2"):
        read_label_map(save(tmp_path / "b.png", np.full((5, 7), 3, np.uint8)), 3, (5, 7))
    rgb = np.zeros((5, 7, 3), np.uint8)
    rgb[0, 0] = (255, 0, 0)
    with pytest.raises(ImageError, match="colour image"):
        read_label_map(save(tmp_path / "c.png", rgb), 2, (5, 7))


# -- a hand-built OUT -------------------------------------------------------------------
def record(out: Path, name: str, models: dict, status: str = "ok") -> None:
    rec = {"image": f"photos/{name}", "name": name, "sha256": "0" * 64, "status": status,
           "error": None, "models": models, "future_field": {"ignored": True}}
    path = out / "records" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec))


def seg_entry(out: Path, model: str, name: str, mask: np.ndarray | None, labels=("lesion",)) -> dict:
    if mask is not None:
        save(out / "masks" / model / f"{name}.png", mask.astype(np.uint8))
    return {"task": "segmentation", "status": "ok", "mask": f"masks/{model}/{name}.png",
            "weights_sha256": "ab" * 32, "area_fraction": {lb: 0.1 for lb in labels},
            "components": {lb: 1 for lb in labels}}


@pytest.fixture
def hand_built(tmp_path):
    """OUT with 5 images for model `les` and ground truth covering 5 names (one without image)."""
    out, gt = tmp_path / "out", tmp_path / "gt"
    a_pred, a_truth = rng.integers(0, 2, (20, 30)), rng.integers(0, 2, (20, 30))
    empty = np.zeros((10, 10), np.uint8)
    record(out, "a.jpg", {"les": seg_entry(out, "les", "a.jpg", a_pred)})
    save(gt / "les" / "a.png", (a_truth * 255).astype(np.uint8))          # stem name, 0/255
    record(out, "sub/b.jpg", {"les": seg_entry(out, "les", "sub/b.jpg", empty)})
    save(gt / "les" / "sub" / "b.jpg.png", empty)                         # full name, empty-empty
    record(out, "c.jpg", {"les": {"task": "segmentation", "status": "failed",
                                  "error": "CUDA out of memory"}}, status="failed")
    save(gt / "les" / "c.png", empty)
    record(out, "d.jpg", {"les": seg_entry(out, "les", "d.jpg", empty)})
    save(gt / "les" / "d.png", np.zeros((10, 12), np.uint8))             # other size
    record(out, "e.jpg", {"les": seg_entry(out, "les", "e.jpg", empty)})  # no ground truth
    save(gt / "les" / "ghost.png", empty)                                 # no image in OUT
    return out, gt, a_pred, a_truth


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_scores_lists_missing_and_exits_1(hand_built, tmp_path):
    out, gt, a_pred, a_truth = hand_built
    r = invoke("evaluate", out, gt, "-o", tmp_path / "ev")
    assert r.exit_code == 1, r.output
    assert "les" in r.output and "lesion" in r.output
    data = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    m = data["models"]["les"]
    assert {x["image"]: x["reason"] for x in m["missing"]} == {
        "c.jpg": "prediction failed: CUDA out of memory",
        "ghost": f"no image in OUT for ground truth {gt / 'les' / 'ghost.png'}"}
    assert [x["image"] for x in m["errors"]] == ["d.jpg"] and "not resized" in m["errors"][0]["error"]
    assert m["no_ground_truth"] == ["e.jpg"]
    assert m["weights_sha256"] == ["ab" * 32]
    want = reference(a_pred, a_truth, 1)
    lesion = m["classes"]["lesion"]
    assert lesion["empty_both"] == 1 and lesion["dice"]["n"] == 1 and lesion["dice"]["undefined"] == 1
    for metric in ("dice", "iou", "precision", "recall"):
        assert lesion[metric]["mean"] == pytest.approx(want[metric])
        assert m["mean"][metric] == pytest.approx(want[metric])
    assert m["per_image"]["sub/b.jpg"]["dice"] is None  # NaN never reaches JSON
    with open(tmp_path / "ev" / "segmentation.csv", newline="") as f:
        rows = {row["image"]: row for row in csv.DictReader(f)}
    assert set(rows) == {"a.jpg", "sub/b.jpg"}
    assert float(rows["a.jpg"]["dice"]) == pytest.approx(want["dice"]) and rows["sub/b.jpg"]["dice"] == ""
    assert (tmp_path / "ev" / "dice_boxplot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_severity_against_numpy(tmp_path):
    out, gt = tmp_path / "out", tmp_path / "gt"
    truth = {"a.jpg": 0, "b.jpg": 3, "c.jpg": 4, "d.jpg": 2}
    pred = {"a.jpg": 1, "b.jpg": 3, "c.jpg": 1, "d.jpg": 2}
    for name, g in pred.items():
        record(out, name, {"sev": {"task": "severity", "status": "ok", "grade": g, "score": g + 0.2,
                                   "probabilities": [0.2] * 5}})
    gt.mkdir()
    grades = tmp_path / "grades.csv"
    grades.write_text("image,grade,comment\n" + "".join(f"{k},{v},x\n" for k, v in truth.items()))
    r = invoke("evaluate", out, gt, "--severity-csv", grades)
    assert r.exit_code == 0, r.output
    m = json.loads((out / "evaluation" / "evaluation.json").read_text())["models"]["sev"]
    d = np.array([pred[k] - truth[k] for k in truth], float)
    assert m["mae"] == pytest.approx(np.abs(d).mean()) and m["rmse"] == pytest.approx(np.sqrt((d ** 2).mean()))
    assert m["exact"] == 0.5 and m["within_one"] == 0.75
    want = np.zeros((5, 5), int)
    for k in truth:
        want[truth[k], pred[k]] += 1
    assert m["confusion"] == want.tolist()
    assert (out / "evaluation" / "severity_confusion_sev.png").is_file()


@pytest.mark.parametrize("setup, message", [
    ("no_out", "is not a legitseg output folder"),
    ("no_gt", "does not exist or is not a folder"),
    ("no_match", "nothing to evaluate"),
    ("bad_csv", "severity.csv:3: grade 'two'"),
    ("unknown_model", "model(s) nope not found"),
])
def test_usage_errors_exit_2(hand_built, tmp_path, setup, message):
    out, gt, *_ = hand_built
    args = [out, gt]
    if setup == "no_out":
        args[0] = tmp_path / "nowhere"
    elif setup == "no_gt":
        args[1] = tmp_path / "nowhere"
    elif setup == "no_match":
        args[1] = tmp_path / "empty_gt"
        args[1].mkdir()
    elif setup == "bad_csv":
        record(out, "s.jpg", {"sev": {"task": "severity", "status": "ok", "grade": 1}})
        (gt / "severity.csv").write_text("image,grade\ns.jpg,1\nt.jpg,two\n")
    else:
        args += ["--models", "nope"]
    r = invoke("evaluate", *args)
    assert r.exit_code == 2, r.output
    assert message in r.output


# -- the bundled demo ---------------------------------------------------------------------
def iou(pred, truth):
    union = np.logical_or(pred, truth).sum()
    return 1.0 if union == 0 else float(np.logical_and(pred, truth).sum() / union)


@pytest.mark.slow
def test_demo_numbers_match_an_independent_computation_and_the_docs(demo_out, tmp_path):  # noqa: F811
    r = invoke("evaluate", demo_out, DEMO_TRUTH, "-o", tmp_path / "ev")
    assert r.exit_code == 0, r.output
    data = json.loads((tmp_path / "ev" / "evaluation.json").read_text())["models"]
    docs = (REPO / "docs" / "demo.md").read_text()
    images = sorted(p.name for p in DEMO_IMAGES.iterdir())
    for model, classes in (("erythema_segmenter", 2), ("lesion_segmenter", 3)):
        want = {}
        for name in images:
            pred = np.asarray(Image.open(demo_out / "masks" / model / f"{name}.png"))
            truth = np.asarray(Image.open(DEMO_TRUTH / model / f"{Path(name).stem}.png"))
            want[name] = np.mean([iou(pred == c, truth == c) for c in range(1, classes)])
        got = {k: v["iou"] for k, v in data[model]["per_image"].items()}
        assert got == pytest.approx(want)
        mean = data[model]["mean"]["iou"]
        assert mean == pytest.approx(np.mean(list(want.values())))
        row = re.search(rf"\| `{model}` \| [^|]*IoU[^|]*\| \*\*([0-9.]+)\*\*", docs)
        assert row and float(row.group(1)) == pytest.approx(mean, abs=6e-4), (model, mean)
    sev = data["severity_classifier"]
    truth = {row["image"]: int(row["grade"]) for row in csv.DictReader(open(DEMO_TRUTH / "severity.csv"))}
    grades = {g["image"]: g["predicted_grade"] for g in sev["grades"]}
    assert set(grades) == set(truth)
    assert sev["within_one"] == np.mean([abs(grades[k] - truth[k]) <= 1 for k in truth])
    assert sev["exact"] == np.mean([grades[k] == truth[k] for k in truth])
    assert f"MAE {sev['mae']:.3f}" in docs and f"RMSE {sev['rmse']:.3f}" in docs
