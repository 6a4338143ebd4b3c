"""SPEC 4.1: every image becomes oriented 8-bit RGB; one bad file is one ImageError."""

from __future__ import annotations

import hashlib
import io
import os
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from legitseg.errors import ImageError
from legitseg.images.decode import load_image
from legitseg.images.decoded import Prep
from legitseg.images.sources import Source
from tests.images import FAKE_MP4, picture, picture16, png16, save, save_heic, save_palette

MAX_PIXELS = 100_000_000


def decoded(path: Path, *preps: Prep, max_pixels: int = MAX_PIXELS):
    return load_image(Source(path, path.name), list(preps), max_pixels)


def rgb_of(path: Path) -> np.ndarray:
    """The decoded picture at native size (a pad Prep keeps it)."""
    return decoded(path, PAD).inputs[PAD]


PAD = Prep("pad", None, "linear", 3)


# -- 16-bit --------------------------------------------------------------------------------
# value/257 rounded: 128/257 = 0.498 -> 0, 129/257 = 0.502 -> 1, 32767 -> 127, 32768 -> 128,
# 65406 -> 254.498 -> 254, 65407 -> 254.502 -> 255.
SAMPLES = np.array([0, 128, 129, 257, 385, 386, 32767, 32768, 65406, 65407, 65535], np.uint16)
EIGHT_BIT = np.array([0, 0, 1, 1, 1, 2, 127, 128, 254, 255, 255], np.uint8)


def test_16_bit_gray_png_is_scaled_by_257_and_rounded(tmp_path):
    path = tmp_path / "g.png"
    path.write_bytes(png16(np.tile(SAMPLES, (3, 1))))
    rgb = rgb_of(path)
    assert rgb.dtype == np.uint8 and rgb.shape == (3, len(SAMPLES), 3)
    for c in range(3):
        assert rgb[1, :, c].tolist() == EIGHT_BIT.tolist()


def test_16_bit_rgb_png_keeps_channel_order(tmp_path):
    arr = np.stack([SAMPLES, SAMPLES[::-1], np.full_like(SAMPLES, 32768)], axis=-1)[None]
    path = tmp_path / "c.png"
    path.write_bytes(png16(arr))
    rgb = rgb_of(path)
    assert rgb[0, :, 0].tolist() == EIGHT_BIT.tolist()
    assert rgb[0, :, 1].tolist() == EIGHT_BIT[::-1].tolist()
    assert set(rgb[0, :, 2].tolist()) == {128}


