"""`legitseg evaluate` at its edges (issue 23): never exit 0 having scored nothing, expected
problems as their exit code and one line naming the file, true grades in range, the
--severity-csv flag winning, no pooling of different settings, an OUT of a run over no
images, the evaluation folder written as a set, and the -o / pipe corner cases.

Tests are named by the issue's item numbers. OUTs are hand-built records and masks where
the records' content is the point, real `legitseg run`s where the run's own OUT is."""

from __future__ import annotations

import codecs
import errno
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from legitseg.evaluate import output as evaluate_output
from tests.conftest import invoke_cli

LESION = np.zeros((12, 16), np.uint8)
LESION[3:8, 4:11] = 1


def save(path: Path, arr: np.ndarray, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **kw)
    return path


def record(out: Path, name: str, models: dict) -> None:
    rec = {"image": f"photos/{name}", "name": name, "sha256": "0" * 64, "status": "ok",
           "error": None, "models": models}
    path = out / "records" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec))
    (out / ".legitseg-out").touch()


def seg(out: Path, name: str, mask: np.ndarray = LESION, settings: str = "5e" * 32, model: str = "les") -> dict:
    save(out / "masks" / model / f"{name}.png", mask)
    return {"task": "segmentation", "status": "ok", "mask": f"masks/{model}/{name}.png",
            "weights_sha256": "ab" * 32, "settings": settings, "area_fraction": {"lesion": 0.1},
            "components": {"lesion": 1}}


def sev(grade: int, classes: int = 5) -> dict:
    return {"task": "severity", "status": "ok", "grade": grade, "score": grade + 0.1,
            "weights_sha256": "cd" * 32, "settings": "7a" * 32, "probabilities": [1 / classes] * classes}


def evaluate(*args):
    return invoke_cli("evaluate", *map(str, args))


@pytest.fixture
def out_gt(tmp_path):
    out, gt = tmp_path / "out", tmp_path / "gt"
    for name in ("a.jpg", "b.jpg"):
        record(out, name, {"les": seg(out, name)})
    gt.mkdir()
    return out, gt


# -- item 2: never exit 0 having scored nothing ------------------------------------------------
def test_item2_upper_case_png_and_tif_label_maps_are_scored(out_gt):
    out, gt = out_gt
    save(gt / "les" / "a.PNG", LESION)
    save(gt / "les" / "b.tif", LESION * 255)
    r = evaluate(out, gt)
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "evaluation" / "evaluation.json").read_text())["models"]["les"]
    assert sorted(m["per_image"]) == ["a.jpg", "b.jpg"] and m["mean"]["dice"] == 1.0


def test_item2_jpeg_label_maps_are_named_and_nothing_scored_exits_6(out_gt):
    out, gt = out_gt
    save(gt / "les" / "a.jpg", LESION * 255, quality=100)
    save(gt / "les" / "b.JPEG", LESION * 255, quality=100)
    r = evaluate(out, gt)
    assert r.returncode == 6, r.stderr
    for name in ("a.jpg", "b.JPEG"):
        assert f"ground truth {gt / 'les' / name} is a JPEG" in r.stderr
    assert f"nothing to score for model les: none of the ground truth in {gt / 'les'}" in r.stderr
    assert not (out / "evaluation").exists()  # nothing scored at all: nothing written


def test_item2_a_skipped_jpeg_beside_a_scored_png_is_exit_1(out_gt):
    out, gt = out_gt
    save(gt / "les" / "a.png", LESION)
    save(gt / "les" / "b.jpg", LESION * 255)
    r = evaluate(out, gt)
    assert r.returncode == 1, r.stderr
    assert "b.jpg is a JPEG" in r.stderr
    m = json.loads((out / "evaluation" / "evaluation.json").read_text())["models"]["les"]
    assert list(m["per_image"]) == ["a.jpg"] and [e["image"] for e in m["errors"]] == ["b.jpg"]


def test_item2_empty_truth_folder_exits_6_naming_model_and_folder(out_gt):
    out, gt = out_gt
    (gt / "les").mkdir()
    r = evaluate(out, gt)
    assert r.returncode == 6, r.stderr
    assert f"nothing to score for model les: ground truth folder {gt / 'les'} holds no label maps" in r.stderr


