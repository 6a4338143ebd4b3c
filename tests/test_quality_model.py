"""A learned quality model (`task: quality`) through real runs of tiny models: its pinned
weights, its score among the measures, the threshold's reason, skip and resume (docs/quality.md)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from legitseg.errors import ManifestError
from legitseg.manifest.spec import parse_manifest
from tests.conftest import invoke_cli

POLICY = {"min_short_side": 32, "min_sharpness": None, "min_contrast": None}  # judged by the model


@pytest.fixture
def setup(kit, tmp_path):
    kit.add("seg", input_size=(64, 64))
    kit.add("qa", task="quality", arch=None, classes=1, input_size=(64, 64), seed=3)
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(1)
    for i in range(2):
        cv2.imwrite(str(images / f"im{i}.png"), rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    return kit, images


def manifest(kit, **policy) -> Path:
    return kit.write(quality=policy)


def run(images, out, m, *extra):
    return invoke_cli("run", str(images), "-o", str(out), "-m", str(m), "--device", "cpu", "-q", *extra)


def record(out: Path, name: str) -> dict:
    return json.loads((out / "records" / f"{name}.json").read_text())


def scores(out: Path) -> dict[str, float]:
    return {n: record(out, n)["quality"]["measures"]["quality_model"] for n in ("im0.png", "im1.png")}


def test_the_score_joins_the_measures_and_the_entry_records_the_model(setup, tmp_path):
    kit, images = setup
    out = tmp_path / "out"
    r = run(images, out, manifest(kit, **POLICY), "--backend", "torch")
    assert r.returncode == 0, r.stderr
    rec = record(out, "im0.png")
    entry, q = rec["models"]["qa"], rec["quality"]
    assert entry["task"] == "quality" and entry["status"] == "ok" and entry["weights_sha256"] == kit.models["qa"]["sha256"]
    # A scalar head: the score is the sigmoid's probability, in 0..1, and it is the measure.
    assert 0.0 < entry["score"] < 1.0 and entry["probabilities"] == [entry["score"]]
    assert entry["grade"] == int(entry["score"] >= 0.5)
    assert q["measures"]["quality_model"] == entry["score"] and q["model"] == "qa"
    assert q["units"]["quality_model"].startswith("score 0-1") and q["adequate"] is True
    assert rec["models"]["seg"]["status"] == "ok"
    row = next(json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()
               if json.loads(line)["model"] == "seg")
    assert "quality_model" in row["quality_measures"]


def test_the_same_scores_through_onnx_runtime(setup, tmp_path):
    kit, images = setup
    m = manifest(kit, **POLICY)
    assert run(images, tmp_path / "a", m, "--backend", "torch").returncode == 0
    r = run(images, tmp_path / "b", m, "--backend", "onnxruntime")
    assert r.returncode == 0, r.stderr
    assert record(tmp_path / "b", "im0.png")["models"]["qa"]["backend"] == "onnxruntime"
    torch_scores, ort_scores = scores(tmp_path / "a"), scores(tmp_path / "b")
    for name, value in torch_scores.items():
        assert ort_scores[name] == pytest.approx(value, abs=1e-4)


def test_a_graded_head_scores_the_expected_grade_scaled_to_0_1(kit, tmp_path):
    kit.add("qa", task="quality", arch=None, classes=3, input_size=(64, 64), seed=5)
    images = tmp_path / "images"
    images.mkdir()
    cv2.imwrite(str(images / "im0.png"), np.random.default_rng(4).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    out = tmp_path / "out"
    assert run(images, out, manifest(kit, **POLICY), "--backend", "torch").returncode == 0
    entry = record(out, "im0.png")["models"]["qa"]
    p = entry["probabilities"]
    assert len(p) == 3 and sum(p) == pytest.approx(1.0)
    assert entry["score"] == pytest.approx(0 * p[0] + 0.5 * p[1] + 1.0 * p[2], abs=1e-9)
    assert record(out, "im0.png")["quality"]["measures"]["quality_model"] == entry["score"]


def test_a_wrong_sha256_is_refused_before_anything_is_written(setup, tmp_path):
    kit, images = setup
    kit.models["qa"]["sha256"] = "0" * 64
    out = tmp_path / "out"
    r = run(images, out, manifest(kit, **POLICY), "--backend", "torch")
    assert r.returncode == 3 and "qa" in r.stderr and "sha256" in r.stderr
    assert not out.exists()


def test_the_threshold_adds_the_reason_and_skip_spares_the_other_models(setup, tmp_path):
    kit, images = setup
    first = tmp_path / "first"
    assert run(images, first, manifest(kit, **POLICY), "--backend", "torch").returncode == 0
    s = scores(first)
    low, high = sorted(s, key=s.get)
    limit = (s[low] + s[high]) / 2  # between the two images' scores: one passes, one does not
    out = tmp_path / "out"
    r = run(images, out, manifest(kit, on_inadequate="skip", min_quality_model=limit, **POLICY), "--backend", "torch")
    assert r.returncode == 0, r.stderr
    bad, good = record(out, low), record(out, high)
    assert bad["quality"]["reasons"] == [{"reason": "quality_model", "measure": "quality_model",
                                          "value": s[low], "limit": limit}]
    assert bad["status"] == "inadequate" and bad["models"]["seg"]["status"] == "inadequate"
    assert bad["models"]["seg"]["error"] == "not run: inadequate input (quality_model)"
    assert bad["models"]["qa"]["status"] == "ok"  # the model that judged it did run
    assert not (out / "masks" / "seg" / f"{low}.png").exists()
    assert good["status"] == "ok" and good["quality"]["adequate"] and (out / good["models"]["seg"]["mask"]).is_file()
    summary = json.loads(invoke_cli("summary", str(out), "--json").stdout)
    assert summary["quality"]["by_reason"] == {"quality_model": 1} and summary["images_failed"] == 0


def test_a_changed_threshold_redoes_the_verdict_without_rerunning_the_models(setup, tmp_path):
    kit, images = setup
    out = tmp_path / "out"
    assert run(images, out, manifest(kit, min_quality_model=0.0, **POLICY), "--backend", "torch").returncode == 0
    before = {n: record(out, n) for n in ("im0.png", "im1.png")}
    assert all(r["quality"]["adequate"] for r in before.values())
    # Every score is below 1: the stricter threshold flags both from the stored scores, no model runs.
    assert run(images, out, manifest(kit, min_quality_model=1.0, **POLICY), "--backend", "torch").returncode == 0
    for name, old in before.items():
        new = record(out, name)
        assert new["models"] == old["models"]  # same entries, same run ids: nothing recomputed
        assert [r["reason"] for r in new["quality"]["reasons"]] == ["quality_model"]
        assert new["quality"]["measures"] == old["quality"]["measures"]
        assert new["quality"]["policy"] != old["quality"]["policy"]
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert rows and not any(r["computed"] for r in rows)


MANIFEST = """version: 1
models:
  a:
    task: quality
    encoder: resnet18
    classes: 1
    input_size: [64, 64]
    weights: w.safetensors
    sha256: "{sha}"
