"""The quality policy through real runs of tiny models: flag vs skip, exit codes, resume,
summary, report, evaluate and the API (docs/quality.md)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from legitseg.output.records import CSV_FIELDS
from tests.conftest import invoke_cli

POLICY = {"min_short_side": 32}  # the test images are 64 px


@pytest.fixture
def setup(kit, tmp_path):
    kit.add("seg", input_size=(64, 64))
    kit.add("sev", task="severity", arch=None, classes=3, input_size=(64, 64))
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(1)
    cv2.imwrite(str(images / "sharp.png"), rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    cv2.imwrite(str(images / "flat.png"), np.full((64, 64, 3), 120, np.uint8))
    return kit, images


def manifest(kit, **policy) -> Path:
    return kit.write(quality=policy)


def run(images, out, m, *extra):
    return invoke_cli("run", str(images), "-o", str(out), "-m", str(m), "--device", "cpu", "--backend", "torch",
                      "-q", *extra)


def rows(out: Path) -> dict[tuple[str, str], dict]:
    found = {}
    for line in (out / "scores.jsonl").read_text().splitlines():
        row = json.loads(line)
        found[(Path(row["image"]).name, row["model"])] = row
    return found


def record(out: Path, name: str) -> dict:
    return json.loads((out / "records" / f"{name}.json").read_text())


def test_without_a_policy_nothing_is_measured_and_no_column_is_added(setup, tmp_path):
    kit, images = setup
    out = tmp_path / "out"
    assert run(images, out, manifest(kit)).returncode == 0
    assert "quality" not in record(out, "flat.png")
    with open(out / "scores.csv") as f:
        assert tuple(next(csv.reader(f))) == CSV_FIELDS
    assert all("adequate" not in r for r in rows(out).values())
    summary = json.loads(invoke_cli("summary", str(out), "--json").stdout)
    assert "quality" not in summary


def test_flag_runs_the_models_and_every_row_carries_the_verdict(setup, tmp_path):
    kit, images = setup
    out = tmp_path / "out"
    r = run(images, out, manifest(kit, **POLICY))
    assert r.returncode == 0, r.stderr
    found = rows(out)
    flat, sharp = found[("flat.png", "seg")], found[("sharp.png", "seg")]
    assert flat["status"] == "ok" and flat["adequate"] is False
    assert set(flat["quality_reasons"]) == {"blurry", "low_contrast"}
    assert sharp["adequate"] is True and sharp["quality_reasons"] == []
    assert (out / flat["mask"]).is_file()
    q = record(out, "flat.png")["quality"]
    assert q["measures"]["contrast"] == 0.0 and q["units"]["contrast"].startswith("grey levels")
    assert {"reason": "low_contrast", "measure": "contrast", "value": 0.0, "limit": 5.0} in q["reasons"]
    with open(out / "scores.csv") as f:
        assert next(csv.reader(f))[-3:] == ["adequate", "quality_reasons", "quality_measures"]


def test_skip_records_the_image_as_inadequate_never_failed(setup, tmp_path):
    kit, images = setup
    out = tmp_path / "out"
    r = run(images, out, manifest(kit, on_inadequate="skip", **POLICY))
    assert r.returncode == 0, r.stderr
    rec = record(out, "flat.png")
    assert rec["status"] == "inadequate" and rec["error"] is None
    assert {e["status"] for e in rec["models"].values()} == {"inadequate"}
    assert not (out / "masks" / "seg" / "flat.png.png").exists()
    assert rows(out)[("flat.png", "sev")]["status"] == "inadequate"
    assert record(out, "sharp.png")["status"] == "ok"
    summary = json.loads(invoke_cli("summary", str(out), "--json").stdout)
    assert summary["images_failed"] == 0
    assert summary["quality"] == {"adequate": 1, "inadequate": 1, "not_measured": 0, "skipped": 1,
                                  "by_reason": {"blurry": 1, "low_contrast": 1}}
    assert summary["models"]["seg"]["failed"] == 0
    report = tmp_path / "report.html"
    assert invoke_cli("report", str(out), "-o", str(report)).returncode == 0
    html = report.read_text()
    assert "Inadequate images (1)" in html and "low_contrast (contrast 0 &lt; 5)" in html
    assert "Failed images (0)" in html


@pytest.mark.parametrize(("on", "extra", "policy", "code"), [
    ("skip", ["--require-adequate"], {}, 8),
    ("flag", ["--require-adequate"], {}, 8),
    ("flag", [], {"require_adequate": True}, 8),
    ("flag", [], {}, 0),
])
def test_no_adequate_image_is_exit_8_only_when_asked(setup, tmp_path, on, extra, policy, code):
    kit, images = setup
    (images / "sharp.png").unlink()
    out = tmp_path / "out"
    r = run(images, out, manifest(kit, on_inadequate=on, **POLICY, **policy), *extra)
    assert r.returncode == code, r.stderr
    if code == 8:
        assert "legitseg: error:" in r.stderr and "no adequate image among 1" in r.stderr
    assert record(out, "flat.png")["quality"]["adequate"] is False  # everything written first


def test_require_adequate_with_an_adequate_image_is_0_and_without_a_policy_is_2(setup, tmp_path):
    kit, images = setup
    assert run(images, tmp_path / "a", manifest(kit, **POLICY), "--require-adequate").returncode == 0
    r = run(images, tmp_path / "b", manifest(kit), "--require-adequate")
    assert r.returncode == 2 and "needs a quality: section" in r.stderr
    assert not (tmp_path / "b").exists()


def test_a_changed_limit_redoes_the_verdict_and_only_the_models_it_unblocks(setup, tmp_path):
    kit, images = setup
    out = tmp_path / "out"
    assert run(images, out, manifest(kit, on_inadequate="skip", **POLICY)).returncode == 0
    first = record(out, "sharp.png")
    # Looser limits: flat.png becomes adequate, so its models run now; sharp.png's do not run again.
    m = manifest(kit, on_inadequate="skip", min_short_side=32, min_sharpness=None, min_contrast=None)
    assert run(images, out, m, "--jsonl").returncode == 0
    found = rows(out)
    assert found[("flat.png", "seg")]["status"] == "ok" and found[("flat.png", "seg")]["computed"] is True
    assert found[("sharp.png", "seg")]["computed"] is False
    again = record(out, "sharp.png")
    assert again["models"] == first["models"] and again["quality"]["policy"] != first["quality"]["policy"]
    # Stricter: sharp.png becomes inadequate; its results stay, nothing runs, the verdict is new.
    m = manifest(kit, on_inadequate="skip", min_short_side=100)
    assert run(images, out, m).returncode == 0
    strict = record(out, "sharp.png")
    assert strict["quality"]["adequate"] is False and strict["models"] == first["models"]
    assert [r["reason"] for r in strict["quality"]["reasons"]] == ["low_resolution"]
    assert all(not r["computed"] for r in rows(out).values())


def test_policy_removed_sends_skipped_images_to_the_models(setup, tmp_path):
    kit, images = setup
    out = tmp_path / "out"
    assert run(images, out, manifest(kit, on_inadequate="skip", **POLICY)).returncode == 0
    assert run(images, out, manifest(kit)).returncode == 0
    rec = record(out, "flat.png")
    assert rec["status"] == "ok" and "quality" not in rec


def test_evaluate_is_broken_down_by_adequacy(setup, tmp_path):
    kit, images = setup
    out = tmp_path / "out"
    assert run(images, out, manifest(kit, **POLICY)).returncode == 0
    truth = tmp_path / "truth"
    (truth / "seg").mkdir(parents=True)
    for name in ("flat.png", "sharp.png"):
        cv2.imwrite(str(truth / "seg" / name), np.zeros((64, 64), np.uint8))
    dest = tmp_path / "ev"
    r = invoke_cli("evaluate", str(out), str(truth), "-o", str(dest))
    assert r.returncode in (0, 1), r.stderr
    groups = json.loads((dest / "evaluation.json").read_text())["models"]["seg"]["by_adequacy"]
    assert groups["adequate"]["images"] == 1 and groups["inadequate"]["images"] == 1


def test_the_api_prediction_carries_the_verdict(setup):
    from legitseg.api import Predictor

    kit, images = setup
    predictor = Predictor(manifest(kit, on_inadequate="skip", **POLICY), device="cpu", backend="torch")
    flat = predictor.predict_one(images / "flat.png")
    assert flat.ok and flat.quality is not None and not flat.quality.adequate
    assert flat["seg"].status == "inadequate" and "blurry" in flat.quality.reason_names
    assert predictor.predict_one(images / "sharp.png").quality.adequate
