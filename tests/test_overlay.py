"""`run --overlay`: the photograph (EXIF-oriented) with each label filled and outlined in the
manifest's colours, one JPEG per image and model, named by the record; resume and overlays.

Real tiny models (ModelKit) and real image files written with Pillow; the reference
photograph is decoded with Pillow (not OpenCV, which legitseg uses).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps
from typer.testing import CliRunner

from legitseg.cli import app
from legitseg.errors import ManifestError
from legitseg.manifest.spec import load_manifest, parse_manifest
from legitseg.output.overlay import ALPHA, PALETTE, Style, outline_width, segmentation_overlay
from legitseg.output.records import ImageRecord
from tests.conftest import ModelKit
from tests.images import picture, save

MAGENTA, GREEN = (255, 0, 255), (0, 255, 0)
# name -> (height, width) as stored, EXIF orientation
PHOTOS = {"plain.png": ((96, 128), None), "rotated.jpg": ((80, 120), 6), "square.jpg": ((100, 100), None)}


def invoke(*args) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


def reference_rgb(path: Path) -> np.ndarray:
    """The photograph upright, decoded by Pillow."""
    with Image.open(path) as im:
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


def record(out: Path, name: str) -> ImageRecord:
    return ImageRecord.from_json(json.loads((out / "records" / f"{name}.json").read_text()))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("overlay")
    kit = ModelKit(root)
    kit.add("seg", classes=3, labels=["background", "scale", "plaque"],
            colors={"scale": "#ff00ff", "plaque": [0, 255, 0]}, seed=1)
    kit.add("sev", task="severity", arch=None, classes=4)
    manifest = kit.write()
    photos = root / "photos"
    for i, (name, ((h, w), orientation)) in enumerate(PHOTOS.items()):
        save(photos / name, picture(h, w, seed=i), orientation=orientation,
             **({"quality": 95} if name.endswith(".jpg") else {}))
    out = root / "out"
    r = invoke("run", photos, "-o", out, "-m", manifest, "--device", "cpu", "--backend", "torch", "--overlay")
    assert r.exit_code == 0, r.output
    return root, manifest, photos, out


def test_run_overlay_writes_one_overlay_per_image_and_model_named_by_the_record(setup):
    _, _, photos, out = setup
    for name in PHOTOS:
        rec = record(out, name)
        for model in ("seg", "sev"):
            entry = rec.models[model]
            assert entry.ok and entry.overlay == f"overlays/{model}/{name}.jpg"
            drawn = cv2.imread(str(out / entry.overlay), cv2.IMREAD_COLOR)
            assert drawn is not None and drawn.shape[:2] == tuple(rec.size) == reference_rgb(photos / name).shape[:2]
    assert sorted(p.relative_to(out).as_posix() for p in (out / "overlays").rglob("*.jpg")) == sorted(
        f"overlays/{m}/{n}.jpg" for m in ("seg", "sev") for n in PHOTOS)
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * len(PHOTOS)
    assert json.loads((out / "run.json").read_text())["models"]["seg"]["colors"] == {
        "scale": "#ff00ff", "plaque": "#00ff00"}


@pytest.mark.parametrize("name", list(PHOTOS))
def test_filled_region_equals_the_mask_within_the_outline(setup, name):
    """Exact on the drawing, and the JPEG on disk is that drawing (of the upright photograph)."""
    _, manifest, photos, out = setup
    photo = reference_rgb(photos / name)
    mask = cv2.imread(str(out / "masks" / "seg" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
    assert mask.shape == photo.shape[:2]
    present = [v for v in (1, 2) if (mask == v).sum() > 50]
    assert present, "the model's mask is too small for the test to mean anything"
    style = Style.of(load_manifest(manifest).models["seg"])
    assert style.colours == (MAGENTA, GREEN)
    drawn = segmentation_overlay(photo, mask, style)
    t = outline_width(photo.shape)
    band = np.ones((2 * t + 1, 2 * t + 1), np.uint8)  # the outline reaches t/2 (rounded up) each side
    colour_of = np.array([(0, 0, 0), MAGENTA, GREEN], np.float32)
    for v in (1, 2):
        region = (mask == v).astype(np.uint8)
        # The outline follows the region's edge, the photograph's border included.
        inner = cv2.erode(region, band, borderType=cv2.BORDER_CONSTANT, borderValue=0).astype(bool)
        want = np.clip((1 - ALPHA) * photo[inner] + ALPHA * colour_of[v] + 0.5, 0, 255).astype(np.uint8)
        assert np.abs(drawn[inner].astype(int) - want).max() <= 1
        edge = region.astype(bool) & ~inner
        if edge.any():
            assert (drawn[edge] == colour_of[v]).all(1).mean() > 0.5  # the outline, in the manifest's colour
    outside = ~cv2.dilate((mask > 0).astype(np.uint8), band).astype(bool)
    assert np.array_equal(drawn[outside], photo[outside])
    # The file: the same drawing through JPEG (and through OpenCV's decode of the photograph).
    on_disk = cv2.cvtColor(cv2.imread(str(out / "overlays" / "seg" / f"{name}.jpg")), cv2.COLOR_BGR2RGB)
    assert on_disk.shape == drawn.shape
    # Random weights give fragmented masks (outlines everywhere): JPEG's worst case.
    assert np.abs(on_disk.astype(int) - drawn).mean() < 6
    # ...and not the photograph stored sideways, nor the bare photograph.
    plain = np.abs(on_disk.astype(int) - photo)[mask > 0].mean()
    assert plain > 3 * np.abs(on_disk.astype(int) - drawn)[mask > 0].mean()


def test_severity_overlay_writes_grade_and_score_in_the_corner(setup):
    _, _, photos, out = setup
    name = "rotated.jpg"
    entry = record(out, name).models["sev"]
    photo = reference_rgb(photos / name)
    drawn = cv2.cvtColor(cv2.imread(str(out / entry.overlay)), cv2.COLOR_BGR2RGB)
    diff = np.abs(drawn.astype(int) - photo).sum(2) > 60
    ys, xs = np.nonzero(diff)
    assert ys.size > 100 and ys.max() < photo.shape[0] // 2 and xs.min() == 0  # a box at the top left
    assert diff[photo.shape[0] // 2:].mean() < 0.01  # the rest is the photograph


def test_rerun_without_overlay_does_not_redo_and_keeps_the_overlays(setup):
    _, manifest, photos, out = setup
    before = {n: record(out, n).run_id for n in PHOTOS}
    stamp = (out / "overlays" / "seg" / "plain.png.jpg").stat().st_mtime_ns
    r = invoke("run", photos, "-o", out, "-m", manifest, "--device", "cpu", "--backend", "torch")
    assert r.exit_code == 0, r.output
    assert "0 to process, 3 already done" in r.output
    assert {n: record(out, n).run_id for n in PHOTOS} == before
    assert record(out, "plain.png").models["seg"].overlay == "overlays/seg/plain.png.jpg"
    assert (out / "overlays" / "seg" / "plain.png.jpg").stat().st_mtime_ns == stamp


def test_rerun_with_overlay_redoes_only_images_without_overlays(setup, tmp_path):
    _, manifest, photos, _ = setup
    out = tmp_path / "out"
    args = ["run", photos, "-o", out, "-m", manifest, "--device", "cpu", "--backend", "torch"]
    assert invoke(*args).exit_code == 0
    assert not (out / "overlays").exists() and record(out, "plain.png").models["seg"].overlay is None
    r = invoke(*args, "--overlay")
    assert r.exit_code == 0, r.output
    assert "3 to process, 0 already done" in r.output
    assert all(record(out, n).models[m].overlay for n in PHOTOS for m in ("seg", "sev"))
    r = invoke(*args, "--overlay")
    assert "0 to process, 3 already done" in r.output


def test_overlays_are_dropped_when_an_image_is_redone_without_them(setup, tmp_path):
    _, manifest, photos, _ = setup
    out = tmp_path / "out"
    args = ["run", photos, "-o", out, "-m", manifest, "--device", "cpu", "--backend", "torch"]
    assert invoke(*args, "--overlay").exit_code == 0
    assert invoke(*args, "--overwrite").exit_code == 0
    assert not list((out / "overlays").rglob("*.jpg"))  # a stale overlay would show an older result
    assert record(out, "plain.png").models["seg"].overlay is None


def test_engine_keeps_the_photograph_only_when_asked(setup):
    """Without --overlay the engine carries no RGB past the forward pass (run as fast as before)."""
    import torch

    from legitseg.engines.local import Engine
    from legitseg.images.sources import Source
    from legitseg.inference.torch_runner import TorchRunner
    from legitseg.models.factory import load_model

    _, manifest, photos, _ = setup
    runner = TorchRunner(load_model(load_manifest(manifest).models["seg"]), torch.device("cpu"))
    sources = [Source(photos / "rotated.jpg", "rotated.jpg")]
    for keep in (False, True):
        engine = Engine([runner], batch_size=1, workers=0, post_threads=1, save_probabilities=False,
                        max_pixels=10**8, stop=threading.Event(), keep_rgb=keep)
        (result,) = engine.process(sources)
        if keep:
            assert result.rgb.shape == (120, 80, 3)  # upright: the stored 80x120 turned by EXIF 6
            assert np.abs(result.rgb.astype(int) - reference_rgb(photos / "rotated.jpg")).mean() < 3
        else:
            assert result.rgb is None


def test_default_colours_are_the_palette():
    style = Style.from_labels("m", "segmentation", ["background", "a", "b"], {"b": (1, 2, 3)})
    assert style.colours == (PALETTE[0], (1, 2, 3))
    assert style.hex_colours() == {"a": "#e69f00", "b": "#010203"}


MANIFEST = """version: 1
models:
  seg:
    task: {task}
    {arch}encoder: tu-test_resnet.r160_in1k
    classes: 2
    labels: [background, scale]
    weights: w.safetensors
    sha256: "{sha}"
    input_size: [64, 64]
    colors: {colors}
