"""JPEG decode, orientation and resize on the GPU, for the photographs it handles exactly.

On a GPU the decode workers only read, hash and check a JPEG; the pixels are decoded
for a whole batch at once by nvJPEG (torchvision's `decode_jpeg(device=...)`), turned
upright by the file's EXIF orientation and resized on the device, so that only the
compressed bytes cross to the GPU. The CPU decoder (OpenCV) keeps everything else:
PNG, TIFF, WebP, HEIF, 16-bit, grey, CMYK and Adobe-RGB JPEGs, progressive and
arithmetic-coded JPEGs, and any JPEG that nvJPEG refuses.

What a user can rely on (docs/architecture.md, tests/test_cuda.py): nvJPEG's IDCT and
chroma upsampling are not libjpeg's, so decoded pixels differ from OpenCV's by a few
levels; the bilinear resize differs from OpenCV's by at most one level; nearest is
identical. Every decision here is made from the file's own header, so the same file
always takes the same path. `LEGITSEG_GPU_DECODE=0` turns the path off.
"""

from __future__ import annotations

import io
import logging
import os
import struct
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from legitseg.pipeline.decode import Prep

log = logging.getLogger(__name__)
ORIENTATION = 0x0112
# Interpolations the device reproduces (bilinear within one level, nearest exactly).
_MODES = {"linear": "bilinear", "nearest": "nearest"}


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


def enabled() -> bool:
    return os.environ.get("LEGITSEG_GPU_DECODE", "1") != "0"


def supports(preps: list[Prep]) -> bool:
    """Whether every model input can be made on the device from the decoded photograph."""
    return all(p.resize in ("stretch", "pad") and p.interpolation in _MODES and p.channels == 3 for p in preps)


def orient(image: torch.Tensor, turn: int) -> torch.Tensor:
    """A CHW image turned upright by its EXIF orientation (flips and transposes: exact)."""
    if turn in (5, 6, 7, 8):
        image = image.transpose(-2, -1)
    flips = {2: (-1,), 3: (-2, -1), 4: (-2,), 6: (-1,), 7: (-2, -1), 8: (-2,)}.get(turn)
    return (image.flip(flips) if flips else image).contiguous()


def prepare(image: torch.Tensor, prep: Prep) -> torch.Tensor:
    """CHW uint8 model input for one Prep (stretch: resized; pad: as it is), on the image's device."""
    if prep.resize == "stretch" and prep.size is not None and tuple(image.shape[-2:]) != tuple(prep.size):
        mode = _MODES[prep.interpolation]
        x = image[None].float()
        if mode == "nearest":
            return F.interpolate(x, size=prep.size, mode="nearest")[0].to(torch.uint8)
        y = F.interpolate(x, size=prep.size, mode="bilinear", align_corners=False)[0]
        return y.round_().clamp_(0, 255).to(torch.uint8)
    return image


def decode(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """RGB CHW uint8 images on `device`, one per encoded JPEG; None where the decoder refused one.

    One batched call; if it fails, each file is tried alone so one bad file costs only itself.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device))
    except RuntimeError as err:
        log.debug("batched JPEG decode on %s failed (%s); decoding one by one", device, err)
    out: list[torch.Tensor | None] = []
    for data in encoded:
        try:
            out.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
        except RuntimeError as err:
            log.debug("JPEG decode on %s failed: %s", device, err)
            out.append(None)
    return out
