"""`make bench` must not rot: its tiny mode runs end to end and reports every column.

The numbers of a tiny run mean nothing; what is checked is that each path the
benchmark measures still runs against the current legitseg and lands in the
table, the JSON file and the generated Markdown section.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks import report
from tests.conftest import REPO

MEASURED = ("bound_img_s", "researcher_img_s", "legitseg_img_s", "c_over_a", "c_over_b", "startup_s",
            "peak_rss_mb")


@pytest.mark.slow
def test_tiny_bench_reports_every_column(tmp_path):
    md, js = tmp_path / "bench.md", tmp_path / "bench.json"
    md.write_text("# Benchmarks\n\nHand-written text stays.\n")
    r = subprocess.run(
        [sys.executable, "benchmarks/run_bench.py", "--tiny", "--device", "cpu", "--work", str(tmp_path / "work"),
         "--out-md", str(md), "--out-json", str(js)],
        cwd=REPO, capture_output=True, text=True, timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-4000:]

    results = json.loads(js.read_text())
    assert results["columns"] == [key for key, _ in report.COLUMNS]
    rows = {row["row"]: row for row in results["rows"]}
    expected = {"single model", "large images", "two models"}
    if importlib.util.find_spec("legitseg.onnx_backend") is not None:
        expected.add("single model onnxruntime")
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
    assert "(c) legitseg img/s" in r.stdout  # the table is printed too


def test_generated_section_is_replaced_not_appended(tmp_path):
    md = tmp_path / "b.md"
    md.write_text("# Benchmarks\n\nintro\n")
    report.write_markdown(md, "cpu", "first")
    report.write_markdown(md, "cuda", "gpu numbers")
    report.write_markdown(md, "cpu", "second")
    text = md.read_text()
    assert text.count(report.BEGIN.format("cpu")) == 1 and "first" not in text and "second" in text
    assert "gpu numbers" in text and text.startswith("# Benchmarks\n\nintro\n")
