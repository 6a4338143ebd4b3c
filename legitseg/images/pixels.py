"""Images given in memory (numpy arrays, PIL images) as sources of the same pipeline.

A `PixelSource` is a Source whose pixels are already decoded. The engine's decode
workers turn it into 8-bit RGB (`to_rgb`), hash it and prepare it for every model
with `decode.prepared`, exactly as they do for a file once its bytes are decoded;
the forward pass and postprocessing are the same code as for files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from legitseg.errors import ImageError
from legitseg.images.decode import prepared, sha256_bytes
from legitseg.images.decoded import DecodedImage, Prep
from legitseg.images.sources import Source

# Pillow modes of 16-bit gray images: scaled to 8 bits by value/257, as 16-bit files are.
_PIL_16BIT = ("I;16", "I;16B", "I;16L", "I;16N")


@dataclass(frozen=True, eq=False)
class PixelSource(Source):
    """A Source whose pixels are given: a numpy array (copied when taken) or a PIL image.

    `path` holds `label` (there is no file); `display` is the label, e.g. `array[3]`.
    """

    pixels: Any = field(default=None, repr=False)
    label: str = ""
    kind: str = "array"  # array | pil

    @property
    def display(self) -> str:
        return self.label

    def load(self, preps: list[Prep], max_pixels: int) -> DecodedImage:
        """Convert, hash and prepare. The sha256 is that of the (H, W, 3) uint8 RGB pixel bytes,
        row by row, after conversion. Raises ImageError."""
        rgb = to_rgb(self.pixels, max_pixels)
        return prepared(self, sha256_bytes(rgb.data), rgb, preps)


def _check_size(h: int, w: int, max_pixels: int) -> None:
    if h <= 0 or w <= 0:
        raise ImageError(f"empty image ({w}x{h})")
    if h * w > max_pixels:
        raise ImageError(f"{w}x{h} = {w * h:,} pixels, above max_pixels {max_pixels:,}")


def to_rgb(pixels: Any, max_pixels: int) -> np.ndarray:
    """A C-contiguous (H, W, 3) uint8 RGB array from an array or a PIL image. Raises ImageError.

    Arrays: (H, W) gray, (H, W, 1), (H, W, 3) RGB or (H, W, 4) RGBA (alpha dropped), uint8,
    or uint16 (either byte order) scaled by value/257. PIL images: EXIF orientation applied (as for files), then
    converted to RGB (palette expanded, alpha dropped, 16-bit gray scaled by value/257).
    """
    if isinstance(pixels, Image.Image):
        return _pil_rgb(pixels, max_pixels)
    arr = pixels
    if not isinstance(arr, np.ndarray):
        raise ImageError(f"not an image: {type(arr).__name__}")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ImageError(f"array of shape {arr.shape}: expected (H, W) gray, (H, W, 3) RGB or (H, W, 4) RGBA")
    _check_size(arr.shape[0], arr.shape[1], max_pixels)
    if arr.dtype.kind == "u" and arr.dtype.itemsize in (1, 2) and not arr.dtype.isnative:
        # Big-endian samples (`>u2`, e.g. from a FITS or raw TIFF reader) are the same
        # values: compared by dtype they would be refused, though 16-bit files are read.
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if arr.dtype == np.uint16:
        arr = ((arr.astype(np.uint32) + 128) // 257).astype(np.uint8)
    elif arr.dtype != np.uint8:
        raise ImageError(f"array of dtype {arr.dtype}: expected uint8 (0-255 RGB) or uint16")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr[:, :, :3])


def _pil_rgb(im: Image.Image, max_pixels: int) -> np.ndarray:
    w, h = im.size
    _check_size(h, w, max_pixels)
    try:
        im = ImageOps.exif_transpose(im)
        if im.mode in _PIL_16BIT:
            return to_rgb(np.asarray(im).astype(np.uint16), max_pixels)
        if im.mode in ("I", "F"):
            raise ImageError(f"PIL image of mode {im.mode} (32-bit samples): convert it to RGB first")
        return np.ascontiguousarray(np.asarray(im if im.mode == "RGB" else im.convert("RGB")))
    except (OSError, ValueError, SyntaxError) as err:
        raise ImageError(f"PIL image could not be read: {err}") from err
