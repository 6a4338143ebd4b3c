"""`decode: reduced` (docs/manifest.md): large JPEGs decoded at 1/2-1/8 for the models that ask,
masks still at the photo's full, upright size; a setting of its own in the digest and run.json."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from legitseg.errors import ImageError, ManifestError
from legitseg.images.decode import check_header, decode_rgb, load_image
from legitseg.images.decoded import Prep
from legitseg.images.reduced import decode_reduced, reduction, upright_size
from legitseg.images.sources import Source
from legitseg.manifest.spec import load_manifest
from legitseg.output.records import settings_digest
from tests.conftest import invoke_cli
from tests.images import picture, save

STRETCH = Prep("stretch", (64, 64), "linear", 3)
REDUCED = Prep("stretch", (64, 64), "linear", 3, reduced=True)


@pytest.mark.parametrize("size, input_size, k", [
    ((3000, 4000), (384, 384), 4),  # 1/8 would be 375 high, below 384
    ((3000, 4000), (256, 256), 8),
    ((768, 1024), (384, 384), 2),
    ((768, 1024), (512, 512), 1),  # 1/2 is 384 high: below the input, so no reduction
    ((767, 1023), (384, 512), 2),  # rounded up, as libjpeg does: 384 x 512
    ((9, 9), (2, 2), 8),
])
def test_the_largest_reduction_that_still_covers_the_input(size, input_size, k):
    assert reduction(size, input_size) == k


def test_an_exif_turned_jpeg_keeps_its_full_upright_size_and_orientation(tmp_path):
    rgb = picture(600, 800, 3)
    path = save(tmp_path / "turned.jpg", rgb, orientation=6, quality=95)  # 90 degrees: upright 800x600
    data = path.read_bytes()
    assert upright_size(data) == (800, 600)
    full = decode_rgb(data, check_header(data, 10**8))
    assert full.shape[:2] == (800, 600)
    item = load_image(Source(path, "turned.jpg"), [REDUCED, STRETCH], 10**8)
    assert item.size == (800, 600)  # the mask's size: the whole photo, upright
    small = decode_reduced(data, 8, (800, 600))
    assert small.shape == (100, 75, 3)
    # the same picture, the same way up: the 1/8 decode is close to the full decode shrunk
    shrunk = cv2.resize(full, (75, 100), interpolation=cv2.INTER_AREA)
    assert np.abs(small.astype(int) - shrunk.astype(int)).mean() < 4
    a, b = item.inputs[REDUCED].astype(int), item.inputs[STRETCH].astype(int)
    assert a.shape == b.shape == (64, 64, 3)
    assert 0 < np.abs(a - b).mean() < 4  # a slightly different downscale, not another picture


def test_only_the_models_that_ask_are_reduced_and_the_others_see_the_full_decode(tmp_path):
    path = save(tmp_path / "big.jpg", picture(640, 640, 1), quality=92)
    src = Source(path, "big.jpg")
    both = load_image(src, [REDUCED, STRETCH], 10**8)
    alone = load_image(src, [REDUCED], 10**8)
    plain = load_image(src, [STRETCH], 10**8)
    np.testing.assert_array_equal(both.inputs[REDUCED], alone.inputs[REDUCED])  # whatever runs beside it
    np.testing.assert_array_equal(both.inputs[STRETCH], plain.inputs[STRETCH])
    assert both.size == alone.size == plain.size == (640, 640)
    small_png = save(tmp_path / "small.png", picture(640, 640, 1))  # not a JPEG: the ordinary decode
    np.testing.assert_array_equal(load_image(Source(small_png, "s.png"), [REDUCED], 10**8).inputs[REDUCED],
                                  load_image(Source(small_png, "s.png"), [STRETCH], 10**8).inputs[STRETCH])


def test_a_jpeg_cut_inside_its_data_is_an_image_error(tmp_path):
    data = save(tmp_path / "big.jpg", picture(640, 640, 2)).read_bytes()
    with pytest.raises(ImageError):
        decode_reduced(data[:200] + data[-2:], 8, (640, 640))


def test_run_with_decode_reduced(kit, tmp_path):
    kit.add("plain", input_size=(64, 64))
    kit.add("small", input_size=(64, 64), decode="reduced", seed=0)
    manifest = kit.write()
    photos = tmp_path / "img"
    save(photos / "a.jpg", picture(600, 800, 4), orientation=6)
    save(photos / "b.jpg", picture(48, 40, 5))  # smaller than 2x the input: decoded in full
    out = tmp_path / "out"
    r = invoke_cli("run", photos, "-m", manifest, "-o", out, "--backend", "torch", "--save-probabilities")
    assert r.returncode == 0, r.stderr
    run = json.loads((out / "run.json").read_text())
    assert run["models"]["small"]["decode"] == "reduced" and run["models"]["plain"]["decode"] == "full"
    specs = load_manifest(manifest).models
    assert settings_digest(specs["small"]) != settings_digest(specs["plain"].model_copy(update={"name": "small"}))
    assert settings_digest(specs["plain"]) == settings_digest(specs["plain"].model_copy(update={"decode": "full"}))
    rec = json.loads((out / "records" / "a.jpg.json").read_text())
    assert rec["size"] == [800, 600]
    for name in ("small", "plain"):
        mask = cv2.imread(str(out / rec["models"][name]["mask"]), cv2.IMREAD_UNCHANGED)
        assert mask.shape == (800, 600)  # masks at the photo's full, upright size
    # Same weights (seed 0): the reduced decode moves probabilities a little, never the picture.
    p = {n: np.load(out / rec["models"][n]["probability_map"])["probabilities"].astype(np.float32)
         for n in ("small", "plain")}
    assert 0 < np.abs(p["small"] - p["plain"]).max() < 0.2
    b = json.loads((out / "records" / "b.jpg.json").read_text())
    pb = {n: np.load(out / b["models"][n]["probability_map"])["probabilities"] for n in ("small", "plain")}
    np.testing.assert_array_equal(pb["small"], pb["plain"])  # no reduction fits: the same decode


@pytest.mark.parametrize("resize", ["pad", "letterbox", "tile"])
def test_decode_reduced_is_refused_for_models_that_see_the_photos_own_pixels(kit, resize):
    fields = {"pad": {}, "letterbox": {"input_size": [64, 64]}, "tile": {"tile_size": [64, 64]}}[resize]
    kit.add("m", resize=resize, **fields)
    kit.models["m"]["decode"] = "reduced"
    with pytest.raises(ManifestError, match=f"'decode: reduced' needs resize 'stretch', not '{resize}'"):
        load_manifest(kit.write())
