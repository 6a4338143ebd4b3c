"""What a JPEG's own header says about decoding it on the GPU: its frame, its EXIF
orientation, and whether nvJPEG decodes it exactly (no torch here: the decode workers ask).
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

from PIL import Image

ORIENTATION = 0x0112


@dataclass(frozen=True)
class Frame:
    """What the start-of-frame segment of a JPEG declares."""

    marker: int  # 0xC0 baseline, 0xC1 extended, 0xC2 progressive, ...
    precision: int
    height: int
    width: int
    components: int
    adobe: bool  # an APP14 "Adobe" segment (colour transform of its own) came first


def jpeg_frame(data: bytes) -> Frame | None:
    """The frame header of a JPEG (segments walked by their lengths up to the first SOFn), or None."""
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    pos, adobe = 2, False
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = struct.unpack_from(">H", data, pos + 2)[0]
        if length < 2:
            return None
        body = pos + 4
        if marker == 0xEE and data[body:body + 5] == b"Adobe":
            adobe = True
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if body + 6 > n:
                return None
            precision, height, width, components = struct.unpack_from(">BHHB", data, body)
            return Frame(marker, precision, height, width, components, adobe)
        if marker in (0xDA, 0xD9):  # scan or end before any frame
            return None
        pos = body + length - 2
    return None


def orientation(data: bytes) -> int:
    """The EXIF orientation (1-8) of a JPEG, 1 when there is none or it is out of range."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            value = im.getexif().get(ORIENTATION, 1)
    except (OSError, ValueError, SyntaxError, struct.error):
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def plan(data: bytes, fmt: str) -> tuple[tuple[int, int], int] | None:
    """((upright height, width), EXIF orientation) of a JPEG the GPU decodes, else None.

    Baseline, 8-bit, three-component (YCbCr) JPEGs only.
    """
    if fmt != "JPEG":
        return None
    frame = jpeg_frame(data)
    if frame is None or frame.marker != 0xC0 or frame.precision != 8 or frame.components != 3 or frame.adobe:
        return None
    turn = orientation(data)
    h, w = frame.height, frame.width
    return ((w, h) if turn >= 5 else (h, w)), turn
