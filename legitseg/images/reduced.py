"""`decode: reduced` (docs/manifest.md): a JPEG much larger than a model's input decoded at
1/2, 1/4 or 1/8 of its size by libjpeg's DCT scaling, for that model only.

A 12 MP JPEG decodes at 1/8 in a third of the time of a full decode, and a `stretch` model
only ever sees the photo resized to its `input_size`. The model then sees a slightly
different downscale (DCT scaling, then the manifest's interpolation), so the setting is
asked for by name and is part of the settings digest. The image's size (the size of its
mask) stays the full, oriented size of the photo, read from the JPEG's frame and its EXIF
orientation without decoding it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import cv2
import numpy as np

from legitseg.errors import ImageError
from legitseg.images.decoded import DecodedImage, Prep
from legitseg.images.jpeg_plan import jpeg_frame, orientation
from legitseg.images.sources import Source

# Largest first. OpenCV's IMREAD_REDUCED_COLOR_k is IMREAD_COLOR with libjpeg's scale_denom = k,
# the EXIF orientation applied as for a full decode.
REDUCTIONS = ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4), (2, cv2.IMREAD_REDUCED_COLOR_2))


def reduction(size: tuple[int, int], input_size: tuple[int, int]) -> int:
    """The largest k in 8, 4, 2 whose decode, ceil(H/k) x ceil(W/k), is at least `input_size` on
    both sides (the model's resize then only shrinks); 1 when none is."""
    (h, w), (ih, iw) = size, input_size
    for k, _ in REDUCTIONS:
        if math.ceil(h / k) >= ih and math.ceil(w / k) >= iw:
            return k
    return 1


def upright_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) of a JPEG after its EXIF orientation, from its headers; None if unreadable."""
    frame = jpeg_frame(data)
    if frame is None:
        return None
    h, w = frame.height, frame.width
    return (w, h) if orientation(data) >= 5 else (h, w)


def decode_reduced(data: bytes, k: int, size: tuple[int, int]) -> np.ndarray:
    """Oriented 8-bit RGB of a JPEG decoded at 1/k (libjpeg's DCT scaling). Raises ImageError."""
    flag = dict(REDUCTIONS)[k]
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
    if bgr is None:
        raise ImageError("JPEG data could not be decoded (corrupt or truncated)")
    want = (math.ceil(size[0] / k), math.ceil(size[1] / k))
    if bgr.shape[:2] != want:  # libjpeg rounds up; anything else is not the image the header declared
        raise ImageError(f"JPEG decoded at 1/{k} to {bgr.shape[1]}x{bgr.shape[0]}, "
                         f"expected {want[1]}x{want[0]} from its header")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def load_reduced(source: Source, sha256: str, data: bytes, fmt: str, preps: list[Prep],
                 decode_full: Callable[[bytes, str], np.ndarray],
                 prepare: Callable[[np.ndarray, Prep], np.ndarray]) -> DecodedImage | None:
    """The decoded image with every model's input, when some model asks for `decode: reduced`
    and the file is a JPEG large enough for it; else None (the ordinary decode applies).

    Each reduced Prep gets its input from the JPEG decoded at its own reduction, whatever
    other models share the run (so its results never depend on them); the others, and a
    reduced Prep whose reduction is 1, from the full decode, made only if one needs it.
    Raises ImageError.
    """
    if fmt != "JPEG" or not any(p.reduced for p in preps):
        return None
    size = upright_size(data)
    if size is None:
        return None
    factors = {p: reduction(size, p.size) if p.reduced and p.size else 1 for p in preps}
    if all(k == 1 for k in factors.values()):
        return None
    full = decode_full(data, fmt) if 1 in factors.values() else None
    if full is not None:
        size = full.shape[:2]  # the decoder's word for the mask's size, as in the ordinary path
    item = DecodedImage(source, sha256, size)
    at: dict[int, np.ndarray] = {}
    for prep, k in factors.items():
        if k == 1:
            item.inputs[prep] = prepare(full, prep)
            continue
        if k not in at:
            at[k] = decode_reduced(data, k, size)
        item.inputs[prep] = prepare(at[k], prep)
    return item
