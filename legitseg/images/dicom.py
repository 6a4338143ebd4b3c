"""DICOM photographs as inputs: VL Photographic and Dermoscopic images, single-frame colour.

A DICOM Part 10 file is recognised by its preamble (`DICM` at byte 128), whatever its
suffix. Only what a camera or dermatoscope writes is read: one frame of 8-bit colour in
the RGB, YBR_FULL or YBR_FULL_422 photometric interpretations, uncompressed or in a
transfer syntax pydicom can decode (JPEG baseline through Pillow). Everything else is an
ImageError naming what the file holds.

pydicom is part of the optional DICOM extra (`pip install 'legitseg[dicom]'`): nothing
here imports it until a DICOM file turns up, and a DICOM file without the extra is an
ImageError that names the extra.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from legitseg.errors import ImageError

INSTALL_HINT = "pip install 'legitseg[dicom]' (or pip install -r requirements_dicom.txt)"
PHOTOMETRIC = ("RGB", "YBR_FULL", "YBR_FULL_422")


def is_dicom(data: bytes) -> bool:
    return len(data) >= 132 and data[128:132] == b"DICM"


def _pydicom():
    try:
        import pydicom
    except ImportError as err:
        raise ImageError(f"a DICOM file, and reading DICOM needs the optional extra: {INSTALL_HINT}") from err
    return pydicom


def read_dataset(data: bytes, pixels: bool = True) -> Any:
    """The file's dataset (without its pixel data when `pixels` is False). Raises ImageError."""
    pydicom = _pydicom()
    try:
        return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=not pixels)
    except (pydicom.errors.InvalidDicomError, ValueError, EOFError, OSError, KeyError) as err:
        raise ImageError(f"corrupt DICOM file: {err}") from err


def check(data: bytes, max_pixels: int) -> tuple[int, int]:
    """(width, height) of a DICOM photograph from its header; refuses what is not one.

    Raises ImageError naming the attribute at fault.
    """
    ds = read_dataset(data, pixels=False)
    rows, cols = ds.get("Rows"), ds.get("Columns")
    if not rows or not cols:
        raise ImageError("DICOM file without an image (no Rows/Columns)")
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric not in PHOTOMETRIC or int(ds.get("SamplesPerPixel", 0)) != 3:
        raise ImageError(f"DICOM photometric interpretation {photometric or 'missing'} with "
                         f"{ds.get('SamplesPerPixel', '?')} samples per pixel; only colour photographs "
                         f"({', '.join(PHOTOMETRIC)}, 3 samples) are read")
    if int(ds.get("BitsAllocated", 0)) != 8:
        raise ImageError(f"DICOM image of {ds.get('BitsAllocated', '?')} bits allocated; only 8-bit colour is read")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise ImageError(f"DICOM image with {frames} frames; only single-frame photographs are read")
    w, h = int(cols), int(rows)
    if w * h > max_pixels:
        raise ImageError(f"header declares {w}x{h} = {w * h:,} pixels, above --max-pixels {max_pixels:,} "
                         "(possible decompression bomb); not decoded")
    return w, h


def decode(data: bytes) -> np.ndarray:
    """8-bit RGB (H, W, 3) of a DICOM photograph (YBR converted to RGB). Raises ImageError."""
    ds = read_dataset(data)
    try:
        # as_rgb: YBR_FULL(_422) pixels, stored or decoded, come back as RGB.
        arr = ds.pixel_array if str(ds.PhotometricInterpretation) == "RGB" else _as_rgb(ds)
    except (ValueError, RuntimeError, NotImplementedError, AttributeError, KeyError) as err:
        raise ImageError(f"DICOM pixel data could not be decoded: {err}") from err
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ImageError(f"DICOM pixel data decoded to {arr.dtype} {arr.shape}; expected 8-bit colour")
    return np.ascontiguousarray(arr)


def _as_rgb(ds: Any) -> np.ndarray:
    from pydicom.pixels import pixel_array

    return pixel_array(ds, as_rgb=True)