def test_16_bit_picture_matches_value_over_257(tmp_path):
    arr = picture16(23, 31, 5)
    path = tmp_path / "p.png"
    path.write_bytes(png16(arr))
    want = np.round(arr / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(rgb_of(path), want)
    assert not np.array_equal(want, (arr >> 8).astype(np.uint8))  # the test tells them apart


def test_16_bit_gray_tiff(tmp_path):
    arr = np.tile(SAMPLES, (2, 1))
    path = tmp_path / "g.tif"
    Image.fromarray(arr).save(path)  # Pillow writes I;16
    np.testing.assert_array_equal(rgb_of(path)[..., 0], np.tile(EIGHT_BIT, (2, 1)))


def test_png16_helper_is_a_valid_png(tmp_path):
    """Pillow reads our 16-bit gray encoder's output back unchanged (guards the helper)."""
    arr = picture16(9, 7)[..., 0]
    with Image.open(io.BytesIO(png16(arr))) as im:
        np.testing.assert_array_equal(np.asarray(im), arr)


# -- gray, alpha, palette ----------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tif", ".webp"])
def test_grayscale_is_replicated_to_three_channels(tmp_path, suffix):
    gray = picture(21, 34, 1)[..., 0]
    path = save(tmp_path / f"g{suffix}", gray, **({"lossless": True} if suffix == ".webp" else {}))
    rgb = rgb_of(path)
    assert rgb.shape == (21, 34, 3)
    for c in range(3):
        np.testing.assert_array_equal(rgb[..., c], gray)


def test_grayscale_jpeg(tmp_path):
    gray = picture(24, 40, 2)[..., 1]
    path = save(tmp_path / "g.jpg", gray, quality=95)
    rgb = rgb_of(path)
    with Image.open(path) as im:
        want = np.asarray(im)
    for c in range(3):
        np.testing.assert_array_equal(rgb[..., c], want)


@pytest.mark.parametrize("suffix, params", [
    (".png", {}),
    (".webp", {"lossless": True, "exact": True}),  # exact: keep RGB under alpha 0
    (".tif", {}),  # unassociated alpha (ExtraSamples = 2)
])
def test_alpha_is_dropped_not_blended(tmp_path, suffix, params):
    rgb = picture(19, 27, 3)
    alpha = np.tile(np.linspace(0, 255, 27).astype(np.uint8), (19, 1))  # includes fully transparent
    path = save(tmp_path / f"a{suffix}", np.dstack([rgb, alpha]), "RGBA", **params)
    np.testing.assert_array_equal(rgb_of(path), rgb)


@pytest.mark.parametrize("orientation", [None, 6])
def test_rgba_tiff_compressed_and_oriented(tmp_path, orientation):
    rgb = picture(12, 29, 6)
    alpha = np.full((12, 29), 128, np.uint8)
    path = save(tmp_path / "a.tiff", np.dstack([rgb, alpha]), "RGBA", orientation=orientation,
                compression="tiff_lzw")
    np.testing.assert_array_equal(rgb_of(path), ORIENTED[orientation or 1](rgb))


def test_gray_with_alpha(tmp_path):
    gray = picture(15, 22, 4)[..., 2]
    path = save(tmp_path / "la.png", np.dstack([gray, np.full_like(gray, 7)]), "LA")
    np.testing.assert_array_equal(rgb_of(path), np.repeat(gray[..., None], 3, axis=2))


@pytest.mark.parametrize("suffix", [".png", ".gif", ".bmp", ".tif"])
def test_palette_images_are_looked_up(tmp_path, suffix):
    path = save_palette(tmp_path / f"p{suffix}", picture(26, 33, 5), colors=9)
    with Image.open(path) as im:
        assert im.mode == "P"
        want = np.asarray(im.convert("RGB"))
    np.testing.assert_array_equal(rgb_of(path), want)


# -- EXIF orientation ------------------------------------------------------------------------
ORIENTED = {  # EXIF orientation -> the transform that shows the picture upright
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),  # rotate 90 degrees clockwise
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


@pytest.mark.parametrize("orientation", sorted(ORIENTED))
def test_exif_orientation_is_applied_png(tmp_path, orientation):
    arr = picture(14, 23, orientation)
    path = save(tmp_path / "o.png", arr, orientation=orientation)
    rgb = rgb_of(path)
    np.testing.assert_array_equal(rgb, ORIENTED[orientation](arr))
    with Image.open(path) as im:  # Pillow agrees on what each orientation means
        np.testing.assert_array_equal(np.asarray(ImageOps.exif_transpose(im).convert("RGB")), rgb)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied_jpeg(tmp_path, orientation):
    path = save(tmp_path / "o.jpg", picture(30, 47, 9), orientation=orientation, quality=95)
    item = decoded(path, PAD)
    with Image.open(path) as im:
        want = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    assert item.size == want.shape[:2] == ((47, 30) if orientation in (6, 8) else (30, 47))
    diff = np.abs(item.inputs[PAD].astype(int) - want)
    assert diff.max() <= 2 and diff.mean() < 0.05  # two JPEG decoders, same libjpeg maths


def test_exif_orientation_is_applied_before_a_stretch_resize(tmp_path):
    path = save(tmp_path / "o.png", picture(20, 40, 2), orientation=6)
    stretch = Prep("stretch", (24, 16), "nearest", 3)
    item = decoded(path, stretch, PAD)
    assert item.size == (40, 20)
    assert item.inputs[stretch].shape == (24, 16, 3)
    assert item.inputs[PAD].shape == (40, 20, 3)


# -- the rest of load_image ----------------------------------------------------------------------
def test_sha256_is_of_the_file_bytes(tmp_path):
    path = save(tmp_path / "a.jpg", picture(10, 12))
    assert decoded(path).sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_stretch_uses_height_width_order(tmp_path):
    path = save(tmp_path / "a.png", picture(33, 50))
    prep = Prep("stretch", (17, 40), "linear", 3)
    item = decoded(path, prep)
    assert item.size == (33, 50)
    assert item.inputs[prep].shape == (17, 40, 3) and item.inputs[prep].dtype == np.uint8


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_text("hello, not an image\n"), "not a recognised image format"),
    (lambda p: p.write_bytes(b""), "empty file"),
    (lambda p: p.write_bytes(save(p, picture(120, 160)).read_bytes()[:3000]), "truncated JPEG"),
    (lambda p: p.mkdir(), "is a folder"),
])
def test_bad_files_raise_image_error(tmp_path, make, message):
    path = tmp_path / "x.jpg"
    make(path)
    with pytest.raises(ImageError, match=message):
        decoded(path)


