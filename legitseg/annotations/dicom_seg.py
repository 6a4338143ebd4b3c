"""A DICOM Segmentation per (image, model) whose input was a DICOM photograph (highdicom).

The Segmentation references the source instance (its study, series and SOP instance UIDs
come from the input file, read again from the record's `source` path and checked against
the record's sha256), holds one segment per non-background label, and names the algorithm:
the model's name, legitseg's version as the algorithm version, and the weights' sha256 and
the run id as parameters. Binary (the mask) or fractional (the saved probabilities,
255 steps) on request.

Needs the optional DICOM extra (`pip install 'legitseg[dicom]'`).
"""

from __future__ import annotations

import hashlib
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np

from legitseg._version import __version__
from legitseg.annotations.source import Result, Unexported
from legitseg.errors import ImageError, UsageError
from legitseg.fsio import atomic_write
from legitseg.images.dicom import INSTALL_HINT, is_dicom, read_dataset

log = logging.getLogger(__name__)
SUFFIX = ".dcm"
# Labels are the manifest's words, not a standard terminology: a local coding scheme
# ("99" prefix, PS3.16 section 8) keeps them without claiming a SNOMED meaning.
SCHEME = "99LEGITSEG"


def require_extra() -> None:
    """Raises UsageError naming the extra when highdicom is not installed."""
    try:
        import highdicom  # noqa: F401
    except ImportError as err:
        raise UsageError(f"--format dicom-seg needs the optional DICOM extra: {INSTALL_HINT}") from err


class NotDicom(Exception):
    """The image was not a DICOM file: there is no instance to reference."""


def source_dataset(result: Result) -> Any:
    """The input's dataset, when it is the DICOM file the run read. Raises NotDicom, Unexported."""
    record = result.record
    path = Path(record.source or record.image)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise Unexported(f"source {path} cannot be read: {err.strerror or err}") from err
    if not is_dicom(data):
        raise NotDicom(f"{record.image} is not a DICOM file")
    if record.sha256 and hashlib.sha256(data).hexdigest() != record.sha256:
        raise Unexported(f"source {path} changed since the run (sha256 differs from the record's)")
    try:
        return read_dataset(data)
    except ImageError as err:
        raise Unexported(f"source {path}: {err}") from err


def segmentation(result: Result, source: Any, mask: np.ndarray, probs: np.ndarray | None,
                 fractional: bool) -> Any:
    """The highdicom Segmentation of one result. Raises Unexported."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algorithm = hd.AlgorithmIdentificationSequence(
        name=result.model[:64], family=codes.cid7162.ArtificialIntelligence, version=__version__,
        source="legitseg",
        parameters={"weights_sha256": result.entry.weights_sha256 or "unknown",
                    "run_id": result.run_id or "unknown", "settings": result.entry.settings or "unknown"})
    segments = [hd.seg.SegmentDescription(
        segment_number=i, segment_label=c.label[:64],
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=hd.sr.CodedConcept(f"{i}", SCHEME, c.label[:64]),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        display_color=hd.color.CIELabColor.from_string(c.colour),
    ) for i, c in enumerate(result.categories, 1)]
    if fractional:
        if probs is None:
            raise Unexported("no probability map to make a fractional segmentation of (run with --save-probabilities)")
        maps = probs if probs.shape[0] == 1 else probs[1:]
        pixels: Any = np.clip(np.moveaxis(maps.astype(np.float32), 0, -1), 0.0, 1.0)[None]
        kind = hd.seg.SegmentationTypeValues.FRACTIONAL
    else:
        pixels = mask.astype(np.uint8 if len(segments) < 256 else np.uint16)
        kind = hd.seg.SegmentationTypeValues.BINARY
    try:
        return hd.seg.Segmentation(
            source_images=[source], pixel_array=pixels, segmentation_type=kind,
            segment_descriptions=segments, series_instance_uid=hd.UID(), series_number=1,
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer="legitseg",
            manufacturer_model_name=result.model[:64], software_versions=f"legitseg {__version__}",
            device_serial_number=(result.entry.weights_sha256 or "unknown")[:64],
            series_description=f"legitseg {result.model}"[:64], omit_empty_frames=False,
            content_label="LEGITSEG", content_description=f"{result.model} run {result.run_id}"[:64],
        )
    except (ValueError, TypeError, AttributeError, KeyError) as err:
        raise Unexported(f"DICOM Segmentation could not be made: {err}") from err


def write(dest: Path, result: Result, seg: Any) -> Path:
    """DEST/<model>/<name>.dcm, atomically. Raises RuntimeFailure."""
    path = dest / result.model / f"{result.record.name}{SUFFIX}"
    buf = io.BytesIO()
    seg.save_as(buf, enforce_file_format=True)
    atomic_write(path, buf.getvalue())
    return path
