"""Read, check and decode one image to 8-bit RGB (SPEC 4.1), then resize it per model (4.2).

Runs in background threads: OpenCV releases the GIL while decoding and resizing.
A file OpenCV decodes stays in its BGR order until each model's input is resized, and
only those small inputs are converted to RGB: a full-size conversion of a 12 MP photo
costs ~7 ms of CPU and a fresh 36 MB array, and is made only when something needs the
photograph itself at its native size (overlays, quality checks, pad and tile models).
Every problem with one image becomes an ImageError whose message names it; the
run records it and goes on.
"""

from __future__ import annotations

import io
import logging
import os
import re
import stat
import threading
import warnings
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from legitseg.errors import ImageError
from legitseg.fsio import sha256_bytes  # noqa: F401 - re-exported for the readers of images
from legitseg.images import dicom
from legitseg.images.containers import heif_header, jpeg_whole, png_end
from legitseg.images.decoded import DecodedImage, Prep
from legitseg.images.geometry import letterbox_size
from legitseg.images.jpeg_plan import plan
from legitseg.images.reduced import load_reduced
from legitseg.images.sources import Source

log = logging.getLogger(__name__)
# warnings.catch_warnings swaps process-wide filters; decode threads entering and leaving it
# concurrently could leave "ignore" installed for good, so header checks take turns.
_WARNINGS_LOCK = threading.Lock()
_CV_FLAGS = cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH  # applies EXIF orientation, keeps 16-bit
INTERPOLATION = {
    "linear": cv2.INTER_LINEAR,
    "area": cv2.INTER_AREA,
    "cubic": cv2.INTER_CUBIC,
    "nearest": cv2.INTER_NEAREST,
}


def _kind(mode: int) -> str:
    for test, word in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device")):
        if test(mode):
            return word
    return "special file"


def _os_reason(err: OSError) -> str:
    return os.strerror(err.errno) if err.errno else str(err)


def read_bytes(path: Path, writable: bool = False) -> bytes:
    """The bytes of a regular file, or an ImageError saying why they cannot be had.

    The file is stat-ed before it is opened, and opened non-blocking and checked again,
    so a FIFO, socket or device named like an image is refused without ever blocking.
    `writable`: read into a bytearray, which a tensor can wrap without a copy (the GPU path).
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError as err:
        if os.path.islink(path):
            raise ImageError(f"dangling symbolic link (points to {os.readlink(path)})") from err
        raise ImageError("file not found") from err
    except PermissionError as err:
        raise ImageError("not readable: permission denied") from err
    except OSError as err:
        raise ImageError(f"cannot read: {_os_reason(err)}") from err
    if stat.S_ISDIR(mode):
        raise ImageError("is a folder, not an image file")
    if not stat.S_ISREG(mode):
        raise ImageError(f"not a regular file ({_kind(mode)})")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError as err:
        raise ImageError("file not found") from err
    except PermissionError as err:
        raise ImageError("not readable: permission denied") from err
    except OSError as err:
        raise ImageError(f"cannot read: {_os_reason(err)}") from err
    with open(fd, "rb", closefd=True) as f:
        mode = os.fstat(f.fileno()).st_mode
        if not stat.S_ISREG(mode):  # swapped for something else between stat and open
            raise ImageError(f"not a regular file ({_kind(mode)})")
        try:
            data = _read_writable(f) if writable else f.read()
        except OSError as err:
            raise ImageError(f"cannot read: {_os_reason(err)}") from err
    if not data:
        raise ImageError("empty file (0 bytes)")
    return data


def _read_writable(f) -> bytearray:
    """The rest of `f` read straight into a bytearray (no copy of the bytes afterwards)."""
    size = os.fstat(f.fileno()).st_size
    buf = bytearray(size + 1)  # one more: a file that grew since is read on below
    n = f.readinto(buf)
    if n == len(buf):
        buf += f.read()
    else:
        del buf[n:]  # shrinks in place
    return buf


def _pillow_header(data: bytes) -> tuple[str, int, int]:
    """(format, width, height) from Pillow's header parse; no pixel buffer is allocated."""
    with _WARNINGS_LOCK, warnings.catch_warnings(record=True) as caught:
        # DecompressionBombWarning: we compare the size with --max-pixels ourselves below.
        warnings.simplefilter("always")
        try:
            with Image.open(io.BytesIO(data)) as im:
                fmt, (w, h) = im.format or "unknown", im.size
        finally:
            for w_ in caught:
                log.debug("Pillow warning on header: %s", w_.message)
    return fmt, w, h


