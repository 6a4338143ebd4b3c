"""Real image files for tests, written with Pillow (and a hand-made PNG encoder for 16-bit RGB).

Nothing here uses OpenCV, so files are not produced by the library that legitseg
decodes them with. Contents are smooth shapes plus a little noise: enough
structure for a random-weights model to give masks that are neither empty nor full.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

ORIENTATION = 0x0112  # EXIF tag


def picture(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A (h, w, 3) uint8 RGB picture: a coloured gradient, two blobs and noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.stack([255 * x / max(w - 1, 1), 255 * y / max(h - 1, 1),
                    128 + 60 * np.sin(x / 7 + y / 11 + seed)], axis=-1)
    for _ in range(2):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.15, 0.35) * min(h, w)
        blob = ((y - cy) ** 2 + (x - cx) ** 2) < r ** 2
        img[blob] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 6, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def picture16(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A (h, w, 3) uint16 picture whose low bytes matter (so value/257 differs from value>>8)."""
    rng = np.random.default_rng(seed)
    base = picture(h, w, seed).astype(np.int64) * 257
    return np.clip(base + rng.integers(-300, 300, base.shape), 0, 65535).astype(np.uint16)


def save(path: Path, arr: np.ndarray, mode: str | None = None, orientation: int | None = None,
         **params) -> Path:
    """Write `arr` with Pillow; the format follows the suffix. `orientation` adds an EXIF tag."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr, mode) if mode else Image.fromarray(arr)
    if orientation is not None:
        exif = Image.Exif()
        exif[ORIENTATION] = orientation
        params["exif"] = exif.tobytes()
    im.save(path, **params)
    return path


def save_palette(path: Path, arr: np.ndarray, colors: int = 16) -> Path:
    """A palette ('P' mode) image, e.g. GIF or palette PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).quantize(colors).save(path)
    return path


def png16(arr: np.ndarray) -> bytes:
    """Encode (h, w) or (h, w, 3) uint16 as a 16-bit PNG (filter 0, big-endian samples)."""
    h, w = arr.shape[:2]
    color_type = 0 if arr.ndim == 2 else 2
    rows = arr.astype(">u2").reshape(h, -1).view(np.uint8).reshape(h, -1)
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rows], axis=1).tobytes()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


def save_png16(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png16(arr))
    return path


def image_set(root: Path) -> dict[str, Path]:
    """The formats and kinds SPEC 4.1 names, sizes not multiples of 32. Keys are output names."""
    files = {
        "photo.jpg": save(root / "photo.jpg", picture(75, 101, 1), quality=92),
        "photo.png": save(root / "photo.png", picture(60, 44, 2)),  # same stem as photo.jpg
        "scan.tif": save(root / "scan.tif", picture(53, 70, 3)),
        "lossless.webp": save(root / "lossless.webp", picture(49, 66, 4), lossless=True),
        "lossy.webp": save(root / "lossy.webp", picture(64, 50, 5), quality=80),
        "old.bmp": save(root / "old.bmp", picture(41, 58, 6)),
        "anim.gif": save_palette(root / "anim.gif", picture(47, 39, 7)),
        "palette.png": save_palette(root / "palette.png", picture(38, 61, 8), colors=12),
        "gray.jpg": save(root / "gray.jpg", picture(57, 83, 9)[..., 0], quality=90),
        "gray.png": save(root / "gray.png", picture(35, 47, 10)[..., 1]),
        "alpha.png": save(root / "alpha.png", np.dstack([picture(45, 71, 11),
                                                           picture(45, 71, 12)[..., 0]]), "RGBA"),
        "alpha.tif": save(root / "alpha.tif", np.dstack([picture(37, 52, 20),
                                                          picture(37, 52, 21)[..., 1]]), "RGBA"),
        "deep.png": save_png16(root / "deep.png", picture16(51, 43, 13)),
        "deepgray.png": save_png16(root / "deepgray.png", picture16(39, 55, 14)[..., 2]),
        "UPPER.JPEG": save(root / "UPPER.JPEG", picture(33, 90, 15), format="JPEG"),
        "visit2/rot6.jpg": save(root / "visit2/rot6.jpg", picture(62, 95, 16), orientation=6),
        "visit2/rot3.jpg": save(root / "visit2/rot3.jpg", picture(58, 77, 17), orientation=3),
        "visit2/rot8.jpg": save(root / "visit2/rot8.jpg", picture(43, 69, 18), orientation=8),
        "visit2/photo.jpg": save(root / "visit2/photo.jpg", picture(70, 40, 19)),
    }
    return files


# A fake MP4 as Google/Samsung motion photos append after the JPEG: an `ftyp` box, then an `mdat`
# box whose payload holds JPEG-like marker bytes (start-of-scan, end-of-image) on purpose.
FAKE_MP4 = (b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom"
            + b"\x00\x00\x00\x30mdat" + b"\xff\xd9\x00\x11" * 4 + b"\xff\xda\x00\x0c" + b"\x42" * 20)


def save_heic(path: Path, arr: np.ndarray, orientation: int | None = None, quality: int = 95) -> Path:
    """Write a HEIC with pillow-heif (libheif + x265), with an EXIF orientation if given."""
    import pillow_heif

    path.parent.mkdir(parents=True, exist_ok=True)
    params = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[ORIENTATION] = orientation
        params["exif"] = exif.tobytes()
    pillow_heif.from_pillow(Image.fromarray(arr)).save(path, quality=quality, **params)
    return path
