"""`evaluate`'s statistics (docs/evaluate.md): bootstrap CIs against a reference drawing the same
indices, AUROC against a hand count with ties, risk-coverage, subgroups on a hand-made case."""

from __future__ import annotations

import json
import logging
from itertools import product

import numpy as np
import pytest

from legitseg.evaluate.scoring import ClassScore, ModelEvaluation
from legitseg.evaluate.stats import StatsOptions, auroc, bootstrap, metric_block, risk_coverage
from legitseg.evaluate.subgroups import read_metadata, subgroup_tables


def ref_ci(values: np.ndarray, seed: int, resamples: int) -> list[float]:
    idx = np.random.default_rng(seed).integers(0, len(values), size=(resamples, len(values)))
    means = values[idx].mean(axis=1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def test_bootstrap_ci_equals_a_reference_drawing_the_same_indices():
    values = np.random.default_rng(1).random(301)
    options = StatsOptions(seed=7, resamples=1000)  # several chunks of draws
    got = bootstrap(values.reshape(-1, 1), options)
    assert got["columns"][0] == pytest.approx(ref_ci(values, 7, 1000), abs=1e-12)
    assert got["macro"] == pytest.approx(got["columns"][0], abs=1e-12)
    assert bootstrap(values.reshape(-1, 1), options) == got  # same seed, same numbers
    assert bootstrap(values.reshape(-1, 1), StatsOptions(seed=8, resamples=1000)) != got


def ref_auroc(scores, positive) -> float:
    pos = [s for s, p in zip(scores, positive, strict=True) if p]
    neg = [s for s, p in zip(scores, positive, strict=True) if not p]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auroc_counts_ties_as_one_half():
    assert auroc(np.array([0.1, 0.4, 0.4, 0.8]), np.array([0, 1, 0, 1], bool)) == 0.875
    rng = np.random.default_rng(3)
    for _ in range(20):
        scores = rng.integers(0, 5, 40).astype(float)  # many ties
        positive = rng.random(40) < 0.3
        assert auroc(scores, positive) == pytest.approx(ref_auroc(scores, positive), abs=1e-12)
    assert auroc(np.array([0.2, 0.3]), np.array([False, False])) is None


def test_risk_coverage_refers_the_most_uncertain_first():
    scores = np.array([0.9, 0.1, 0.5, 0.7])
    failed = np.array([True, False, False, True])
    curve = risk_coverage(scores, 1.0 - np.array([0.2, 0.9, 0.8, 0.6]), failed, ["a", "b", "c", "d"])
    assert [p["referred"] for p in curve] == [0, 1, 2, 3]
    assert [p["failure_rate"] for p in curve] == [0.5, 1 / 3, 0.0, 0.0]
    assert curve[1]["mean_error"] == pytest.approx((0.1 + 0.2 + 0.4) / 3)


def _evaluation() -> ModelEvaluation:
    """Four images, IoU 0.9 / 0.5 / 0.8 / 0.3 (one class)."""
    m = ModelEvaluation("seg", "segmentation", labels=["lesion"])
    for name, (tp, fp, fn) in {"a.jpg": (9, 1, 0), "b.jpg": (5, 5, 0), "c.jpg": (8, 1, 1),
                               "d.jpg": (3, 4, 3)}.items():
        m.scores.append(ClassScore(name, "seg", "lesion", tp, fp, fn))
    return m


def test_failure_rate_and_means_with_cis():
    block = metric_block(_evaluation(), StatsOptions(fail_below=0.65, resamples=500))
    assert block["failure"]["rate"] == 0.5 and block["failure"]["failures"] == 2
    assert block["iou"]["mean"] == pytest.approx(0.625)
    lo, hi = block["iou"]["ci"]
    assert lo < 0.625 < hi
    iou = np.array([0.9, 0.5, 0.8, 0.3])
    assert block["iou"]["ci"] == pytest.approx(ref_ci(iou, StatsOptions().seed, 500), abs=1e-12)


def test_subgroups_with_an_empty_group_a_group_of_one_and_names_missing_or_extra(tmp_path, caplog):
    meta = tmp_path / "meta.csv"
    # d.jpg is missing; e.jpg (type VI) was not scored, so VI is an empty subgroup.
    meta.write_text("image,fitzpatrick\na.jpg,II\nb.jpg,II\nc,V\ne.jpg,VI\n")
    options = StatsOptions(resamples=300, metadata=read_metadata(meta, ("fitzpatrick",)), by=("fitzpatrick",))
    with caplog.at_level(logging.WARNING):
        tables = subgroup_tables(_evaluation(), options)
    assert tables["missing_from_metadata"] == ["d.jpg"]
    assert tables["not_scored"] == ["e.jpg"]
    assert "missing from metadata" in caplog.text and "d.jpg" in caplog.text
    assert "were not scored: e.jpg" in caplog.text
    groups = tables["by"]["fitzpatrick"]["groups"]
    assert {g: b["images"] for g, b in groups.items()} == {"II": 2, "V": 1, "VI": 0}
    assert groups["II"]["iou"]["mean"] == pytest.approx(0.7)
    assert groups["V"]["iou"]["mean"] == pytest.approx(0.8)
    assert groups["V"]["iou"]["ci"] == pytest.approx([0.8, 0.8])  # one image: no spread
    assert groups["VI"]["iou"]["mean"] is None and groups["VI"]["iou"]["ci"] == [None, None]
    assert groups["VI"]["failure"]["rate"] is None
    gap = tables["by"]["fitzpatrick"]["gap"]
    assert gap["iou"] == {"best": "V", "worst": "II", "gap": pytest.approx(0.1)}
    assert gap["failure"] == {"best": "V", "worst": "II", "gap": pytest.approx(0.5)}


def test_metadata_without_a_by_column_is_refused(tmp_path):
    from legitseg.errors import UsageError

    meta = tmp_path / "meta.csv"
    meta.write_text("image,site\na.jpg,arm\n")
    with pytest.raises(UsageError, match="meta.csv: no column fitzpatrick; found image, site"):
        read_metadata(meta, ("fitzpatrick",))


@pytest.fixture(scope="module")
def tta_demo(tmp_path_factory):
    """The demo with examples/uncertainty.yaml (TTA, uncertainty on) on four images."""
    import shutil
    from pathlib import Path

    from tests.conftest import invoke_cli

    repo = Path(__file__).resolve().parent.parent
    root = tmp_path_factory.mktemp("tta")
    (root / "in").mkdir()
    for name in ("case01.jpg", "case03.jpg", "case05.jpg", "case07.jpg"):
        shutil.copy(repo / "examples/images" / name, root / "in" / name)
    r = invoke_cli("run", root / "in", "-m", repo / "examples/uncertainty.yaml", "-o", root / "out",
                   "--device", "cpu", "-q", "--models", "erythema_segmenter,severity_classifier")
    assert r.returncode == 0, r.stderr
    return root, repo


def test_evaluate_on_a_tta_run_is_repeatable_and_writes_the_curves(tta_demo):
    from tests.conftest import invoke_cli

    root, repo = tta_demo
    outputs = []
    for n in (1, 2):
        r = invoke_cli("evaluate", root / "out", repo / "examples/ground_truth", "-o", root / f"ev{n}",
                       "--metadata", repo / "examples/metadata.csv", "--by", "fitzpatrick", "-q")
        assert r.returncode == 1, r.stderr  # 8 ground-truth images were not run: listed, exit 1
        data = json.loads((root / f"ev{n}" / "evaluation.json").read_text())
        outputs.append({k: v["statistics"] for k, v in data["models"].items()})
    assert outputs[0] == outputs[1]
    stats = outputs[0]["erythema_segmenter"]
    assert set(stats["uncertainty_vs_failure"]) == {"entropy", "boundary_entropy", "near_threshold",
                                                    "member_spread", "member_disagreement"}
    assert (root / "ev1" / "risk_coverage_erythema_segmenter.png").stat().st_size > 1000
    assert stats["subgroups"]["not_scored"] == [f"case{i:02d}{s}" for i, s in
                                                 [(2, ".jpg"), (4, ".png"), (6, ".tif"), (8, ".webp"),
                                                  (9, ".jpg"), (10, ".jpg"), (11, ".jpg"), (12, ".png")]]
    assert "grade_spread" in outputs[0]["severity_classifier"]["uncertainty_vs_failure"]
