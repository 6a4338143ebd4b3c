"""Issue 23 at the edges of the outputs: unique labels (1), overlay colours per record (8),
provenance per model entry (9), the OUT of an empty run (10), bidi-isolated names and tile
fields (low). Tests are named by the issue's item."""

from __future__ import annotations

import base64
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from legitseg.errors import EXIT_INTEGRITY
from legitseg.manifest.spec import load_manifest
from legitseg.output.overlay import ALPHA
from tests.conftest import invoke_cli
from tests.images import picture, save

SHA = "9f2c" + "0" * 60


def manifest_text(root: Path, **fields) -> Path:
    (root / "w.safetensors").write_bytes(b"not read by the parser")
    body = {"task": "segmentation", "arch": "Unet", "encoder": "resnet18", "weights": "w.safetensors",
            "sha256": SHA, "input_size": [64, 64], **fields}
    body = {k: v for k, v in body.items() if v is not None}
    path = root / "models.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "models": {"lesion": body}}, sort_keys=False))
    return path


def check(path: Path):
    return invoke_cli("models", "check", "-m", path)


# -- item 1: labels are unique ------------------------------------------------------------
@pytest.mark.parametrize(("fields", "message"), [
    ({"classes": 3, "labels": ["background", "lesion", "lesion"]},
     "model 'lesion': labels: 'lesion' names both class 1 and class 2; every class needs its own name"),
    ({"classes": 3, "labels": ["background", "Lesion", "lesion"]},
     "model 'lesion': labels: 'lesion' names both class 1 and class 2 (as 'Lesion': names that differ "
     "only in case count as one); every class needs its own name"),
    ({"classes": 2, "labels": ["background", "Background"]},
     "labels: 'Background' names both class 0 and class 1"),
    ({"task": "severity", "arch": None, "classes": 3, "labels": ["mild", "severe", "mild "]},
     "labels: 'mild ' names both class 0 and class 2"),
])
def test_item1_repeated_labels_are_a_manifest_error(tmp_path, fields, message):
    path = manifest_text(tmp_path, **fields)
    r = check(path)
    assert r.returncode == EXIT_INTEGRITY, r.stdout + r.stderr
    assert message in r.stderr and str(path) in r.stderr
    assert r.stderr.count("\n") == 1  # one line


def test_item1_a_binary_model_named_background_gets_no_repeated_default_label(tmp_path):
    """Default labels of a binary model are [background, <model name>]: a model called
    `background` would name class 1 like class 0."""
    (tmp_path / "w.safetensors").write_bytes(b"x")
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "models": {"background": {
        "task": "segmentation", "arch": "Unet", "encoder": "resnet18", "weights": "w.safetensors",
        "sha256": SHA, "input_size": [64, 64]}}}))
    r = check(path)
    assert r.returncode == EXIT_INTEGRITY
    assert "model 'background': labels: the default name of class 1 is the model name 'background'" in r.stderr
    path.write_text(path.read_text().replace("task: segmentation", "task: segmentation\n    labels: [bg, background]"))
    assert load_manifest(path).models["background"].label_names == ("bg", "background")


