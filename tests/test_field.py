"""What real folders, phone exports and nightly cron jobs do to a run, end to end through the CLI.

Each test is named after the field problem it guards against (the numbered list in
docs/reliability.md). Unit-level tests of naming, discovery and decoding are in
test_naming.py, test_sources.py and test_decode.py; these check the whole run.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
import yaml
from typer.testing import CliRunner

from legitseg.cli import app
from tests.conftest import REPO, ModelKit, invoke_cli
from tests.images import picture, save_heic


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    kit = ModelKit(tmp_path_factory.mktemp("kit"))
    kit.add("lesion")
    kit.add("grade", task="severity", classes=3)
    return kit.write()


def jpeg(path: Path, seed: int = 0, h: int = 48, w: int = 64) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(cv2.imencode(".jpg", picture(h, w, seed))[1].tobytes())
    return path


def run(*args, stdin: bytes | None = None):
    r = CliRunner().invoke(app, ["run", *map(str, args), "--device", "cpu", "--backend", "torch"],
                           input=stdin, env={"COLUMNS": "4000"})
    return r


def records(out: Path) -> dict[str, dict]:
    return {p.relative_to(out / "records").as_posix()[:-5]: json.loads(p.read_text())
            for p in (out / "records").rglob("*.json")}


def strict_rows(out: Path) -> list[dict]:
    def refuse(token):
        raise ValueError(f"non-finite number {token} in scores.jsonl")

    return [json.loads(line, parse_constant=refuse) for line in (out / "scores.jsonl").read_text().splitlines()]


# -- data loss and wrong results ---------------------------------------------------------
def test_1_same_file_name_from_two_sites_keeps_both_results(manifest, tmp_path):
    a = jpeg(tmp_path / "siteA" / "IMG_0001.JPG", seed=1)
    b = jpeg(tmp_path / "siteB" / "IMG_0001.JPG", seed=2)
    out = tmp_path / "out"
    assert run(a, "-m", manifest, "-o", out).exit_code == 0
    first = records(out)
    assert run(b, "-m", manifest, "-o", out).exit_code == 0
    recs = records(out)
    assert len(recs) == 2 and {r["source"] for r in recs.values()} == {str(a), str(b)}
    assert recs[next(iter(first))] == next(iter(first.values()))  # the first image's record is untouched
    rows = strict_rows(out)
    assert sorted(r["image"] for r in rows if r["model"] == "lesion") == sorted([str(a), str(b)])
    # Both at once, and again: no output is renamed, nothing is redone or listed twice.
    r = run(a, b, "-m", manifest, "-o", out)
    assert r.exit_code == 0 and records(out).keys() == recs.keys()
    assert "2 already done" in r.output
    assert len(strict_rows(out)) == 4


def test_2_out_inside_the_input_folder_is_never_read_back(manifest, tmp_path):
    photos = tmp_path / "photos"
    for i in range(2):
        jpeg(photos / f"{i}.jpg", seed=i)
    out = photos / "out"
    assert run(photos, "-m", manifest, "-o", out).exit_code == 0
    r = run(photos, "-m", manifest, "-o", out)
    assert r.exit_code == 0 and "2 image(s): 0 to process, 2 already done" in r.output
    assert len(records(out)) == 2


def test_3_a_changed_threshold_redoes_the_images(manifest, tmp_path):
    jpeg(tmp_path / "in" / "a.jpg")
    out = tmp_path / "out"
    assert run(tmp_path / "in", "-m", manifest, "-o", out).exit_code == 0
    assert "0 to process, 1 already done" in run(tmp_path / "in", "-m", manifest, "-o", out).output
    data = yaml.safe_load(manifest.read_text())
    data["models"]["lesion"]["threshold"] = 0.3
    changed = manifest.with_name("changed.yaml")
    changed.write_text(yaml.safe_dump(data))
    r = run(tmp_path / "in", "-m", changed, "-o", out)
    assert r.exit_code == 0 and "1 to process, 0 already done" in r.output
    digests = {e["settings"] for e in records(out)["a.jpg"]["models"].values()}
    assert len(digests) == 2  # one per model, each a digest of its own settings


def test_4_non_finite_results_never_reach_json(tmp_path):
    import torch

    kit = ModelKit(tmp_path / "kit")
    entry = kit.add("grade", task="severity", classes=3)
    from safetensors.torch import load_file, save_file

    weights = kit.root / entry["weights"]
    state = load_file(str(weights))
    state = {k: torch.full_like(v, float("nan")) if "classification_head" in k else v for k, v in state.items()}
    save_file(state, str(weights))
    from legitseg.models.weights import sha256_file

    kit.models["grade"]["sha256"] = sha256_file(weights)
    out = tmp_path / "out"
    r = run(jpeg(tmp_path / "a.jpg"), "-m", kit.write(), "-o", out)
    assert r.exit_code == 0, r.output
    (row,) = strict_rows(out)
    assert row["status"] == "ok", row
    assert row.get("score") is None and row["probabilities"] == [None, None, None]
    json.loads((out / "run.json").read_text(), parse_constant=lambda t: pytest.fail(t))


# -- crashes and hangs -------------------------------------------------------------------
def test_5_a_file_name_that_is_not_utf8_runs_and_summarises(manifest, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    raw = os.fsencode(folder) + b"/caf\xe9.jpg"
    with open(raw, "wb") as f:
        f.write(cv2.imencode(".jpg", picture(40, 40))[1].tobytes())
    out = tmp_path / "out"
    for _ in range(2):  # the second run reads what the first wrote
        r = run(folder, "-m", manifest, "-o", out)
        assert r.exit_code == 0, r.output
    (rec,) = records(out).values()
    assert rec["name"] == "caf%E9.jpg" and rec["status"] == "ok"
    assert [r["image"] for r in strict_rows(out)] == [rec["image"]] * 2
    assert (out / "masks/lesion/caf%E9.jpg.png").is_file()


def test_6_a_long_file_name_fails_nothing(manifest, tmp_path):
    long = jpeg(tmp_path / "in" / ("x" * 236 + ".jpg"))
    jpeg(tmp_path / "in" / "short.jpg", seed=3)
    out = tmp_path / "out"
    r = run(tmp_path / "in", "-m", manifest, "-o", out)
    assert r.exit_code == 0, r.output
    recs = records(out)
    assert len(recs) == 2 and all(rec["status"] == "ok" for rec in recs.values())
    assert str(long) in {rec["image"] for rec in recs.values()}


def test_7_nul_separated_stdin(manifest, tmp_path):
    a = jpeg(tmp_path / "in" / "with\nnewline.jpg")
    b = jpeg(tmp_path / "in" / "plain.jpg", seed=1)
    out = tmp_path / "out"
    r = run("-", "--null", "-m", manifest, "-o", out, stdin=bytes(a) + b"\0" + bytes(b) + b"\0")
    assert r.exit_code == 0, r.output
    assert {rec["source"] for rec in records(out).values()} == {str(a), str(b)}
    bad = run("-", "-m", manifest, "-o", tmp_path / "o2", stdin=bytes(a) + b"\0")
    assert bad.exit_code == 2 and "--null" in bad.output and not (tmp_path / "o2").exists()


def test_8_a_fifo_named_like_an_image_fails_alone_without_hanging(manifest, tmp_path):
    folder = tmp_path / "in"
    jpeg(folder / "a.jpg")
    os.mkfifo(folder / "pipe.jpg")
    out = tmp_path / "out"
    # In this process: a hang would stop the test at pytest-timeout's limit and fail it.
    r = invoke_cli("run", str(folder), "-m", str(manifest), "-o", str(out), "--device", "cpu", "--backend", "torch")
    assert r.returncode == 1, r.stderr
    assert "not a regular file (FIFO)" in records(out)["pipe.jpg"]["error"]
    assert records(out)["a.jpg"]["status"] == "ok"


# -- valid photographs refused or skipped --------------------------------------------------
def test_11_a_motion_photo_is_processed(manifest, tmp_path):
    path = jpeg(tmp_path / "in" / "PXL_MP.jpg")
    path.write_bytes(path.read_bytes() + b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8 + b"\xff\xd9")
    out = tmp_path / "out"
    r = run(path, "-m", manifest, "-o", out)
    assert r.exit_code == 0, r.output
    assert records(out)["PXL_MP.jpg"]["status"] == "ok"


def test_12_heic_is_decoded_and_skipped_files_are_named(manifest, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    save_heic(folder / "IMG_1.HEIC", picture(40, 60), orientation=6)
    (folder / "notes.txt").write_text("not a photo")
    out = tmp_path / "out"
    r = run(folder, "-m", manifest, "-o", out)
    assert r.exit_code == 0, r.output
    assert records(out)["IMG_1.HEIC"]["size"] == [60, 40]  # upright: EXIF orientation 6 applied
    assert "notes.txt" in r.output
    run_file = json.loads((out / "run.json").read_text())
    assert [str(folder / "notes.txt")] == [p for p, _ in run_file["inputs"]["skipped"]]


def test_13_an_empty_input_folder_warns_and_require_images_exits_6(manifest, tmp_path):
    empty = tmp_path / "share"
    empty.mkdir()
    r = run(empty, "-m", manifest, "-o", tmp_path / "out")
    assert r.exit_code == 0 and "holds no images" in r.output
    r = run(empty, "-m", manifest, "-o", tmp_path / "out2", "--require-images")
    assert r.exit_code == 6 and "no images found" in r.output
    assert not (tmp_path / "out2").exists()


# -- nightly cron and researcher habits ----------------------------------------------------------
def test_14_an_unchanged_failed_image_is_not_retried_every_night(manifest, tmp_path):
    folder = tmp_path / "in"
    jpeg(folder / "good.jpg")
    (folder / "bad.jpg").write_text("not a jpeg")
    out = tmp_path / "out"
    assert run(folder, "-m", manifest, "-o", out).exit_code == 1
    r = run(folder, "-m", manifest, "-o", out)
    assert r.exit_code == 0, r.output
    assert "2 already done (of which 1 failed before and are unchanged; --retry-failed redoes them)" in r.output
    assert records(out)["bad.jpg"]["status"] == "failed"  # the failed record is kept
    r = run(folder, "-m", manifest, "-o", out, "--retry-failed")
    assert r.exit_code == 1 and "1 to process" in r.output
    (folder / "bad.jpg").write_bytes((folder / "good.jpg").read_bytes())  # fixed: redone without asking
    r = run(folder, "-m", manifest, "-o", out)
    assert r.exit_code == 0 and "1 to process" in r.output and records(out)["bad.jpg"]["status"] == "ok"


def test_15_help_shows_defaults_and_usage_errors_are_one_line(tmp_path):
    help_text = " ".join(CliRunner().invoke(app, ["run", "--help"]).output.split())
    assert "[default: 32 on CUDA, 4 on CPU]" in help_text and "<bool>" not in help_text
    r = subprocess.run([sys.executable, "-m", "legitseg", "run", "x", "--bogus"], capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=REPO)
    assert r.returncode == 2
    assert r.stderr.splitlines() == ["legitseg: usage error: No such option: --bogus (Possible options: --out, "
                                     "--verbose) (see 'legitseg run --help')"]


def test_15_log_lines_print_above_a_live_progress_bar(monkeypatch):
    from rich.console import Console
    from rich.progress import Progress

    from legitseg.cli import common

    console = Console(record=True, force_terminal=True, width=60)
    monkeypatch.setattr(common, "err_console", console)
    common.setup_logging()
    with Progress(console=console) as bar:
        bar.add_task("run", total=2)
        logging.getLogger("legitseg.test").warning("failed: a.jpg: not a recognised image format")
    lines = console.export_text().splitlines()
    assert any(line.endswith("legitseg WARNING failed: a.jpg: not a recognised image format") for line in lines)


def test_18_rows_say_computed_or_skipped_and_run_json_says_how_inputs_came(manifest, tmp_path):
    a = jpeg(tmp_path / "in" / "a.jpg")
    out = tmp_path / "out"
    first = run("-", "-m", manifest, "-o", out, "--jsonl", stdin=bytes(a) + b"\n")
    rows = [json.loads(line) for line in first.stdout.splitlines() if line.startswith("{")]
    assert rows and all(r["computed"] for r in rows)
    run_id = json.loads((out / "run.json").read_text())["run_id"]
    assert {r["run_id"] for r in rows} == {run_id}
    again = run("-", "-m", manifest, "-o", out, "--jsonl", stdin=bytes(a) + b"\n")
    rows = [json.loads(line) for line in again.stdout.splitlines() if line.startswith("{")]
    assert rows and not any(r["computed"] for r in rows) and {r["run_id"] for r in rows} == {run_id}
    latest = json.loads((out / "run.json").read_text())
    assert latest["inputs"]["stdin"] is True and latest["inputs"]["images"] == 1
    assert latest["environment"]["working_directory"] == os.getcwd()
    assert latest["environment"]["hostname"]
    assert sorted(p.stem for p in (out / "runs").glob("*.json")) == sorted([run_id, latest["run_id"]])


def test_three_runs_with_different_arguments_each_record_resolves_to_its_own_run_file(manifest, tmp_path):
    folder = tmp_path / "in"
    for i in range(3):
        jpeg(folder / f"{i}.jpg", seed=i)
    out = tmp_path / "out"
    assert run(folder / "0.jpg", "-m", manifest, "-o", out).exit_code == 0
    assert run(folder / "1.jpg", "-m", manifest, "-o", out, "--batch-size", "1").exit_code == 0
    r = run(folder, "-m", manifest, "-o", out, "--save-probabilities")
    assert r.exit_code == 0 and "1 to process, 2 already done" in r.output
    runs = {p.stem: json.loads(p.read_text()) for p in (out / "runs").glob("*.json")}
    recs = records(out)
    assert len(runs) == 3 and len({rec["run_id"] for rec in recs.values()}) == 3
    for name, rec in recs.items():
        run_file = runs[rec["run_id"]]  # every record names a run file that exists
        assert run_file["run_id"] == rec["run_id"]
        assert run_file["versions"]["torch"] and run_file["math"]["convolution_fp32"] == "ieee"
        assert run_file["jpeg_decoder"] == "opencv"  # nvJPEG is for GPU runs
        assert run_file["manifest"]["sha256"] and run_file["environment"]["hostname"]
        assert run_file["arguments"]["inputs"] == [str(folder / name) if name != "2.jpg" else str(folder)]
    assert runs[recs["1.jpg"]["run_id"]]["arguments"]["batch_size"] == 1
    assert runs[recs["2.jpg"]["run_id"]]["arguments"]["save_probabilities"] is True