"""


@pytest.mark.parametrize("task, colors, message", [
    ("segmentation", '{scale: "#12345"}', "colour of label 'scale' is '#12345'; write \"#rrggbb\" or [r, g, b]"),
    ("segmentation", "{scale: [0, 256, 0]}", "whole numbers 0..255"),
    ("segmentation", "{scale: [0, 255]}", "colour of label 'scale' is [0, 255]"),
    ("segmentation", '{background: "#000000"}', "label(s) 'background' not among the drawn labels scale"),
    ("segmentation", '{scal: "#000000"}', "label(s) 'scal' not among"),
    ("segmentation", '"#ff0000"', "expected a mapping of label name"),
    ("severity", '{scale: "#ff0000"}', "colors only apply to task 'segmentation'"),
])
def test_manifest_colors_are_validated(tmp_path, task, colors, message):
    (tmp_path / "w.safetensors").write_bytes(b"x")
    text = MANIFEST.format(task=task, arch="arch: Unet\n    " if task == "segmentation" else "",
                           sha="0" * 64, colors=colors)
    with pytest.raises(ManifestError) as err:
        parse_manifest(text, tmp_path / "models.yaml")
    assert "model 'seg'" in str(err.value) and "colors" in str(err.value) and message in str(err.value)


def test_manifest_colors_accept_hex_and_triples(tmp_path):
    (tmp_path / "w.safetensors").write_bytes(b"x")
    text = MANIFEST.format(task="segmentation", arch="arch: Unet\n    ", sha="0" * 64, colors='{scale: "#FF8000"}')
    spec = parse_manifest(text, tmp_path / "models.yaml").models["seg"]
    assert spec.colors == {"scale": (255, 128, 0)} and Style.of(spec).colours == ((255, 128, 0),)
