"""A file OpenCV decodes is resized in BGR and only each model's input converted to RGB (or gray):
every input is the same, bit for bit, as the one made from the photograph converted to RGB first,
and no full-size conversion happens unless something needs the photograph at its native size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from legitseg.engines.stages import PHOTO
from legitseg.images import decode
from legitseg.images.decode import INTERPOLATION, decode_rgb, load_image, prepare
from legitseg.images.decoded import Prep
from legitseg.images.pixels import PixelSource
from legitseg.images.sources import Source
from tests.images import picture, picture16, save, save_png16

MAX_PIXELS = 100_000_000
# Every interpolation, stretch and letterbox, RGB and gray, enlarged (to 384) and shrunk (to 96x160
# and 384 from the larger files; 2:1 exactly from the 768x768 file, OpenCV's fast `area` path).
RESIZED = [Prep(resize, size, interpolation, channels)
           for resize in ("stretch", "letterbox") for size in ((384, 384), (96, 160))
           for interpolation in INTERPOLATION for channels in (3, 1)]
NATIVE_GRAY = [Prep("pad", None, "linear", 1), Prep("tile", None, "linear", 1)]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bgr")
    return {
        "photo.jpg": save(root / "photo.jpg", picture(1013, 757, 1), quality=90),
        "square.jpg": save(root / "square.jpg", picture(768, 768, 2), quality=90),
        "rot6.jpg": save(root / "rot6.jpg", picture(533, 811, 3), orientation=6, quality=90),
        "rot8.jpg": save(root / "rot8.jpg", picture(301, 457, 4), orientation=8, quality=90),
        "gray.jpg": save(root / "gray.jpg", picture(419, 293, 5)[..., 0], quality=90),
        "rgb.png": save(root / "rgb.png", picture(241, 337, 6)),
        "gray.png": save(root / "gray.png", picture(157, 263, 7)[..., 1]),
        "deep.png": save_png16(root / "deep.png", picture16(257, 389, 8)),
        "deepgray.png": save_png16(root / "deepgray.png", picture16(199, 131, 9)[..., 2]),
        "scan.tif": save(root / "scan.tif", picture(123, 457, 10)),
        "lossy.webp": save(root / "lossy.webp", picture(311, 203, 11), quality=80),
    }


@pytest.fixture
def conversions(monkeypatch):
    """Every cv2.cvtColor call, through the decoder's reference to OpenCV: (h, w, code)."""
    calls: list[tuple[int, int, int]] = []
    real = decode.cv2.cvtColor

    def spy(src, code, *args, **kwargs):
        calls.append((src.shape[0], src.shape[1], code))
        return real(src, code, *args, **kwargs)

    monkeypatch.setattr(decode.cv2, "cvtColor", spy)
    return calls


def full_size(calls: list[tuple[int, int, int]], size: tuple[int, int]) -> list[tuple[int, ...]]:
    return [call for call in calls if call[:2] == size]


def load(path: Path, preps: list[Prep]):
    return load_image(Source(path, path.name), preps, MAX_PIXELS)


def old_inputs(path: Path, preps: list[Prep]) -> dict[Prep, np.ndarray]:
    """What every Prep got before: the photograph decoded to RGB, then prepared."""
    data = path.read_bytes()
    rgb = decode_rgb(data, decode.check_header(data, MAX_PIXELS))
    return {prep: prepare(rgb, prep) for prep in preps}


@pytest.mark.parametrize("name", ["photo.jpg", "square.jpg", "rot6.jpg", "rot8.jpg", "gray.jpg",
                                  "rgb.png", "gray.png", "deep.png", "deepgray.png", "scan.tif",
                                  "lossy.webp"])
def test_every_input_is_bit_identical_to_converting_first(files, name):
    preps = RESIZED + NATIVE_GRAY
    item = load(files[name], preps)
    want = old_inputs(files[name], preps)
    assert item.size == want[NATIVE_GRAY[0]].shape[:2]
    for prep in preps:
        got = item.inputs[prep]
        assert got.dtype == np.uint8 and got.flags.c_contiguous, prep
        assert got.shape == want[prep].shape, prep
        assert np.array_equal(got, want[prep]), f"{name}: {prep}"


def test_the_inputs_differ_from_a_bgr_photo_so_the_comparison_can_fail(files):
    """The pictures are coloured: an input left in BGR would not pass the test above."""
    prep = Prep("stretch", (384, 384), "linear", 3)
    got = load(files["photo.jpg"], [prep]).inputs[prep]
    assert not np.array_equal(got, got[..., ::-1])


@pytest.mark.parametrize("name", ["photo.jpg", "rot6.jpg", "deep.png"])
def test_with_the_photograph_kept_every_input_is_unchanged(files, name):
    preps = [PHOTO, Prep("pad", None, "nearest", 3), *RESIZED[:4]]
    item = load(files[name], preps)
    want = old_inputs(files[name], preps)
    for prep in preps:
        assert np.array_equal(item.inputs[prep], want[prep]), prep
    assert item.inputs[preps[1]] is item.inputs[PHOTO]  # one full-size RGB array, shared


def test_a_stretch_model_alone_converts_no_full_size_picture(files, conversions):
    """Before, the whole 1013x757 photo was converted BGR -> RGB, then resized."""
    prep = Prep("stretch", (384, 384), "linear", 3)
    item = load(files["photo.jpg"], [prep])
    assert item.size == (1013, 757) and item.inputs[prep].shape == (384, 384, 3)
    assert full_size(conversions, item.size) == []
    assert conversions == [(384, 384, decode.cv2.COLOR_BGR2RGB)]


@pytest.mark.parametrize("name", ["rot6.jpg", "gray.jpg", "deep.png", "gray.png"])
def test_resized_models_convert_no_full_size_picture(files, conversions, name):
    item = load(files[name], [p for p in RESIZED if p.size == (96, 160)])
    assert full_size(conversions, item.size) == []


def test_a_native_gray_model_converts_the_photo_to_gray_only(files, conversions):
    item = load(files["photo.jpg"], NATIVE_GRAY)
    assert full_size(conversions, item.size) == [(1013, 757, decode.cv2.COLOR_BGR2GRAY)] * 2


def test_the_photograph_is_converted_once_when_kept(files, conversions):
    item = load(files["photo.jpg"], [PHOTO, Prep("tile", None, "linear", 3), RESIZED[0]])
    assert full_size(conversions, item.size) == [(1013, 757, decode.cv2.COLOR_BGR2RGB)]


def test_in_memory_pixels_are_taken_as_rgb():
    """Arrays given through the API are RGB already: none of them is swapped."""
    rgb = picture(97, 61, 12)
    prep = Prep("stretch", (48, 32), "area", 3)
    item = PixelSource(Path("array[0]"), "array-0", rgb, "array[0]").load([prep, PHOTO], MAX_PIXELS)
    assert np.array_equal(item.inputs[PHOTO], rgb)
    assert np.array_equal(item.inputs[prep], prepare(rgb, prep))