def test_item1_every_class_keeps_its_area_in_records_and_scores(kit, tmp_path):
    """With unique names, a three-class model's record and scores.csv hold both drawn classes."""
    kit.add("multi", classes=3, labels=["background", "lesion", "Lesion_b"], seed=4)
    kit.models["multi"]["labels"] = ["background", "lesion", "lesion"]
    manifest = kit.write()
    photos = tmp_path / "photos"
    save(photos / "a.png", picture(48, 64, seed=1))
    out = tmp_path / "out"
    r = invoke_cli("run", photos, "-m", manifest, "-o", out, "--device", "cpu")
    assert r.returncode == EXIT_INTEGRITY and "'lesion' names both class 1 and class 2" in r.stderr
    assert not out.exists()
    kit.models["multi"]["labels"] = ["background", "lesion", "Lesion_b"]
    manifest = kit.write()
    r = invoke_cli("run", photos, "-m", manifest, "-o", out, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    entry = json.loads((out / "records" / "a.png.json").read_text())["models"]["multi"]
    mask = cv2.imread(str(out / entry["mask"]), cv2.IMREAD_UNCHANGED)
    want = {name: float(np.mean(mask == c)) for c, name in ((1, "lesion"), (2, "Lesion_b"))}
    assert entry["area_fraction"].keys() == want.keys()
    assert entry["area_fraction"] == pytest.approx(want)


# -- low: tile fields ---------------------------------------------------------------------
@pytest.mark.parametrize(("fields", "message"), [
    ({"resize": "tile", "tile_size": 64, "input_size": [64, 64]},
     "model 'lesion': field 'input_size' does not apply to resize 'tile'"),
    ({"resize": "tile", "tile_size": 0, "input_size": None},
     "model 'lesion', field 'tile_size': tile_size 0 is out of range: one number or [height, width], each 8..16384"),
    ({"resize": "tile", "tile_size": [64, 99999], "input_size": None},
     "model 'lesion', field 'tile_size': tile_size [64, 99999] is out of range"),
])
def test_low_tile_fields_are_refused_by_name(tmp_path, fields, message):
    r = check(manifest_text(tmp_path, **fields))
    assert r.returncode == EXIT_INTEGRITY, r.stdout + r.stderr
    assert message in r.stderr and r.stderr.count("\n") == 1
    assert "tile_size.1" not in r.stderr and "tile_size.0" not in r.stderr


def test_low_tile_size_one_number_still_means_a_square(tmp_path):
    spec = load_manifest(manifest_text(tmp_path, resize="tile", tile_size=96, input_size=None)).models["lesion"]
    assert spec.tile_size == (96, 96)


# -- helpers for runs -----------------------------------------------------------------------
def run(*args, ok: bool = True):
    r = invoke_cli("run", *map(str, args), "--device", "cpu")
    assert (r.returncode == 0) == ok, r.stderr
    return r


def run_json(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())


def record(out: Path, name: str) -> dict:
    return json.loads((out / "records" / f"{name}.json").read_text())


def report(out: Path, dest: Path) -> str:
    r = invoke_cli("report", out, "-o", dest)
    assert r.returncode == 0, r.stderr
    return dest.read_text(encoding="utf-8")


def as_main_wrote_it(out: Path) -> None:
    """Turn an OUT into the shape the release before per-entry runs wrote: its records named
    the run only at the top (no `run_id` in a model entry), and a run over an empty folder
    left the OUT marker without a records/ folder. Nothing else in the format changed."""
    records_dir = out / "records"
    files = list(records_dir.rglob("*.json")) if records_dir.is_dir() else []
    for path in files:
        data = json.loads(path.read_text())
        for entry in data.get("models", {}).values():
            entry.pop("run_id", None)
        path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    if records_dir.is_dir() and not files:
        records_dir.rmdir()


def mean_colour_inside(overlay: Path, photo: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The colour blended over the photograph inside the mask (away from the outline)."""
    drawn = cv2.cvtColor(cv2.imread(str(overlay), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB).astype(float)
    inner = cv2.erode(mask.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
    assert inner.sum() > 50, "the model's mask is too small to measure a colour in"
    return ((drawn[inner] - (1 - ALPHA) * photo[inner]) / ALPHA).mean(0)


# -- item 8: overlays keep their colours ----------------------------------------------------
def test_item8_overlays_keep_their_colours_and_the_legend_agrees(kit, tmp_path):
    kit.add("seg", labels=["background", "spot"], threshold=0.3, seed=2, colors={"spot": "#ff0000"})
    manifest = kit.write()
    photos, out = tmp_path / "photos", tmp_path / "out"
    pictures = {"a.png": picture(64, 80, seed=5), "b.png": picture(64, 80, seed=6)}
    save(photos / "a.png", pictures["a.png"])
    run(photos, "-m", manifest, "-o", out, "--overlay")
    save(photos / "b.png", pictures["b.png"])
    kit.models["seg"]["colors"] = {"spot": "#0000ff"}
    manifest = kit.write()
    run(photos, "-m", manifest, "-o", out, "--overlay")  # a.png is done: its red overlay stays
    assert run_json(out)["models"]["seg"]["colors"] == {"spot": "#0000ff"}
    want = {"a.png": "#ff0000", "b.png": "#0000ff"}
    for name, hex_ in want.items():
        entry = record(out, name)["models"]["seg"]
        assert entry["overlay_colors"] == {"spot": hex_}
        mask = cv2.imread(str(out / entry["mask"]), cv2.IMREAD_UNCHANGED) > 0
        seen = mean_colour_inside(out / entry["overlay"], pictures[name], mask)
        assert np.abs(seen - [int(hex_[i:i + 2], 16) for i in (1, 3, 5)]).max() < 25, (name, seen)
    html = report(out, tmp_path / "r.html")
    sets = dict(re.findall(r'colours ([A-Z]) \(1 thumbnail\(s\)\)</span>: <span class="swatch" '
                           r'style="background: (#[0-9a-f]{6})"', html))
    assert sorted(sets.values()) == ["#0000ff", "#ff0000"]
    for name, hex_ in want.items():
        card = html[html.index(f'data-name="{name}"'):]
        card = card[:card.index("</figure>")]
        tags = re.findall(r'<span class="set">colours ([A-Z])</span>', card)
        assert [sets[t] for t in tags] == [hex_]  # its thumbnail names the set it was drawn with


def test_item8_an_overlay_of_an_older_run_without_recorded_colours_is_not_shown_under_new_ones(tmp_path):
    """Records written before overlays kept their colours: an overlay made by another run than
    run.json's has unknown colours, so its thumbnail is drawn from the mask in the legend's."""
    out = tmp_path / "out"
    mask = np.zeros((40, 60), np.uint8)
    mask[5:30, 5:40] = 1
    (out / "masks" / "seg").mkdir(parents=True)
    cv2.imwrite(str(out / "masks" / "seg" / "a.png.png"), mask)
    (out / "overlays" / "seg").mkdir(parents=True)
    cv2.imwrite(str(out / "overlays" / "seg" / "a.png.jpg"), np.full((40, 60, 3), (0, 0, 255), np.uint8))  # red
    entry = {"task": "segmentation", "status": "ok", "mask": "masks/seg/a.png.png",
             "overlay": "overlays/seg/a.png.jpg", "area_fraction": {"spot": 0.36}, "components": {"spot": 1}}
    (out / "records").mkdir()
    (out / "records" / "a.png.json").write_text(json.dumps({
        "image": str(tmp_path / "gone.png"), "name": "a.png", "sha256": "0" * 64, "size": [40, 60],
        "status": "ok", "error": None, "models": {"seg": entry}, "run_id": "old-run"}))
    (out / "run.json").write_text(json.dumps({"run_id": "new-run", "models": {"seg": {"colors": {"spot": "#0000ff"}}}}))
    html = report(out, tmp_path / "r.html")
    uri = re.findall(r'<img class="thumb" src="data:image/jpeg;base64,([^"]+)"', html)
    assert len(uri) == 1
    thumb = cv2.imdecode(np.frombuffer(base64.b64decode(uri[0]), np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
    want = (1 - ALPHA) * 128 + ALPHA * np.array([0, 0, 255])  # blue over grey, not the red overlay
    assert np.abs(thumb[15, 20].astype(int) - want).max() <= 10
    assert "background: #0000ff" in html and "colours A" not in html


# -- item 9: each result names its run -------------------------------------------------------
@pytest.fixture
def two_models(kit, tmp_path):
    kit.add("alpha", seed=1)
    kit.add("beta", classes=3, labels=["background", "lesion", "scale"], seed=3)
    photos = tmp_path / "photos"
    for i, name in enumerate(("a.png", "b.png")):
        save(photos / name, picture(40, 56, seed=i))
    return kit, kit.write(), photos


def test_item9_each_model_entry_names_the_run_that_computed_it(two_models, tmp_path):
    kit, manifest, photos = two_models
    out = tmp_path / "out"
    run(photos, "-m", manifest, "-o", out, "--models", "alpha")
    first = run_json(out)["run_id"]
    run(photos, "-m", manifest, "-o", out, "--models", "beta")
    second = run_json(out)["run_id"]
    assert first != second
    for name in ("a.png", "b.png"):
        rec = record(out, name)
        assert rec["run_id"] == second  # the record's last writer, as before
        assert {m: e["run_id"] for m, e in rec["models"].items()} == {"alpha": first, "beta": second}
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert {(r["model"], r["run_id"], r["computed"]) for r in rows} == {("alpha", first, False), ("beta", second, True)}
    # Both runs and both weights files are in the report, each credited with its own results.
    html = report(out, tmp_path / "r.html")
    runs = dict(re.findall(r'<tr class="run"><td><code><bdi>([^<]+)</bdi></code></td><td class="num">(\d+)</td>', html))
    assert runs == {first: "2", second: "2"}
    for model in ("alpha", "beta"):
        weights = str((kit.root / kit.models[model]["weights"]).absolute())
        row = re.search(rf'<tr class="weights"><td><bdi>{model}</bdi></td>(.*?)</tr>', html).group(1)
        assert weights in row and kit.models[model]["sha256"] in row
        assert (first if model == "alpha" else second) in row
    # A rerun of both models finds everything done.
    run(photos, "-m", manifest, "-o", out)
    assert run_json(out)["counts"]["processed"] == 0 and run_json(out)["counts"]["skipped"] == 2


def test_item9_an_out_written_by_main_reads_round_trip_and_resumes_with_nothing_redone(two_models, tmp_path):
    from legitseg.output.records import ImageRecord

    kit, manifest, photos = two_models
    out = tmp_path / "out"
    run(photos, "-m", manifest, "-o", out, "--models", "alpha")
    as_main_wrote_it(out)
    old_run = run_json(out)["run_id"]
    raw = {n: record(out, n) for n in ("a.png", "b.png")}
    assert "run_id" not in raw["a.png"]["models"]["alpha"]  # main's records name no run per entry
    for data in raw.values():  # today's records read and write back unchanged
        assert ImageRecord.from_json(data).to_json() == data
    run(photos, "-m", manifest, "-o", out, "--models", "alpha")
    assert run_json(out)["counts"] == {**run_json(out)["counts"], "processed": 0, "skipped": 2, "failed": 0}
    assert {n: record(out, n) for n in raw} == raw  # nothing rewritten
    # A new model added later: main's entry keeps the credit of the run that wrote it.
    run(photos, "-m", manifest, "-o", out, "--models", "beta")
    new_run = run_json(out)["run_id"]
    entries = record(out, "a.png")["models"]
    assert (entries["alpha"]["run_id"], entries["beta"]["run_id"]) == (old_run, new_run)
    assert {k: v for k, v in entries["alpha"].items() if k != "run_id"} == raw["a.png"]["models"]["alpha"]
    run(photos, "-m", manifest, "-o", out)
    assert run_json(out)["counts"]["processed"] == 0 and run_json(out)["counts"]["skipped"] == 2


# -- item 10: an empty run makes an OUT ------------------------------------------------------
def test_item10_a_run_over_an_empty_folder_makes_an_out_every_command_reads(kit, tmp_path):
    kit.add("seg")
    manifest = kit.write()
    empty, out = tmp_path / "empty", tmp_path / "out"
    empty.mkdir()
    run(empty, "-m", manifest, "-o", out)
    assert (out / "records").is_dir()
    html = report(out, tmp_path / "r.html")
    assert "0 image(s) in" in html and "No results in OUT yet." in html
    assert invoke_cli("summary", out).returncode == 0


def test_item10_report_reads_an_empty_out_written_by_main(kit, tmp_path):
    """main's run over an empty folder left the OUT marker and no records/."""
    kit.add("seg")
    manifest = kit.write()
    empty, out = tmp_path / "empty", tmp_path / "out"
    empty.mkdir()
    run(empty, "-m", manifest, "-o", out)
    as_main_wrote_it(out)
    assert not (out / "records").exists()
    html = report(out, tmp_path / "r.html")
    assert "0 image(s) in" in html
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    r = invoke_cli("report", nothing)
    assert r.returncode == 2 and "not a legitseg output folder" in r.stderr


# -- low: names are bidi-isolated ----------------------------------------------------------
class _Isolation(HTMLParser):
    """Every piece of text holding a bidi control sits inside <bdi> (or <title>, isolated by
    characters); every attribute holding one is wrapped in U+2068 ... U+2069."""

    def __init__(self):
        super().__init__()
        self.stack: list[str] = []
        self.bad: list[str] = []
        self.seen = 0

    VOID = {"meta", "img", "br", "hr", "input", "link"}

    def handle_starttag(self, tag, attrs):
        if tag not in self.VOID:
            self.stack.append(tag)
        for key, value in attrs:
            if key != "data-name" and value and "\u202e" in value:  # data-* is never displayed
                self.seen += 1
                if not (value.startswith("\u2068") or "\u2068" in value.split("\u202e")[0]):
                    self.bad.append(f"{tag} {key}={value!r}")

    def handle_endtag(self, tag):
        while self.stack and self.stack.pop() != tag:
            pass

    def handle_data(self, data):
        if "\u202e" in data:
            self.seen += 1
            if "bdi" not in self.stack and not (self.stack[-1:] == ["title"] and "\u2068" in data):
                self.bad.append(f"{'/'.join(self.stack)}: {data!r}")


def test_low_bidi_every_name_in_the_report_is_isolated(kit, tmp_path):
    spoof = "rtl\u202egnp.exe.png"
    kit.add("seg", labels=["background", "spot\u202e"])
    manifest = kit.write()
    photos, out = tmp_path / "photos", tmp_path / "out\u202e"
    save(photos / spoof, picture(40, 56, seed=2))
    (photos / "bad\u202e.png").write_bytes(b"not a picture")
    run(photos, "-m", manifest, "-o", out, ok=False)  # one image fails: its name is in the error too
    html = report(out, tmp_path / "r.html")
    assert spoof in html
    check = _Isolation()
    check.feed(html)
    assert check.bad == [] and check.seen >= 6  # names, label, error, OUT, title, alt


def test_item8_a_card_with_only_the_photograph_names_no_colour_set(kit, tmp_path):
    """A severity-only OUT: each card shows the bare photograph, which has no colours."""
    kit.add("sev", task="severity", arch=None, classes=3, seed=1)
    photos, out = tmp_path / "photos", tmp_path / "out"
    save(photos / "a.png", picture(40, 56, seed=3))
    run(photos, "-m", kit.write(), "-o", out)
    html = report(out, tmp_path / "r.html")
    assert len(re.findall(r'<img class="thumb"', html)) == 1 and 'class="set"' not in html
