"""Read, check and decode one image to 8-bit RGB (SPEC 4.1), then resize it per model (4.2).

Runs in background threads: OpenCV releases the GIL while decoding and resizing.
Every problem with one image becomes an ImageError whose message names it; the
run records it and goes on.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from legitseg.errors import ImageError
from legitseg.pipeline.sources import Source

# Header sizes are checked against --max-pixels by us; Pillow only reads headers here.
Image.MAX_IMAGE_PIXELS = None
DEFAULT_MAX_PIXELS = 100_000_000
_CV_FLAGS = cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH  # applies EXIF orientation, keeps 16-bit
INTERPOLATION = {
    "linear": cv2.INTER_LINEAR,
    "area": cv2.INTER_AREA,
    "cubic": cv2.INTER_CUBIC,
    "nearest": cv2.INTER_NEAREST,
}


@dataclass(frozen=True)
class Prep:
    """How one model wants its input: all models sharing a Prep share one resized array."""

    resize: str  # stretch | pad
    size: tuple[int, int] | None  # (h, w) for stretch
    interpolation: str
    channels: int


@dataclass
class DecodedImage:
    source: Source
    sha256: str
    size: tuple[int, int]  # oriented (h, w)
    inputs: dict[Prep, np.ndarray] = field(default_factory=dict)  # HWC uint8 per Prep


def read_bytes(path: Path) -> bytes:
    """The file's bytes, or an ImageError saying why they cannot be had."""
    if path.is_symlink() and not path.exists():
        raise ImageError(f"dangling symbolic link (points to {os.readlink(path)})")
    if path.is_dir():
        raise ImageError("is a folder, not an image file")
    try:
        data = path.read_bytes()
    except FileNotFoundError as err:
        raise ImageError("file not found") from err
    except PermissionError as err:
        raise ImageError("not readable: permission denied") from err
    except OSError as err:
        raise ImageError(f"cannot read: {os.strerror(err.errno) if err.errno else err}") from err
    if not data:
        raise ImageError("empty file (0 bytes)")
    return data


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_header(data: bytes, max_pixels: int) -> str:
    """Identify the format from the header and refuse images that declare too many pixels.

    Pillow's open() parses only the header, so a decompression bomb is rejected
    before any pixel buffer exists. Returns the format name (JPEG, PNG, ...).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                fmt, (w, h) = im.format or "unknown", im.size
    except UnidentifiedImageError as err:
        head = data[:16]
        kind = "text" if all(32 <= b < 127 or b in (9, 10, 13) for b in head) else "binary data"
        raise ImageError(f"not a recognised image format (starts with {kind} {head[:8]!r})") from err
    except (OSError, ValueError, SyntaxError) as err:
        raise ImageError(f"corrupt image header: {err}") from err
    if w <= 0 or h <= 0:
        raise ImageError(f"header declares an empty image ({w}x{h})")
    if w * h > max_pixels:
        raise ImageError(
            f"header declares {w}x{h} = {w * h:,} pixels, above --max-pixels {max_pixels:,} "
            "(possible decompression bomb); not decoded"
        )
    if fmt == "JPEG":
        # A JPEG cut short decodes to a half-grey picture with only a warning; its last
        # end-of-image marker must come after the last start-of-scan marker.
        if data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda"):
            raise ImageError("truncated JPEG (no end-of-image marker after the last scan)")
    elif fmt == "PNG" and b"IEND" not in data[-32:]:
        raise ImageError("truncated PNG (no IEND chunk at the end)")
    return fmt


def to_rgb8(arr: np.ndarray) -> np.ndarray:
    """OpenCV's BGR (8 or 16 bit) -> contiguous 8-bit RGB; 16-bit by value/257, rounded."""
    if arr.dtype == np.uint16:
        arr = ((arr.astype(np.uint32) + 128) // 257).astype(np.uint8)
    elif arr.dtype != np.uint8:
        raise ImageError(f"unsupported sample type {arr.dtype} (8- or 16-bit integer images only)")
    return cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)


def _tiff_unassociated_alpha(data: bytes) -> np.ndarray | None:
    """Oriented RGB of an 8-bit RGBA TIFF whose alpha is unassociated; None for any other TIFF.

    OpenCV reads such files through libtiff's RGBA interface, which premultiplies the
    colours by alpha although ExtraSamples = 2 says they are not premultiplied: a
    half-transparent pixel would come out darker. SPEC 4.1 drops alpha, so these few
    files are decoded by Pillow instead. Raises ImageError.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            bits, extra = tuple(im.tag_v2.get(258, ())), tuple(im.tag_v2.get(338, ()))
            if im.mode != "RGBA" or bits != (8, 8, 8, 8) or 2 not in extra:
                return None
            return np.ascontiguousarray(np.asarray(ImageOps.exif_transpose(im).convert("RGB")))
    except (OSError, ValueError, SyntaxError) as err:
        raise ImageError(f"TIFF data could not be decoded: {err}") from err


def decode_rgb(data: bytes, fmt: str) -> np.ndarray:
    """Decode to oriented 8-bit RGB (H, W, 3)."""
    if fmt == "TIFF":
        rgb = _tiff_unassociated_alpha(data)
        if rgb is not None:
            return rgb
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), _CV_FLAGS)
    if arr is None:
        raise ImageError(f"{fmt} data could not be decoded (corrupt or truncated)")
    if arr.ndim == 2:
        arr = cv2.cvtColor(arr, cv2.COLOR_GRAY2BGR)
    return to_rgb8(arr)


def prepare(rgb: np.ndarray, prep: Prep) -> np.ndarray:
    """uint8 HWC input for one Prep: stretch-resized, or native size for pad."""
    img = rgb
    if prep.resize == "stretch":
        h, w = prep.size
        if img.shape[:2] != (h, w):
            img = cv2.resize(img, (w, h), interpolation=INTERPOLATION[prep.interpolation])
    if prep.channels == 1:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)[:, :, None]
    return np.ascontiguousarray(img)


def load_image(source: Source, preps: list[Prep], max_pixels: int) -> DecodedImage:
    """Read, hash, check, decode and prepare one image. Raises ImageError."""
    data = read_bytes(source.path)
    digest = sha256_bytes(data)
    try:
        fmt = check_header(data, max_pixels)
        rgb = decode_rgb(data, fmt)
    except ImageError as err:
        err.sha256 = digest  # the record keeps the hash of a bad file too
        raise
    except cv2.error as err:
        raise ImageError(f"OpenCV could not decode it: {str(err).strip().splitlines()[-1]}") from err
    except MemoryError as err:
        raise ImageError(f"not enough memory to decode {len(data):,} bytes") from err
    del data
    item = DecodedImage(source, digest, rgb.shape[:2])
    for prep in preps:
        item.inputs[prep] = prepare(rgb, prep)
    return item