"""
SECOND = """  b:
    task: quality
    encoder: resnet18
    classes: 2
    input_size: [64, 64]
    weights: w.safetensors
    sha256: "{sha}"
"""


@pytest.mark.parametrize(("text", "message"), [
    (MANIFEST + SECOND, "models a, b all have task 'quality'; a manifest has one quality model at most"),
    (MANIFEST.replace("classes: 1", "classes: 2\n    class_values: [0, 5]"),
     "model 'a': 'class_values' does not apply to task 'quality'"),
    (MANIFEST.replace("task: quality", "task: severity").replace("classes: 1", "classes: 2")
     + "quality:\n  min_quality_model: 0.5\n", "quality.min_quality_model needs a model with task: quality"),
    (MANIFEST + "quality:\n  min_quality_model: 1.5\n", "field 'quality.min_quality_model'"),
    (MANIFEST.replace("    classes: 1\n", "    classes: 1\n    arch: Unet\n"), "only apply to task 'segmentation'"),
])
def test_manifest_quality_models_are_validated(tmp_path, text, message):
    (tmp_path / "w.safetensors").write_bytes(b"x")
    with pytest.raises(ManifestError, match=message.replace("(", r"\(").replace(".", r"\.")):
        parse_manifest(text.format(sha="0" * 64), tmp_path / "models.yaml")


def test_a_loosened_threshold_sends_skipped_images_to_the_models(setup, tmp_path):
    kit, images = setup
    out = tmp_path / "out"
    strict = manifest(kit, on_inadequate="skip", min_quality_model=1.0, **POLICY)
    assert run(images, out, strict, "--backend", "torch").returncode == 0
    assert {record(out, n)["status"] for n in ("im0.png", "im1.png")} == {"inadequate"}
    loose = manifest(kit, on_inadequate="skip", min_quality_model=0.0, **POLICY)
    assert run(images, out, loose, "--backend", "torch").returncode == 0
    for name in ("im0.png", "im1.png"):
        rec = record(out, name)
        assert rec["status"] == "ok" and rec["quality"]["adequate"] and (out / rec["models"]["seg"]["mask"]).is_file()


@pytest.mark.parametrize("batched_post", [False, True])
def test_the_engine_gives_the_same_verdicts_on_both_postprocessing_paths(setup, tmp_path, batched_post):
    """True: the GPU's way (results copied back per batch), forced on the CPU; the gate's score
    is still read on the host before the other models run."""
    import threading

    import torch

    from legitseg.engines.local import Engine
    from legitseg.images.sources import Source
    from legitseg.inference.registry import build_runner
    from legitseg.manifest.quality import QualityPolicy
    from legitseg.manifest.spec import load_manifest
    from legitseg.models.factory import load_model

    kit, images = setup
    m = load_manifest(manifest(kit))
    runners = [build_runner(load_model(s), torch.device("cpu"), "fp32", "torch") for s in m.models.values()]
    first = tmp_path / "first"
    assert run(images, first, manifest(kit, **POLICY), "--backend", "torch").returncode == 0
    s = scores(first)
    policy = QualityPolicy(on_inadequate="skip", min_quality_model=(min(s.values()) + max(s.values())) / 2, **POLICY)
    engine = Engine(runners, batch_size=2, workers=0, post_threads=1, save_probabilities=False, max_pixels=10**8,
                    stop=threading.Event(), quality=policy, batched_post=batched_post, device_decode=False)
    results = {r.name: r for r in engine.process([Source(p, p.name) for p in sorted(images.iterdir())])}
    for name, score in s.items():
        result = results[name]
        assert result.quality.measures["quality_model"] == pytest.approx(score, abs=1e-6)
        spared = score < policy.min_quality_model
        assert result.quality.skipped is spared
        assert (result.outputs["seg"].error_kind == "inadequate") is spared
        assert result.outputs["qa"].result is not None
