"""`legitseg summary OUT`: rebuilds scores.* from the records and says what OUT holds."""

from __future__ import annotations

import json
import subprocess
import sys

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from legitseg.cli import app
from tests.conftest import REPO


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """An OUT written by one real run: 3 good images, 1 broken, a segmentation and a severity model."""
    from tests.conftest import ModelKit

    root = tmp_path_factory.mktemp("summary")
    kit = ModelKit(root)
    kit.add("seg")
    kit.add("sev", task="severity", classes=4, seed=1)
    manifest = kit.write()
    images = root / "in"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        cv2.imwrite(str(images / f"{i}.png"), rng.integers(0, 255, (40, 50, 3), dtype=np.uint8))
    (images / "bad.jpg").write_bytes(b"not an image")
    out = root / "out"
    r = CliRunner().invoke(app, ["run", str(images), "-m", str(manifest), "-o", str(out), "--backend", "torch"])
    assert r.exit_code == 1, r.output
    return out


def _records(out):
    return [json.loads(p.read_text()) for p in sorted((out / "records").glob("*.json"))]


def test_summary_rebuilds_scores_and_counts_per_model(done):
    (done / "scores.jsonl").unlink()
    (done / "scores.csv").write_text("stale\n")
    r = CliRunner().invoke(app, ["summary", str(done), "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    rows = [json.loads(x) for x in (done / "scores.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and (done / "scores.csv").read_text().count("\n") == 9
    records = _records(done)
    assert (data["images"], data["images_ok"], data["images_failed"]) == (4, 3, 1)
    assert data["models"]["seg"]["ok"] == 3 and data["models"]["seg"]["failed"] == 1
    assert data["models"]["seg"]["failed_by_kind"] == {"image": 1}
    areas = [rec["models"]["seg"]["area_fraction"]["seg"] for rec in records if rec["status"] == "ok"]
    assert data["models"]["seg"]["area_fraction_stats"]["seg"]["mean"] == pytest.approx(sum(areas) / 3)
    grades = [rec["models"]["sev"]["grade"] for rec in records if rec["status"] == "ok"]
    assert data["models"]["sev"]["grades"] == {str(g): grades.count(g) for g in sorted(set(grades))}
    assert data["models"]["sev"]["score"]["n"] == 3
    assert [run["status"] for run in data["runs"]] == ["completed"]
    assert data["runs"][0]["counts"]["processed"] == 3 and data["unreadable_records"] == []


def test_summary_text_names_unreadable_records_and_runs(done):
    (done / "records" / "junk.json").write_text("{not json")
    try:
        r = CliRunner().invoke(app, ["summary", str(done)])
    finally:
        (done / "records" / "junk.json").unlink()
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[1] == "images: 4 (3 ok, 1 failed), unreadable records: 1"
    assert "  unreadable: records/junk.json" in lines
    assert "model seg (segmentation): 3 ok, 1 failed (image 1)" in lines
    assert any(line.startswith("  grades: ") for line in lines)
    assert any(line.startswith("runs: 1 under ") for line in lines)


def test_summary_of_a_folder_that_is_not_an_out_exits_2(tmp_path):
    r = CliRunner().invoke(app, ["summary", str(tmp_path)])
    assert r.exit_code == 2
    assert "is not a legitseg output folder" in r.output
    assert not (tmp_path / ".legitseg.lock").exists()


def test_summary_exits_5_while_a_run_holds_out(done):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time; from pathlib import Path; from legitseg.output.lock import OutputLock;"
        "from legitseg.output.shard import Shard;"
        f"OutputLock(Path({str(done)!r}), Shard(0, 2)).acquire(); print('locked', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = (done / "scores.jsonl").stat().st_mtime_ns
        r = CliRunner().invoke(app, ["summary", str(done)])
        assert r.exit_code == 5, r.output
        assert f"shard-0-of-2 PID {holder.pid}" in r.output
        assert (done / "scores.jsonl").stat().st_mtime_ns == before
    finally:
        holder.kill()
        holder.wait()


def test_summary_keeps_computed_as_the_latest_run_left_it(done, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(done, out)
    for name in ("scores.jsonl", "scores.csv"):
        (out / name).unlink(missing_ok=True)
    latest = json.loads((out / "run.json").read_text())["run_id"]
    assert CliRunner().invoke(app, ["summary", str(out)]).exit_code == 0
    rows = [json.loads(x) for x in (out / "scores.jsonl").read_text().splitlines()]
    assert rows and all(r["computed"] is (r.get("run_id") == latest) for r in rows)
    assert any(r["computed"] for r in rows)  # the run that wrote OUT computed these: not "skipped"
    assert "True" in (out / "scores.csv").read_text()
    # Without a readable run.json nothing can be said to be computed by the latest run.
    (out / "run.json").write_text("{not json")
    assert CliRunner().invoke(app, ["summary", str(out)]).exit_code == 0
    assert not any(json.loads(x)["computed"] for x in (out / "scores.jsonl").read_text().splitlines())