def test_item2_header_only_severity_csv_exits_6(tmp_path):
    out, gt = tmp_path / "out", tmp_path / "gt"
    record(out, "a.jpg", {"sev": sev(2)})
    gt.mkdir()
    (gt / "severity.csv").write_text("image,grade\n")
    r = evaluate(out, gt)
    assert r.returncode == 6, r.stderr
    assert f"nothing to score for model sev: severity ground truth {gt / 'severity.csv'} lists no images" in r.stderr


def test_item2_one_model_scored_and_one_not_writes_the_scored_and_exits_6(out_gt):
    out, gt = out_gt
    record(out, "c.jpg", {"sev": sev(1)})
    save(gt / "les" / "a.png", LESION)
    save(gt / "les" / "b.png", LESION)
    (gt / "severity.csv").write_text("image,grade\n")
    r = evaluate(out, gt)
    assert r.returncode == 6, r.stderr
    assert "nothing to score for model sev" in r.stderr and "model les" not in r.stderr
    data = json.loads((out / "evaluation" / "evaluation.json").read_text())["models"]
    assert data["les"]["mean"]["dice"] == 1.0 and data["sev"]["n"] == 0


# -- item 3: expected problems, one line naming the file ---------------------------------------
def test_item3_decompression_bomb_label_map_is_an_error_for_that_image(out_gt):
    out, gt = out_gt
    save(gt / "les" / "a.png", LESION)
    bomb = gt / "les" / "b.png"
    Image.new("1", (20000, 10000)).save(bomb)
    assert bomb.stat().st_size < 100_000
    r = evaluate(out, gt)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    (line,) = [x for x in r.stderr.splitlines() if "les: b.jpg: not scored" in x]
    assert f"ground truth {bomb} cannot be read (the prediction is 16x12)" in line
    assert "decompression bomb" in line


@pytest.mark.parametrize("encoding, sep", [("utf-16", "\t"), ("utf-16", ","), ("utf-16-be", "\t")])
def test_item3_utf16_severity_csv_with_bom_is_read(tmp_path, encoding, sep):
    out, gt = tmp_path / "out", tmp_path / "gt"
    record(out, "a.jpg", {"sev": sev(2)})
    record(out, "b.jpg", {"sev": sev(4)})
    gt.mkdir()
    text = f"image{sep}grade\r\na.jpg{sep}1\r\nb.jpg{sep}4\r\n"
    bom = codecs.BOM_UTF16_BE if encoding == "utf-16-be" else b""
    (gt / "severity.csv").write_bytes(bom + text.encode(encoding))  # "utf-16" writes its own BOM
    r = evaluate(out, gt)
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "evaluation" / "evaluation.json").read_text())["models"]["sev"]
    assert {g["image"]: g["true_grade"] for g in m["grades"]} == {"a.jpg": 1, "b.jpg": 4}
    assert m["mae"] == 0.5


def test_item3_utf16_without_bom_is_refused_naming_file_and_encoding(tmp_path):
    out, gt = tmp_path / "out", tmp_path / "gt"
    record(out, "a.jpg", {"sev": sev(2)})
    gt.mkdir()
    (gt / "severity.csv").write_bytes("image,grade\na.jpg,1\n".encode("utf-16-le"))
    r = evaluate(out, gt)
    assert r.returncode == 2, r.stderr
    assert f"{gt / 'severity.csv'}: holds NUL characters (UTF-16" in r.stderr


def test_item3_superscript_grade_is_a_usage_error_naming_file_and_line(tmp_path):
    out, gt = tmp_path / "out", tmp_path / "gt"
    record(out, "a.jpg", {"sev": sev(2)})
    gt.mkdir()
    (gt / "severity.csv").write_text("image,grade\nb.jpg,1\na.jpg,\u00b2\n", encoding="utf-8")
    r = evaluate(out, gt)
    assert r.returncode == 2, r.stderr
    assert f"{gt / 'severity.csv'}:3: grade '\u00b2' of 'a.jpg' is not a whole number >= 0" in r.stderr


