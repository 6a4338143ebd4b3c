"""`make bench` must not rot: its tiny mode runs end to end and reports every column.

The numbers of a tiny run mean nothing; what is checked is that each path the
benchmark measures still runs against the current legitseg and lands in the
table, the JSON file and the generated Markdown section.
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

from benchmarks import measure, report, run_bench, workload

MEASURED = ("bound_img_s", "researcher_img_s", "legitseg_img_s", "c_over_a", "c_over_b", "startup_s",
            "peak_rss_mb")


@pytest.mark.slow
def test_tiny_bench_reports_every_column(tmp_path, monkeypatch, capsys):
    md, js = tmp_path / "bench.md", tmp_path / "bench.json"
    md.write_text("# Benchmarks\n\nHand-written text stays.\n")
    # In this process (its legitseg runs are real processes): the bench sets LEGITSEG_CACHE_DIR,
    # which monkeypatch puts back afterwards.
    monkeypatch.setenv("LEGITSEG_CACHE_DIR", os.environ.get("LEGITSEG_CACHE_DIR", str(tmp_path / "cache")))
    code = run_bench.main(["--tiny", "--device", "cpu", "--work", str(tmp_path / "work"),
                           "--out-md", str(md), "--out-json", str(js)])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-4000:]

    results = json.loads(js.read_text())
    assert results["columns"] == [key for key, _ in report.COLUMNS]
    rows = {row["row"]: row for row in results["rows"]}
    expected = {"single model", "large images"}
    if importlib.util.find_spec("legitseg.models.onnx_export") is not None:
        expected |= {"single model onnxruntime", "large images default decode reduced"}
    assert expected <= rows.keys(), rows.keys()
    for row in rows.values():
        assert set(results["columns"]) <= row.keys(), row["row"]
        for key in MEASURED:
            assert row[key] is not None, (row["row"], key)
        assert row["legitseg_img_s"] > 0 and row["startup_s"] > 0
    single = rows["single model"]
    assert single["run_2n"]["images"] == 2 * single["run"]["images"]  # peak RSS at N and 2N
    assert "(2N=" in single["peak_rss_mb"]
    assert {t["what"].split(": ", 1)[1].split(" ")[0] for t in results["targets"]} >= {"(c)/(a)", "(c)/(b)",
                                                                                       "start-up", "peak"}
    # The 12 MP row is held to the researcher's loop and to torch's forward bound.
    large = {t["what"].split(": ", 1)[1] for t in results["targets"] if t["row"] == "large images"}
    assert {"(c)/(b) >= 1.3", "(c)/(a torch fp32) >= 0.6"} <= large
    # Issue 26: the calibrated head gives content-dependent masks (a random head marks all or nothing);
    # each row says which backend really ran and, on the CPU, ONNX Runtime's bound beside torch's.
    for row in rows.values():
        assert 0.02 < row["area_fraction"] < 0.98, (row["row"], row["area_fraction"])
        assert row["ran"] and row["ort_bound_img_s"] > 0, row["row"]
    reduced = rows["large images default decode reduced"]
    assert reduced["device"] == "cpu fp32 auto" and reduced["c_over_ort"] > 0
    assert {t["what"] for t in results["targets"]} >= {"large images default decode reduced: (c)/(a') >= 0.6"}
    # Every legitseg run reports where its time went (LEGITSEG_PROFILE), and the 12 MP row what the
    # stages around the model can do on this machine.
    for row in rows.values():
        p = row["profile"]
        assert p["images"] == row["run"]["images"] and p["batches"] >= 1, row["row"]
        assert 0 < p["main_thread_cpu_share"] and p["process_cpu_s_per_image"] > 0, row["row"]
        # ... and how its start-up divides (legitseg/timeline.py): every step, none negative.
        steps = [step for step, _ in row["startup_split"]]
        assert steps[:3] == ["python, imports", "hash weights, find images", "torch, device"], steps
        assert steps[-2:] == ["engine start", "first batch"] and any(s.startswith("build ") for s in steps)
        assert all(v >= 0 for _, v in row["startup_split"]) and row["from_start_img_s"] > 0, row["startup_split"]
    (ceiling,) = [c for c in results["ceilings"] if c["row"] == "large images"]
    assert ceiling["decode_cpu"] > 0 and ceiling["encode"] > 0 and ceiling["decode_gpu"] is None
    assert ceiling["smallest"] == min(ceiling["forward"], ceiling["decode_cpu"], ceiling["encode"])
    assert "Ceilings of the stages" in captured.out and "main-thread CPU share" in captured.out
    # Both layouts and every batch size were timed; the winner is named.
    first = results["forward"][0]
    assert set(first["grid"]) == {"contiguous", "channels_last"}
    assert set(first["grid"]["contiguous"]) == {"1", "2"}
    assert first["best_variant"] in first["grid"]
    pipelines = {(s["pipeline"], s["images"].split()[0]) for s in results["stages"]}
    assert pipelines == {(p, size) for p in ("researcher", "legitseg (serial)", "legitseg (serial), CPU ms")
                         for size in ("160x120", "640x480")}
    if not torch.cuda.is_available():
        assert any(line.startswith("GPU rows") and "not measured" in line for line in results["not_measured"])
    machine = results["machine"]
    assert machine["cores"] and machine["torch"] and "torch_threads" in machine

    text = md.read_text()
    assert text.startswith("# Benchmarks\n\nHand-written text stays.\n")
    assert report.BEGIN.format("cpu") in text and report.END.format("cpu") in text
    assert "| " + " | ".join(title for _, title in report.COLUMNS) + " |" in text
    assert "- CPU: " in text and "run_bench.py" in text
    assert "(c) legitseg img/s" in captured.out  # the table is printed too


def test_generated_section_is_replaced_not_appended(tmp_path):
    md = tmp_path / "b.md"
    md.write_text("# Benchmarks\n\nintro\n")
    report.write_markdown(md, "cpu", "first")
    report.write_markdown(md, "cuda", "gpu numbers")
    report.write_markdown(md, "cpu", "second")
    text = md.read_text()
    assert text.count(report.BEGIN.format("cpu")) == 1 and "first" not in text and "second" in text
    assert "gpu numbers" in text and text.startswith("# Benchmarks\n\nintro\n")


def test_the_two_model_loop_and_bound_of_the_two_model_row(tmp_path):
    """What the "two models" row adds to the others (the tiny bench leaves the row out): the
    researcher's loop through a segmenter and a classifier, and the combined bound."""
    import cv2
    import numpy as np

    from legitseg.models.factory import build_module

    files = []
    for i in range(3):
        files.append(tmp_path / f"{i}.jpg")
        cv2.imwrite(str(files[-1]), np.full((48, 64, 3), 40 * i, np.uint8))
    models = []
    for name in ("tiny_seg_64", "tiny_sev_64"):
        m = workload.TINY[name]
        module = build_module(workload.spec_for(m, tmp_path / "w.safetensors")).eval()
        models.append(measure.LoopModel(name, module, m.size, (0.5,) * 3, (0.25,) * 3, m.task))
    loop = measure.researcher_loop(models, files, tmp_path / "out", torch.device("cpu"))
    assert loop.images == 2 and loop.img_s > 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"{i}_tiny_seg_64.png" for i in range(3)]
    assert loop.stages_ms["forward"] > 0 and loop.stages_ms["write"] > 0
    assert measure.combined_rate([10.0, 10.0]) == pytest.approx(5.0)
    assert measure.combined_rate([4.0, 12.0]) == pytest.approx(3.0)