def check_header(data: bytes, max_pixels: int) -> str:
    """Identify the format from the header, refuse too many pixels and truncated files.

    Only headers are parsed (Pillow's open(), or libheif's for HEIF), so a
    decompression bomb is rejected before any pixel buffer exists. JPEG and PNG are
    walked segment by segment (chunk by chunk) to the marker that ends the image, so
    bytes after it (a motion photo's video, appended metadata) are allowed and a file
    cut short is not. A DICOM photograph is checked by `images/dicom.py`. Returns the format name (JPEG, PNG, HEIF, ...). Raises ImageError.
    """
    if dicom.is_dicom(data):
        dicom.check(data, max_pixels)
        return "DICOM"
    heif = heif_header(data)
    try:
        if heif is not None:
            fmt, w, h = "HEIF", *heif
        else:
            fmt, w, h = _pillow_header(data)
    except Image.DecompressionBombError as err:
        # Pillow refuses before it tells the size; its message carries the pixel count.
        found = re.search(r"\((\d+) pixels\)", str(err))
        if found and int(found.group(1)) > max_pixels:
            raise ImageError(f"header declares {int(found.group(1)):,} pixels, above --max-pixels "
                             f"{max_pixels:,} (possible decompression bomb); not decoded") from err
        raise ImageError(f"{err} (Pillow's decompression-bomb limit); not decoded") from err
    except UnidentifiedImageError as err:
        head = bytes(data[:16])
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
    # A JPEG cut short decodes to a half-grey picture with only a warning from libjpeg.
    if fmt == "JPEG" and not jpeg_whole(data):
        raise ImageError("truncated JPEG (the data ends before the end-of-image marker)")
    if fmt == "PNG" and png_end(data) is None:
        raise ImageError("truncated PNG (the data ends before the IEND chunk)")
    return fmt


def to_8bit(arr: np.ndarray) -> np.ndarray:
    """8- or 16-bit samples -> 8-bit, 16-bit by value/257, rounded; the channel order is kept."""
    if arr.dtype == np.uint16:
        return ((arr.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if arr.dtype != np.uint8:
        raise ImageError(f"unsupported sample type {arr.dtype} (8- or 16-bit integer images only)")
    return arr


def _tiff_unassociated_alpha(data: bytes) -> np.ndarray | None:
    """Oriented RGB of an 8-bit RGBA TIFF whose alpha is unassociated; None for any other TIFF.

    OpenCV reads such files through libtiff's RGBA interface, which premultiplies the
    colours by alpha although ExtraSamples = 2 says they are not premultiplied: a
    half-transparent pixel would come out darker. SPEC 4.1 drops alpha, so these few
    files are decoded by Pillow instead. Raises ImageError.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:  # check_header has bounded the size already
            bits, extra = tuple(im.tag_v2.get(258, ())), tuple(im.tag_v2.get(338, ()))
            if im.mode != "RGBA" or bits != (8, 8, 8, 8) or 2 not in extra:
                return None
            return np.ascontiguousarray(np.asarray(ImageOps.exif_transpose(im).convert("RGB")))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ImageError(f"TIFF data could not be decoded: {err}") from err


def decode_heif(data: bytes) -> np.ndarray:
    """Oriented 8-bit RGB of a HEIF/HEIC primary image (libheif through pillow-heif).

    libheif applies the file's rotation and mirror boxes, which HEIF makes normative;
    the EXIF orientation tag that iPhones also write describes the same turn and is not
    applied a second time. Images of more than 8 bits are reduced to 8 by pillow-heif.
    """
    import pillow_heif  # only HEIF files need libheif

    try:
        arr = np.asarray(pillow_heif.open_heif(io.BytesIO(data), convert_hdr_to_8bit=True))
    except (ValueError, RuntimeError, OSError) as err:
        raise ImageError(f"HEIF data could not be decoded: {err}") from err
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.dtype != np.uint8:
        raise ImageError(f"unsupported HEIF sample type {arr.dtype} (8-bit expected)")
    channels = arr.shape[2]
    if channels in (1, 2):  # gray, gray + alpha
        arr = np.repeat(arr[..., :1], 3, axis=2)
    return np.ascontiguousarray(arr[..., :3])


def decode_8bit(data: bytes, fmt: str) -> tuple[np.ndarray, bool]:
    """Decode to oriented 8-bit (H, W, 3) in the decoder's own channel order, and whether that
    order is OpenCV's BGR (True) or RGB (False: HEIF, DICOM, TIFF with unassociated alpha)."""
    if fmt == "HEIF":
        return decode_heif(data), False
    if fmt == "DICOM":
        return dicom.decode(data), False
    if fmt == "TIFF":
        rgb = _tiff_unassociated_alpha(data)
        if rgb is not None:
            return rgb, False
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), _CV_FLAGS)
    if arr is None:
        raise ImageError(f"{fmt} data could not be decoded (corrupt or truncated)")
    if arr.ndim == 2:
        arr = cv2.cvtColor(arr, cv2.COLOR_GRAY2BGR)
    return to_8bit(arr), True