# -- item 5: true grades in range --------------------------------------------------------------
def test_item5_true_grade_outside_the_models_grades_is_refused(tmp_path):
    out, gt = tmp_path / "out", tmp_path / "gt"
    record(out, "a.jpg", {"sev": sev(2, classes=5)})
    record(out, "b.jpg", {"sev": sev(3, classes=5)})
    gt.mkdir()
    (gt / "severity.csv").write_text("image,grade\na.jpg,2\nb.jpg,7\n")
    r = evaluate(out, gt)
    assert r.returncode == 2, r.stderr
    assert (f"{gt / 'severity.csv'}:3: true grade 7 of 'b.jpg' is outside 0..4, "
            f"the grades of severity model sev") in r.stderr
    assert not (out / "evaluation").exists()


# -- item 6: --severity-csv wins -----------------------------------------------------------------
def test_item6_explicit_severity_csv_wins_over_the_models_own_csv(tmp_path):
    out, gt = tmp_path / "out", tmp_path / "gt"
    record(out, "a.jpg", {"sev": sev(2)})
    gt.mkdir()
    (gt / "sev.csv").write_text("image,grade\na.jpg,0\n")
    flag = tmp_path / "grades.csv"
    flag.write_text("image,grade\na.jpg,3\n")
    r = evaluate(out, gt, "--severity-csv", flag)
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "evaluation" / "evaluation.json").read_text())["models"]["sev"]
    assert [g["true_grade"] for g in m["grades"]] == [3]
    assert f"{gt / 'sev.csv'} is not used for model sev: --severity-csv {flag} was given" in r.stderr
    assert "wins over" in " ".join(invoke_cli("evaluate", "--help").stdout.split())


# -- item 7: no pooling of different settings ----------------------------------------------------
def test_item7_mixed_settings_are_refused_naming_the_images_of_each(tmp_path):
    out, gt = tmp_path / "out", tmp_path / "gt"
    record(out, "a.jpg", {"les": seg(out, "a.jpg", settings="aa" * 32)})
    record(out, "b.jpg", {"les": seg(out, "b.jpg", settings="bb" * 32)})
    record(out, "c.jpg", {"les": seg(out, "c.jpg", settings="aa" * 32)})
    for name in "abc":
        save(gt / "les" / f"{name}.png", LESION)
    r = evaluate(out, gt)
    assert r.returncode == 2, r.stderr
    assert ("model les: the predictions in" in r.stderr
            and f"2 different settings ({'a' * 12}: a.jpg, c.jpg; {'b' * 12}: b.jpg)" in r.stderr)
    assert not (out / "evaluation").exists()
    r = evaluate(out, gt, "--allow-mixed-settings")
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "evaluation" / "evaluation.json").read_text())["models"]["les"]
    assert m["settings_digests"] == {"aa" * 32: ["a.jpg", "c.jpg"], "bb" * 32: ["b.jpg"]}


def _kit_manifest(kit, threshold: float) -> Path:
    kit.models.clear()
    kit.add("les", threshold=threshold)
    return kit.write()


def test_item7_real_runs_with_two_thresholds_are_not_pooled(kit, tmp_path):
    images, out, gt = tmp_path / "images", tmp_path / "out", tmp_path / "gt"
    rng = np.random.default_rng(3)
    for name in ("a", "b"):
        save(images / f"{name}.png", rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
        save(gt / "les" / f"{name}.png", np.zeros((40, 48), np.uint8))
    manifest = _kit_manifest(kit, 0.5)
    assert invoke_cli("run", images / "a.png", "-m", manifest, "-o", out).returncode == 0
    spec = yaml.safe_load(manifest.read_text())
    spec["models"]["les"]["threshold"] = 0.05
    manifest.write_text(yaml.safe_dump(spec))
    assert invoke_cli("run", images / "b.png", "-m", manifest, "-o", out).returncode == 0
    digests = {json.loads((out / "records" / f"{n}.png.json").read_text())["models"]["les"]["settings"]
               for n in "ab"}
    assert len(digests) == 2
    r = evaluate(out, gt)
    assert r.returncode == 2 and "2 different settings" in r.stderr, r.stderr
    r = evaluate(out, gt, "--allow-mixed-settings")
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "evaluation" / "evaluation.json").read_text())["models"]["les"]
    assert set(m["settings_digests"]) == digests