def test_rates_take_the_steady_pace_between_two_full_pipelines_and_split_the_start_up(tmp_path):
    # Batches of 4 finish every 0.4 s after a 1.0 s fill; the last batch drains in 0.1 s.
    k, ends = 4, [1.0 + 0.4 * b for b in range(5)] + [2.7]
    times = sorted(t - 0.01 * i for t in ends for i in range(k))
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"started_at": 100.0 - 0.5, "marks": [
        ["run", 97.0], ["planned", 97.1], ["device", 98.0], ["built m", 98.5], ["exported m", 98.7],
        ["gated m", 99.2], ["ready m", 99.3]]}))
    times = [100.0 + t for t in times]
    steady, from_start, split = measure.rates(times, k, 96.0, str(profile))
    assert steady == pytest.approx((24 - 8) / (2.6 - 1.0))  # = 10 img/s: neither the fill nor the drain
    assert from_start == pytest.approx(24 / (102.7 - 99.5))
    assert [s for s, _ in split] == ["python, imports", "hash weights, find images", "torch, device", "build m",
                                     "export/cache m", "gate m", "runner m", "engine start", "first batch"]
    assert [round(v, 2) for _, v in split] == [1.0, 0.1, 0.9, 0.5, 0.2, 0.5, 0.1, 0.2, 1.47]
    # Short runs (< 3 batches): after the first batch to the last record.
    assert measure.rates(times[:8], k, 96.0, None)[:2] == (pytest.approx(4 / (times[7] - times[3])), None)


def test_a_run_starts_its_own_timeline_and_the_timeline_stays_small():
    from legitseg import timeline

    for i in range(300):
        timeline.mark(f"gated m{i}")
    assert len(timeline.marks()) == 256 and timeline.marks()[-1][0] == "gated m299"
    timeline.begin("run")
    timeline.mark("planned")
    assert [name for name, _ in timeline.marks()] == ["run", "planned"]