def test_a_bad_file_keeps_its_sha256(tmp_path):
    path = tmp_path / "x.jpg"
    path.write_text("text")
    with pytest.raises(ImageError) as info:
        decoded(path)
    assert info.value.sha256 == hashlib.sha256(b"text").hexdigest()


def test_truncated_png(tmp_path):
    path = save(tmp_path / "t.png", picture(40, 40))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ImageError, match="truncated PNG"):
        decoded(path)


def test_max_pixels_refuses_before_decoding(tmp_path):
    path = save(tmp_path / "big.png", picture(30, 40))
    with pytest.raises(ImageError, match="above --max-pixels"):
        decoded(path, max_pixels=30 * 40 - 1)
    assert decoded(path, max_pixels=30 * 40).size == (30, 40)


# -- only regular files are read --------------------------------------------------------------
def test_a_fifo_named_like_an_image_fails_without_blocking(tmp_path):
    path = tmp_path / "x.jpg"
    os.mkfifo(path)
    outcome: list[BaseException | None] = []

    def load() -> None:
        try:
            decoded(path)
            outcome.append(None)
        except BaseException as err:  # noqa: BLE001 - handed to the test thread
            outcome.append(err)

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(timeout=10)
    if worker.is_alive():  # unblock the reader so the daemon thread can end
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        pytest.fail("reading a FIFO blocked")
    assert isinstance(outcome[0], ImageError) and str(outcome[0]) == "not a regular file (FIFO)"


def test_a_socket_named_like_an_image_fails(tmp_path):
    path = tmp_path / "s.png"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
        with pytest.raises(ImageError, match=r"not a regular file \(socket\)"):
            decoded(path)


def test_a_character_device_is_refused():
    with pytest.raises(ImageError, match=r"not a regular file \(character device\)"):
        decoded(Path("/dev/null"))


# -- bytes after the image, and truncation found by parsing ----------------------------------------
@pytest.mark.parametrize("params", [{"quality": 90}, {"quality": 90, "progressive": True}],
                         ids=["baseline", "progressive"])
def test_a_motion_photo_jpeg_decodes_like_the_still(tmp_path, params):
    still = save(tmp_path / "still.jpg", picture(60, 80, 3), **params)
    motion = tmp_path / "PXL_0001.MP.jpg"
    motion.write_bytes(still.read_bytes() + FAKE_MP4)
    np.testing.assert_array_equal(rgb_of(motion), rgb_of(still))


def test_a_jpeg_with_an_exif_thumbnail_and_trailing_bytes_decodes(tmp_path):
    thumb = io.BytesIO()
    Image.fromarray(picture(8, 8, 1)).save(thumb, "JPEG")  # its own SOI/EOI inside APP1
    still = save(tmp_path / "s.jpg", picture(30, 40, 2), quality=90,
                 exif=b"Exif\x00\x00" + b"\x00" * 8 + thumb.getvalue())
    path = tmp_path / "t.jpg"
    path.write_bytes(still.read_bytes() + b"trailing metadata \xff\xda\x00")
    np.testing.assert_array_equal(rgb_of(path), rgb_of(still))


def test_a_png_with_bytes_after_iend_decodes(tmp_path):
    plain = save(tmp_path / "p.png", picture(20, 30, 4))
    path = tmp_path / "q.png"
    path.write_bytes(plain.read_bytes() + b"\x00" * 64 + b"appended by a tool")
    np.testing.assert_array_equal(rgb_of(path), rgb_of(plain))


@pytest.mark.parametrize("cut", [0.3, 0.9, -2])
def test_a_truncated_motion_photo_is_still_refused(tmp_path, cut):
    data = save(tmp_path / "s.jpg", picture(60, 80, 3), quality=90).read_bytes()
    end = int(len(data) * cut) if cut > 0 else len(data) + cut  # -2: only the EOI marker is missing
    path = tmp_path / "t.jpg"
    path.write_bytes(data[:end])
    with pytest.raises(ImageError, match="truncated JPEG"):
        decoded(path)