# -- item 10: an OUT of a run over no images -------------------------------------------------------
def test_item10_out_of_a_run_over_an_empty_folder_is_nothing_to_score(kit, tmp_path):
    (tmp_path / "empty").mkdir()
    out, gt = tmp_path / "out", tmp_path / "gt"
    kit.add("les")
    assert invoke_cli("run", tmp_path / "empty", "-m", kit.write(), "-o", out).returncode == 0
    (gt / "les").mkdir(parents=True)
    r = evaluate(out, gt)
    assert r.returncode == 6, r.stderr
    assert "not a legitseg output folder" not in r.stderr
    assert f"nothing to score: {out} holds no image records" in r.stderr


# -- item 12: the evaluation folder is one set -----------------------------------------------------
def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_item12_disk_full_mid_write_leaves_the_previous_set(out_gt, monkeypatch):
    out, gt = out_gt
    save(gt / "les" / "a.png", LESION)
    save(gt / "les" / "b.png", LESION)
    assert evaluate(out, gt).returncode == 0
    before = _snapshot(out / "evaluation")
    assert {"evaluation.json", "segmentation.csv", "dice_boxplot.png"} <= set(before)
    save(gt / "les" / "b.png", np.zeros_like(LESION))  # the next set would differ

    def disk_full(_models):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(evaluate_output, "dice_boxplot", disk_full)
    r = evaluate(out, gt)
    assert r.returncode == 4, r.stderr
    assert f"cannot write the evaluation to {out / 'evaluation'}: No space left on device" in r.stderr
    assert _snapshot(out / "evaluation") == before
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".evaluation")) == []


def test_item12_a_new_set_replaces_the_whole_previous_one(out_gt):
    out, gt = out_gt
    save(gt / "les" / "a.png", LESION)
    save(gt / "les" / "b.png", LESION)
    assert evaluate(out, gt).returncode == 0
    assert (out / "evaluation" / "dice_boxplot.png").is_file()
    assert evaluate(out, gt, "--no-plots").returncode == 0
    assert sorted(p.name for p in (out / "evaluation").iterdir()) == ["evaluation.json", "segmentation.csv"]


# -- low items ---------------------------------------------------------------------------------------
@pytest.fixture
def scorable(out_gt):
    out, gt = out_gt
    save(gt / "les" / "a.png", LESION)
    save(gt / "les" / "b.png", LESION)
    return out, gt


def test_low_out_option_on_an_existing_file_is_a_usage_error(scorable, tmp_path):
    out, gt = scorable
    target = tmp_path / "report.txt"
    target.write_text("keep me")
    r = evaluate(out, gt, "-o", target)
    assert r.returncode == 2, r.stderr
    assert f"--out {target} is a file" in r.stderr and target.read_text() == "keep me"


@pytest.mark.parametrize("inside", ["records", "records/sub", "masks/les", "probabilities"])
def test_low_out_option_inside_the_runs_folders_is_refused(scorable, inside):
    out, gt = scorable
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    r = evaluate(out, gt, "-o", out / inside)
    assert r.returncode == 2, r.stderr
    assert f"is inside {out / inside.split('/')[0]}, which belongs to the run" in r.stderr
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_low_out_option_on_a_folder_with_other_files_is_refused(scorable, tmp_path):
    out, gt = scorable
    r = evaluate(out, gt, "-o", out)  # replacing the folder would delete the run
    assert r.returncode == 2, r.stderr
    assert "holds other files than an evaluation" in r.stderr and (out / "records").is_dir()


def test_low_table_into_a_pipe_is_tab_separated_without_box_characters(scorable, tmp_path):
    out, gt = scorable
    record(out, "s.jpg", {"sev": sev(2)})
    (gt / "severity.csv").write_text("image,grade\ns.jpg,2\n")
    r = evaluate(out, gt)
    assert r.returncode == 0, r.stderr
    assert not set(r.stdout) & set("─━│┃┏┓┗┛╇╈┡┩"), r.stdout
    lines = r.stdout.splitlines()
    assert lines[0] == "model\tclass\timages\tDice\tIoU\tprecision\trecall\tempty both"
    assert "les\tmean\t2\t1.000\t1.000\t1.000\t1.000\t" in lines
    assert "model\timages\tMAE\tRMSE\texact\twithin +-1" in lines
    assert "sev\t1\t0.000\t0.000\t1.000\t1.000" in lines