def decode_rgb(data: bytes, fmt: str) -> np.ndarray:
    """Decode to oriented 8-bit RGB (H, W, 3)."""
    arr, bgr = decode_8bit(data, fmt)
    return cv2.cvtColor(arr, cv2.COLOR_BGR2RGB) if bgr else arr


def prepare(rgb: np.ndarray, prep: Prep, bgr: bool = False) -> np.ndarray:
    """uint8 HWC RGB (or gray) input for one Prep: stretch-resized; letterbox-resized (aspect ratio
    kept, not yet padded: the runner pads after normalisation); or native size for pad and tile.

    `bgr`: the image is in OpenCV's order; it is resized first and only the result converted.
    Resizing works channel by channel and RGB2GRAY on RGB is BGR2GRAY on BGR, so the input
    is the same, bit for bit, as that of the image converted to RGB first.
    """
    img = rgb
    if prep.resize in ("stretch", "letterbox"):
        h, w = prep.size
        if prep.resize == "letterbox":
            h, w = letterbox_size(*img.shape[:2], h, w)
        if img.shape[:2] != (h, w):
            img = cv2.resize(img, (w, h), interpolation=INTERPOLATION[prep.interpolation])
    if prep.channels == 1:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY if bgr else cv2.COLOR_RGB2GRAY)[:, :, None]
    elif bgr:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return np.ascontiguousarray(img)


def load_image(source: Source, preps: list[Prep], max_pixels: int, defer_jpeg: bool = False) -> DecodedImage:
    """Read, hash, check, decode and prepare one image. Raises ImageError.

    `defer_jpeg`: a JPEG the GPU decodes is read, hashed and checked only; its bytes come
    back in `encoded` for a batched decode on the device (images/device_decode.py; the
    planning step, `jpeg_plan.plan`, reads only the header).
    """
    # On the GPU path a JPEG's bytes become a tensor: read writable, torch wraps them as they are.
    data = read_bytes(source.path, writable=defer_jpeg)
    digest = sha256_bytes(data)
    try:
        fmt = check_header(data, max_pixels)
        # Models with `decode: reduced` get their JPEG decoded smaller, also on a GPU run.
        item = load_reduced(source, digest, data, fmt, preps, decode_rgb, prepare)
        if item is not None:
            return item
        if defer_jpeg:
            planned = plan(data, fmt)
            if planned is not None:
                import torch

                size, turn = planned
                return DecodedImage(source, digest, size, encoded=torch.frombuffer(data, dtype=torch.uint8),
                                    orientation=turn)
        pixels, bgr = decode_8bit(data, fmt)
        if bgr and any(p.resize not in ("stretch", "letterbox") and p.channels == 3 for p in preps):
            # A model at native size, or the photograph itself (overlays, quality), wants the
            # full-size RGB: converted once, shared by those preps.
            pixels, bgr = cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB), False
    except ImageError as err:
        # The record keeps the hash of a bad file too.
        raise ImageError(str(err), sha256=digest) from (err.__cause__ or err)
    except cv2.error as err:
        raise ImageError(f"OpenCV could not decode it: {str(err).strip().splitlines()[-1]}",
                         sha256=digest) from err
    except MemoryError as err:
        raise ImageError(f"not enough memory to decode {len(data):,} bytes", sha256=digest) from err
    del data
    return prepared(source, digest, pixels, preps, bgr=bgr)


def prepared(source: Source, sha256: str, rgb: np.ndarray, preps: list[Prep],
             bgr: bool = False) -> DecodedImage:
    """A decoded 8-bit RGB image with its input for every Prep (files and in-memory pixels alike).

    `bgr`: the image is in OpenCV's order (a file's full decode); see `prepare`.
    """
    item = DecodedImage(source, sha256, rgb.shape[:2])
    for prep in preps:
        item.inputs[prep] = prepare(rgb, prep, bgr)
    return item