def _scan_end_by_loop(data: bytes, pos: int) -> int | None:
    """The marker search as the JPEG standard words it, one 0xFF at a time (the reference)."""
    while True:
        pos = data.find(b"\xff", pos)
        if pos < 0 or pos + 1 >= len(data):
            return None
        if data[pos + 1] == 0x00 or 0xD0 <= data[pos + 1] <= 0xD7:  # stuffed byte, restart marker
            pos += 2
            continue
        return pos


def test_the_scan_end_search_finds_what_the_byte_loop_finds():
    from legitseg.images.containers import _scan_end

    rng = np.random.default_rng(5)
    alphabet = np.array([0xFF, 0x00, 0xD0, 0xD7, 0xD8, 0xD9, 0xC4, 0x12], np.uint8)
    for _ in range(3000):  # short strings dense in 0xFF, stuffing and restart markers
        data = alphabet[rng.integers(0, len(alphabet), int(rng.integers(0, 12)))].tobytes()
        for pos in range(len(data) + 1):
            assert _scan_end(data, pos) == _scan_end_by_loop(data, pos), (data.hex(), pos)
    photo = io.BytesIO()
    Image.fromarray(picture(300, 400, 9)).save(photo, "JPEG", quality=95, restart_marker_blocks=4)
    data = photo.getvalue()
    sos = data.index(b"\xff\xda")
    assert _scan_end(data, sos + 2) == _scan_end_by_loop(data, sos + 2) == len(data) - 2  # the EOI


def test_a_png_cut_inside_its_last_chunk_is_refused(tmp_path):
    data = save(tmp_path / "p.png", picture(20, 30, 4)).read_bytes()
    path = tmp_path / "t.png"
    path.write_bytes(data[:-6])  # IEND's type is there, its CRC is not
    with pytest.raises(ImageError, match="truncated PNG"):
        decoded(path)


# -- HEIC / HEIF ------------------------------------------------------------------------------------
@pytest.mark.parametrize("orientation", [None, 6, 3])
def test_heic_decodes_oriented_like_the_same_picture_as_jpeg(tmp_path, orientation):
    arr = picture(48, 80, 7)
    heic = rgb_of(save_heic(tmp_path / "IMG_0001.HEIC", arr, orientation=orientation))
    jpeg = rgb_of(save(tmp_path / "IMG_0001.jpg", arr, orientation=orientation, quality=95))
    assert heic.shape == jpeg.shape == ((80, 48, 3) if orientation == 6 else (48, 80, 3))
    diff = np.abs(heic.astype(int) - jpeg.astype(int))
    assert diff.mean() < 6  # two lossy codecs of one picture
    upside_down = np.abs(heic.astype(int) - ORIENTED[3](jpeg).astype(int))
    assert upside_down.mean() > 20  # the tolerance tells a wrongly turned picture apart


def test_heic_header_is_checked_against_max_pixels(tmp_path):
    path = save_heic(tmp_path / "a.heif", picture(30, 40, 1))
    with pytest.raises(ImageError, match="30 = 1,200 pixels, above --max-pixels"):
        decoded(path, max_pixels=1199)


def test_truncated_heic_is_refused(tmp_path):
    data = save_heic(tmp_path / "a.heic", picture(30, 40, 1)).read_bytes()
    path = tmp_path / "t.heic"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="HEIF"):
        decoded(path)


# -- names, Pillow's guard, ImageError ---------------------------------------------------------------
def test_a_file_with_an_undecodable_name_decodes(tmp_path):
    data = save(tmp_path / "a.png", picture(10, 12, 3)).read_bytes()
    raw = os.fsencode(tmp_path) + b"/caf\xe9.png"
    with open(raw, "wb") as f:
        f.write(data)
    path = Path(os.fsdecode(raw))
    np.testing.assert_array_equal(load_image(Source(path, "caf%E9.png"), [PAD], MAX_PIXELS).inputs[PAD],
                                  rgb_of(tmp_path / "a.png"))


def test_pillows_decompression_bomb_guard_stays_on():
    assert Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS > 0


def test_image_error_takes_its_sha256_as_a_keyword():
    err = ImageError("bad", sha256="ab" * 32)
    assert (str(err), err.sha256) == ("bad", "ab" * 32)
    assert ImageError("no hash").sha256 is None
