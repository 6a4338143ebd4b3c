"""Per-image uncertainty (docs/uncertainty.md): each measure against a numpy reference written
from the docs, the views' measures of a real TTA run, the refer policy, and an image made
ambiguous on purpose."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from legitseg.inference.uncertainty import MemberStats, segmentation_measures, severity_measures
from legitseg.manifest.spec import ModelSpec
from tests.conftest import invoke_cli
from tests.images import picture, save

REPO = Path(__file__).resolve().parent.parent


# -- references, from docs/uncertainty.md ---------------------------------------------------------
def ref_entropy(probs: np.ndarray) -> np.ndarray:
    p = probs.astype(np.float64)
    if p.shape[0] == 1:
        p = np.concatenate([1 - p, p])
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p), 0.0)
    return -terms.sum(axis=0) / math.log(p.shape[0])


def ref_band(mask: np.ndarray) -> np.ndarray:
    h, w = mask.shape
    b = max(1, min(h, w) // 100)
    edge = np.zeros((h, w), bool)
    for y in range(h):
        for x in range(w):
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    if 0 <= y + dy < h and 0 <= x + dx < w and mask[y + dy, x + dx] != mask[y, x]:
                        edge[y, x] = True
    band = np.zeros((h, w), bool)
    for y, x in zip(*np.nonzero(edge), strict=True):
        band[max(0, y - b):y + b + 1, max(0, x - b):x + b + 1] = True
    return band


def ref_near(probs: np.ndarray, threshold: float) -> np.ndarray:
    p = probs.astype(np.float64)
    if p.shape[0] == 1:
        return np.abs(p[0] - threshold) < 0.1
    s = np.sort(p, axis=0)
    return s[-1] - s[-2] < 0.2


def ref_segmentation(probs, mask, threshold):
    h, band = ref_entropy(probs), ref_band(mask)
    return {"entropy": h.mean(), "boundary_entropy": h[band].mean() if band.any() else None,
            "near_threshold": ref_near(probs, threshold).mean()}


def _probs(rng, c, h, w):
    if c == 1:
        p = rng.random((1, h, w)) ** 3  # many near 0, some near 1
        p[0, :3] = 0.0  # exact 0 and 1: the 0 log 0 = 0 convention
        p[0, -3:] = 1.0
        return p.astype(np.float16)
    logits = rng.normal(0, 2, (c, h, w))
    e = np.exp(logits - logits.max(axis=0))
    return (e / e.sum(axis=0)).astype(np.float16)


@pytest.mark.parametrize("classes,size", [(1, (37, 250)), (3, (120, 90)), (4, (205, 211))])
def test_segmentation_measures_match_the_reference(classes, size):
    rng = np.random.default_rng(classes)
    probs = _probs(rng, classes, *size)
    mask = (probs[0] > 0.3).astype(np.uint8) if classes == 1 else probs.argmax(axis=0).astype(np.uint8)
    got = segmentation_measures(probs, mask, 0.3 if classes == 1 else 0.5)
    want = ref_segmentation(probs, mask, 0.3)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key
    assert got["band_width"] == max(1, min(size) // 100)


def test_boundary_entropy_is_undefined_without_a_boundary():
    probs = np.full((1, 20, 30), 0.2, np.float16)
    got = segmentation_measures(probs, np.zeros((20, 30), np.uint8), 0.5)
    assert got["boundary_entropy"] is None
    assert got["entropy"] == pytest.approx(ref_entropy(probs).mean(), abs=1e-6)


def test_severity_measures_match_the_reference():
    p = np.array([0.05, 0.6, 0.3, 0.05, 0.0])
    values = (0.0, 1.0, 2.5, 3.0, 10.0)
    got = severity_measures(p, values)
    mean = sum(pi * vi for pi, vi in zip(p, values, strict=True))
    assert got["entropy"] == pytest.approx(-sum(pi * math.log(pi) for pi in p if pi > 0) / math.log(5), abs=1e-12)
    assert got["grade_spread"] == pytest.approx(
        math.sqrt(sum(pi * (vi - mean) ** 2 for pi, vi in zip(p, values, strict=True))), abs=1e-12)


def _spec(**fields) -> ModelSpec:
    base = dict(name="m", task="segmentation", arch="Unet", encoder="tu-test_resnet.r160_in1k",
                weights=REPO / "models.yaml", sha256="0" * 64, input_size=(64, 64))
    spec = {**base, **fields}
    return ModelSpec(**{k: v for k, v in spec.items() if v is not None})


@pytest.mark.parametrize("classes", [1, 3])
def test_member_stats_match_the_reference(classes):
    rng = np.random.default_rng(5)
    views = [_probs(rng, classes, 33, 41).astype(np.float32) for _ in range(4)]
    spec = _spec(classes=classes, **({"threshold": 0.4} if classes == 1 else {}))
    stats = MemberStats(spec)
    for v in views:
        stats.add(torch.from_numpy(v))
    got = stats.result()
    stack = np.stack(views).astype(np.float64)
    classes_of = [(v[0] > 0.4) if classes == 1 else v.argmax(axis=0) for v in views]
    differs = np.any([c != classes_of[0] for c in classes_of], axis=0)
    assert got["members"] == 4
    assert got["member_spread"] == pytest.approx(stack.std(axis=0).mean(), abs=1e-6)
    assert got["member_disagreement"] == pytest.approx(differs.mean(), abs=1e-12)


def test_severity_member_spread_is_the_spread_of_expected_grades():
    spec = _spec(task="severity", arch=None, classes=3, class_values=(0.0, 1.0, 4.0))
    stats = MemberStats(spec)
    views = [[0.2, 0.5, 0.3], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8]]
    for v in views:
        stats.add(torch.tensor(v))
    expected = [v[1] + 4 * v[2] for v in views]
    assert stats.result()["member_spread"] == pytest.approx(float(np.std(expected)), abs=1e-6)


# -- a real run with TTA ----------------------------------------------------------------------------
def _tta_model(kit, **fields):
    kit.add("seg", classes=1, backend="torch", tta=["hflip", "vflip"], uncertainty=True, threshold=0.5, **fields)
    return kit.write()


def test_a_tta_run_records_the_measures_of_its_views(kit, tmp_path):
    from legitseg.images.decode import prepare
    from tests.modes_kit import decoded, runners

    manifest = _tta_model(kit)
    images = tmp_path / "in"
    save(images / "a.png", picture(48, 56, seed=3))
    out = tmp_path / "out"
    r = invoke_cli("run", images, "-m", manifest, "-o", out, "--device", "cpu", "-q")
    assert r.returncode == 0, r.stderr
    record = json.loads((out / "records" / "a.png.json").read_text())["models"]["seg"]
    u = record["uncertainty"]
    # From the saved probabilities (written although --save-probabilities was not given).
    probs = np.load(out / record["probability_map"])["probabilities"]
    mask = np.asarray(Image.open(out / record["mask"]))
    for key, value in ref_segmentation(probs, mask, 0.5).items():
        assert u[key] == pytest.approx(value, abs=1e-6), key
    # From each view's probabilities at the model's resolution, moved back.
    runner = runners(manifest, "seg")["torch"]
    member = runner.members[0]
    prepared = prepare(decoded(images / "a.png"), runner.prep)  # (h, w, 3) at the model's size
    moves = {"identity": lambda a: a, "hflip": lambda a: a[:, ::-1], "vflip": lambda a: a[::-1]}
    views = []
    for move in moves.values():
        y = member.logits([np.ascontiguousarray(move(prepared))])[0]
        views.append(move(torch.sigmoid(y.float()).double().numpy()[0])[None])
    stack = np.stack(views)
    assert u["members"] == 3
    assert u["member_spread"] == pytest.approx(stack.std(axis=0).mean(), abs=1e-6)
    cls = stack[:, 0] > 0.5
    assert u["member_disagreement"] == pytest.approx((cls != cls[0]).any(axis=0).mean(), abs=1e-6)
    assert "refer" not in record
    header = (out / "scores.csv").read_text().splitlines()[0]
    assert header.endswith(",computed,uncertainty")


@pytest.mark.parametrize("above,refer", [(0.0, True), (1.0, False)])
def test_refer_policy_flags_the_image(kit, tmp_path, above, refer):
    manifest = _tta_model(kit, refer={"uncertainty": "member_spread", "above": above})
    save(tmp_path / "in" / "a.png", picture(40, 40, seed=1))
    r = invoke_cli("run", tmp_path / "in", "-m", manifest, "-o", tmp_path / "out", "--device", "cpu", "-q")
    assert r.returncode == 0, r.stderr
    entry = json.loads((tmp_path / "out" / "records" / "a.png.json").read_text())["models"]["seg"]
    assert entry["refer"] is refer
    assert entry["referral"] == {"measure": "member_spread", "value": entry["uncertainty"]["member_spread"],
                                 "above": above}
    summary = json.loads(invoke_cli("summary", tmp_path / "out", "--json").stdout)
    assert summary["models"]["seg"]["referred"] == int(refer)
    row = json.loads((tmp_path / "out" / "scores.jsonl").read_text().splitlines()[0])
    assert row["refer"] is refer


def test_a_member_measure_needs_views_or_members(kit):
    kit.add("seg", classes=1)
    kit.models["seg"]["refer"] = {"uncertainty": "member_spread", "above": 0.1}
    r = invoke_cli("models", "list", "-m", kit.write())
    assert r.returncode == 3
    assert "refer.uncertainty 'member_spread' compares TTA views or ensemble members" in r.stderr


def test_without_the_option_nothing_changes(kit, tmp_path):
    kit.add("seg", classes=1, backend="torch", tta=["hflip"])
    save(tmp_path / "in" / "a.png", picture(40, 40, seed=1))
    r = invoke_cli("run", tmp_path / "in", "-m", kit.write(), "-o", tmp_path / "out", "--device", "cpu", "-q")
    assert r.returncode == 0, r.stderr
    entry = json.loads((tmp_path / "out" / "records" / "a.png.json").read_text())["models"]["seg"]
    assert not {"uncertainty", "refer", "referral", "probability_map"} & set(entry)
    from legitseg.output.records import CSV_FIELDS
    assert (tmp_path / "out" / "scores.csv").read_text().splitlines()[0] == ",".join(CSV_FIELDS)


# -- an image made ambiguous on purpose -------------------------------------------------------------
def test_a_blend_of_two_demo_images_is_more_uncertain_than_either(tmp_path):
    images = tmp_path / "in"
    images.mkdir()
    a = np.asarray(Image.open(REPO / "examples/images/case01.jpg").convert("RGB")).astype(np.float64)
    b = np.asarray(Image.open(REPO / "examples/images/case02.jpg").convert("RGB").resize(
        (a.shape[1], a.shape[0]))).astype(np.float64)
    Image.fromarray(a.astype(np.uint8)).save(images / "a.png")
    Image.fromarray(b.astype(np.uint8)).save(images / "b.png")
    Image.fromarray(np.round((a + b) / 2).astype(np.uint8)).save(images / "blend.png")
    manifest = tmp_path / "uncertainty.yaml"
    shutil.copy(REPO / "examples/uncertainty.yaml", manifest)
    shutil.copytree(REPO / "examples/weights", tmp_path / "weights")
    r = invoke_cli("run", images, "-m", manifest, "-o", tmp_path / "out", "--device", "cpu", "-q",
                   "--models", "erythema_segmenter,lesion_segmenter")
    assert r.returncode == 0, r.stderr

    def u(name, model):
        return json.loads((tmp_path / "out/records" / f"{name}.png.json").read_text())["models"][model]["uncertainty"]

    for model in ("erythema_segmenter", "lesion_segmenter"):
        for measure in ("entropy", "near_threshold"):
            blend = u("blend", model)[measure]
            assert blend > max(u("a", model)[measure], u("b", model)[measure]), (model, measure)
    lesion = [u(n, "lesion_segmenter")["member_disagreement"] for n in ("a", "b", "blend")]
    assert lesion[2] > max(lesion[:2])
