"""`legitseg annotations` on the demo (issue 29): COCO RLE and polygons, COCOeval against the
demo ground truth, GeoJSON, traceability, scores, and the command's exit codes."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from tests.conftest import REPO, invoke_cli
from tests.conftest_demo import DEMO_TRUTH

SEGMENTERS = ("erythema_segmenter", "lesion_segmenter")


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    """The demo run with --save-probabilities (treated as read-only)."""
    out = tmp_path_factory.mktemp("annot") / "out"
    r = invoke_cli("run", "examples/images", "-m", "models.yaml", "-o", out, "--device", "cpu", "--quiet",
                   "--save-probabilities", cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def coco(out, tmp_path_factory) -> dict:
    dest = tmp_path_factory.mktemp("coco") / "coco.json"
    r = invoke_cli("annotations", out, "--format", "coco", "-o", dest)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{dest}\n" and "progress 12/12 images" in r.stderr
    return json.loads(dest.read_text())


def records(out: Path) -> dict[str, dict]:
    return {json.loads(p.read_text())["name"]: json.loads(p.read_text()) for p in (out / "records").glob("*.json")}


def mask_of(out: Path, record: dict, model: str) -> np.ndarray:
    return np.asarray(Image.open(out / record["models"][model]["mask"]))


def rasterise_coco(segmentation, h: int, w: int) -> np.ndarray:
    if isinstance(segmentation, dict):
        return coco_mask.decode({"size": segmentation["size"], "counts": segmentation["counts"].encode()})
    return coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects(segmentation, h, w)))


def test_coco_rle_decodes_to_the_masks_exactly_one_annotation_per_region(out, coco):
    recs = records(out)
    cats = {c["id"]: c for c in coco["categories"]}
    assert {(c["model"], c["label"]) for c in cats.values()} == {
        ("erythema_segmenter", "erythema"), ("lesion_segmenter", "lesion"), ("lesion_segmenter", "erythema")}
    assert len(coco["images"]) == 12
    for image in coco["images"]:
        rec = recs[image["legitseg_name"]]
        assert (image["file_name"], image["sha256"], [image["height"], image["width"]]) == (
            rec["image"], rec["sha256"], rec["size"])
        anns = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
        for model in SEGMENTERS:
            mask = mask_of(out, rec, model)
            entry = rec["models"][model]
            for index, label in enumerate(entry["area_fraction"], 1):
                mine = [a for a in anns if cats[a["category_id"]]["model"] == model
                        and cats[a["category_id"]]["label"] == label]
                assert len(mine) == entry["components"][label]  # the record's 8-connected count
                union = np.zeros(mask.shape, np.uint8)
                for a in mine:
                    region = rasterise_coco(a["segmentation"], *mask.shape)
                    assert a["area"] == int(region.sum())
                    ys, xs = np.nonzero(region)
                    assert a["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
                    assert not (union & region).any()  # regions never overlap
                    union |= region
                np.testing.assert_array_equal(union, (mask == index).astype(np.uint8))


def test_annotations_trace_to_run_weights_and_colours_and_severity_is_an_image_attribute(out, coco):
    recs = records(out)
    run = json.loads((out / "run.json").read_text())
    by_id = {i["id"]: recs[i["legitseg_name"]] for i in coco["images"]}
    cats = {c["id"]: c for c in coco["categories"]}
    for a in coco["annotations"]:
        entry = by_id[a["image_id"]]["models"][a["model"]]
        assert (a["run_id"], a["weights_sha256"]) == (entry["run_id"], entry["weights_sha256"])
        assert cats[a["category_id"]]["color"] == run["models"][a["model"]]["colors"][cats[a["category_id"]]["label"]]
    assert coco["info"]["runs"] == [run["run_id"]]
    for image in coco["images"]:
        grade = image["attributes"]["severity"]["severity_classifier"]
        entry = recs[image["legitseg_name"]]["models"]["severity_classifier"]
        assert (grade["grade"], grade["score"], grade["weights_sha256"]) == (
            entry["grade"], entry["score"], entry["weights_sha256"])


def test_score_is_the_mean_probability_inside_the_region(out, coco):
    recs = records(out)
    by_id = {i["id"]: recs[i["legitseg_name"]] for i in coco["images"]}
    cats = {c["id"]: c for c in coco["categories"]}
    checked = 0
    for a in coco["annotations"][:40]:
        rec = by_id[a["image_id"]]
        probs = np.load(out / rec["models"][a["model"]]["probability_map"])["probabilities"]
        region = rasterise_coco(a["segmentation"], *rec["size"]).astype(bool)
        channel = probs[0] if probs.shape[0] == 1 else probs[cats[a["category_id"]]["class_index"]]
        assert a["score"] == pytest.approx(float(channel[region].astype(np.float64).mean()), abs=1e-6)
        checked += 1
    assert checked


def test_cocoeval_on_the_export_against_the_demo_truth_agrees_with_legitseg_evaluate(out, coco, tmp_path):
    """The demo's label maps as COCO (one annotation per image and class), the export's regions
    joined per image and class: COCOeval's IoU of each pair is `legitseg evaluate`'s IoU."""
    r = invoke_cli("evaluate", out, DEMO_TRUTH, "-o", tmp_path / "ev", "--no-plots", "--models", "lesion_segmenter")
    assert r.returncode == 0, r.stderr
    expected = {(row["image"], row["label"]): row["iou"]
                for row in csv.DictReader(open(tmp_path / "ev" / "segmentation.csv"))}
    cats = {c["id"]: c for c in coco["categories"] if c["model"] == "lesion_segmenter"}
    gt = {"images": coco["images"], "categories": list(cats.values()), "annotations": []}
    for image in coco["images"]:
        truth = np.asarray(Image.open(DEMO_TRUTH / "lesion_segmenter" / f"{Path(image['legitseg_name']).stem}.png"))
        for cid, cat in cats.items():
            region = np.asfortranarray((truth == cat["class_index"]).astype(np.uint8))
            if region.any():
                rle = coco_mask.encode(region)
                gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": image["id"],
                                          "category_id": cid, "iscrowd": 0, "area": int(region.sum()),
                                          "bbox": coco_mask.toBbox(rle).tolist(),
                                          "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}})
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    coco_gt = COCO(str(tmp_path / "gt.json"))
    ours = [a for a in coco["annotations"] if a["category_id"] in cats]
    # COCOeval runs on the export's own annotations (one per region) ...
    per_region = COCOeval(coco_gt, coco_gt.loadRes(ours), iouType="segm")
    per_region.evaluate()
    per_region.accumulate()
    precision = per_region.eval["precision"]
    assert precision.shape[2] == len(cats) and (precision > 0).any()  # regions matched truth
    # ... and, joined per image and class, gives evaluate's IoU.
    joined = []
    for image in coco["images"]:
        for cid in cats:
            rles = [a["segmentation"] for a in ours if a["image_id"] == image["id"] and a["category_id"] == cid]
            if rles:
                merged = coco_mask.merge([{"size": s["size"], "counts": s["counts"].encode()} for s in rles])
                joined.append({"image_id": image["id"], "category_id": cid, "score": 1.0,
                               "segmentation": {"size": merged["size"], "counts": merged["counts"].decode()}})
    ev = COCOeval(coco_gt, coco_gt.loadRes(joined), iouType="segm")
    ev.params.maxDets = [1, 10, 100]
    ev.evaluate()
    names = {i["id"]: i["legitseg_name"] for i in coco["images"]}
    compared = 0
    for (image_id, cid), ious in ev.ious.items():
        if len(ious):
            iou = float(np.asarray(ious)[0, 0])
            assert iou == pytest.approx(float(expected[(names[image_id], cats[cid]["label"])]), abs=1e-9)
            compared += 1
    assert compared >= 12


@pytest.mark.parametrize("fmt_args", [["--format", "coco", "--polygons"], ["--format", "geojson"]])
def test_polygons_of_the_demo_rasterise_back_to_the_masks(out, tmp_path, fmt_args):
    dest = tmp_path / ("p.json" if "coco" in fmt_args else "g")
    assert invoke_cli("annotations", out, *fmt_args, "-o", dest).returncode == 0
    recs = records(out)
    if "coco" in fmt_args:
        data = json.loads(dest.read_text())
        cats = {c["id"]: c for c in data["categories"]}
        items = [(recs[i["legitseg_name"]], [(cats[a["category_id"]], a["segmentation"]) for a in data["annotations"]
                                            if a["image_id"] == i["id"]]) for i in data["images"]]
    else:
        import geojson

        items = []
        for name, rec in recs.items():
            fc = geojson.loads((dest / f"{name}.geojson").read_text())
            assert fc.is_valid, fc.errors()
            items.append((rec, [({"model": f["properties"]["model"], "label": f["properties"]["label"]}, f)
                                for f in fc["features"]]))
    for rec, shapes in items:
        for model in SEGMENTERS:
            mask = mask_of(out, rec, model)
            for index, label in enumerate(rec["models"][model]["area_fraction"], 1):
                union = np.zeros(mask.shape, np.uint8)
                for cat, seg in shapes:
                    if (cat["model"], cat["label"]) == (model, label):
                        union |= (rasterise_coco(seg, *mask.shape) if "coco" in fmt_args
                                  else rasterise_geojson(seg["geometry"], *mask.shape))
                np.testing.assert_array_equal(union, (mask == index).astype(np.uint8))


def rasterise_geojson(geometry: dict, h: int, w: int) -> np.ndarray:
    """Outer rings filled, holes cleared (pycocotools' rasteriser, pixel-edge coordinates)."""
    polys = [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]
    out = np.zeros((h, w), np.uint8)
    for rings in polys:
        filled = [rasterise_coco([[float(v) for p in ring for v in p]], h, w) for ring in rings]
        region = filled[0]
        for hole in filled[1:]:
            region &= 1 - hole
        out |= region
    return out


def test_geojson_validates_round_trips_and_states_its_coordinates(out, tmp_path):
    import geojson

    dest = tmp_path / "g"
    assert invoke_cli("annotations", out, "-f", "geojson", "-o", dest, "--models", "lesion_segmenter").returncode == 0
    files = sorted(dest.rglob("*.geojson"))
    assert len(files) == 12
    text = files[0].read_text()
    fc = geojson.loads(text)
    assert fc.is_valid and fc["type"] == "FeatureCollection"
    assert json.loads(geojson.dumps(fc)) == json.loads(text)  # round trip through the geojson package
    f = fc["features"][0]
    assert set(f["properties"]) >= {"label", "model", "area", "score", "run_id", "weights_sha256", "classification"}
    assert {x["properties"]["model"] for x in fc["features"]} == {"lesion_segmenter"}
    assert fc["properties"]["coordinates"].startswith("pixels: x right, y down")


# -- the command ----------------------------------------------------------------------
def test_errors_are_one_line_with_their_exit_code(out, tmp_path):
    cases = [
        (["annotations", tmp_path, "-f", "coco"], 2, "is not a legitseg output folder"),
        (["annotations", out, "-f", "geojson", "--polygons"], 2, "--polygons applies to --format coco only"),
        (["annotations", out, "-f", "coco", "--fractional"], 2, "--fractional applies to --format dicom-seg only"),
        (["annotations", out, "-f", "svg"], 2, "--format 'svg': choose coco, geojson, dicom-seg"),
        (["annotations", out, "-f", "coco", "--models", "nope"], 2, "--models: nope never ran into"),
        (["annotations", out, "-f", "coco", "-o", out / "masks" / "x.json"], 2, "belongs to the run"),
        (["annotations", out, "-f", "coco", "-o", tmp_path], 2, "is a folder"),
    ]
    for args, code, text in cases:
        r = invoke_cli(*args)
        assert r.returncode == code and text in r.stderr and r.stderr.startswith("legitseg: error: "), (args, r.stderr)
        assert r.stderr.count("\n") == 1


def test_an_empty_out_exits_6_and_a_missing_mask_exits_1_with_the_rest_written(out, tmp_path):
    empty_in = tmp_path / "empty"
    empty_in.mkdir()
    assert invoke_cli("run", empty_in, "-m", REPO / "models.yaml", "-o", tmp_path / "e", "--quiet").returncode == 0
    r = invoke_cli("annotations", tmp_path / "e", "-f", "coco")
    assert r.returncode == 6 and "holds no image records" in r.stderr
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "masks" / "lesion_segmenter" / "case03.jpg.png").unlink()
    r = invoke_cli("annotations", copy, "-f", "coco", "-q")
    assert r.returncode == 1, r.stderr
    assert "case03.jpg: lesion_segmenter: not exported: mask" in r.stderr
    data = json.loads((copy / "annotations" / "coco.json").read_text())
    assert len(data["images"]) == 12 and data["annotations"]


def test_a_failed_write_leaves_the_previous_file_and_no_temporaries(out, tmp_path, monkeypatch):
    dest = tmp_path / "c.json"
    dest.write_text("previous")
    import legitseg.annotations.coco as coco_module

    calls = {"n": 0}
    real = coco_module.dumps

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 20:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(coco_module, "dumps", flaky)
    r = invoke_cli("annotations", out, "-f", "coco", "-o", dest)
    assert r.returncode == 4 and "No space left on device" in r.stderr, r.stderr
    assert dest.read_text() == "previous" and sorted(p.name for p in tmp_path.iterdir()) == ["c.json"]


def test_memory_does_not_grow_with_the_number_of_images(out, tmp_path):
    """Streaming: exporting 300 images peaks at about the memory of exporting 20."""
    import tracemalloc

    from benchmarks.annotations_bench import big_out
    from legitseg.annotations.export import export

    peaks = {}
    for n in (20, 300):
        big = big_out(out, tmp_path / f"out-{n}", n)
        tracemalloc.start()
        stats = export(big, "coco", tmp_path / f"{n}.json")
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert stats.images == n and stats.files == 1
    assert peaks[300] < 1.3 * peaks[20], peaks
