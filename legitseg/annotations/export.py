"""The core of `legitseg annotations`: OUT -> COCO, GeoJSON or DICOM Segmentation files.

Streams: one record at a time is read, its masks (and probability maps) loaded, its
regions traced and written, then dropped, so memory does not grow with the number of
images. A result that cannot be exported (a mask deleted since the run, a DICOM source
that changed) is listed in `Export.problems` and the rest is written; problems with the
whole export are LegitsegErrors. No printing: `progress(done, total)` is called after
each record.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from legitseg.annotations import geojson
from legitseg.annotations.shapes import Shape, shapes
from legitseg.annotations.source import OutReader, Result, Unexported
from legitseg.errors import NothingToScore, UsageError
from legitseg.output.writers import run_folder_holding

log = logging.getLogger(__name__)
FORMATS = ("coco", "geojson", "dicom-seg")


@dataclass
class Export:
    """What an export wrote and what it could not."""

    dest: Path
    images: int = 0  # records read
    results: int = 0  # (image, model) results exported
    shapes: int = 0  # regions written
    files: int = 0
    skipped: int = 0  # results with nothing to export in this format (dicom-seg of a JPEG)
    graded: int = 0  # images with severity grades (image attributes in COCO and GeoJSON)
    problems: list[tuple[str, str, str]] = field(default_factory=list)  # image, model, why


def default_dest(out: Path, fmt: str) -> Path:
    return out / "annotations" / ("coco.json" if fmt == "coco" else fmt)


def check_destination(out: Path, dest: Path, fmt: str) -> None:
    """Refuse a destination inside the run's own folders, or of the wrong kind. Raises UsageError."""
    owned = run_folder_holding(out, dest)
    if owned is not None:
        raise UsageError(f"-o {dest} is inside {owned}, which belongs to the run; "
                         f"give a path outside it [default: {default_dest(out, fmt)}]")
    if fmt == "coco" and dest.is_dir():
        raise UsageError(f"-o {dest} is a folder; --format coco writes one file (e.g. {dest / 'coco.json'})")
    if fmt != "coco" and dest.exists() and not dest.is_dir():
        raise UsageError(f"-o {dest} is a file; --format {fmt} writes a folder of files")


def check_options(fmt: str, polygons: bool, fractional: bool) -> None:
    """Raises UsageError for an unknown format or options that do not apply to it."""
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r}: choose {', '.join(FORMATS)}")
    if polygons and fmt != "coco":
        raise UsageError(f"--polygons applies to --format coco only ({fmt} always writes "
                         f"{'polygons' if fmt == 'geojson' else 'pixels'})")
    if fractional and fmt != "dicom-seg":
        raise UsageError("--fractional applies to --format dicom-seg only")
    if fmt == "dicom-seg":
        from legitseg.annotations.dicom_seg import require_extra

        require_extra()


def export(out: Path, fmt: str, dest: Path | None = None, models: list[str] | None = None,
           polygons: bool = False, fractional: bool = False,
           progress: Callable[[int, int], None] | None = None) -> Export:
    """Export OUT's segmentation results (and severity grades, as image attributes).

    Raises UsageError (not an OUT, bad options or destination, an unknown model),
    NothingToScore (exit 6: no records, or nothing of the selected models to export),
    RuntimeFailure when the destination cannot be written (a COCO file then stays as it was).
    """
    check_options(fmt, polygons, fractional)
    dest = dest or default_dest(out, fmt)
    check_destination(out, dest, fmt)
    reader = OutReader(out, models)
    total = len(reader.paths)
    if not total:
        raise NothingToScore(f"nothing to export: {out} holds no image records")
    stats = Export(dest)
    coco = None
    if fmt == "coco":
        from legitseg.annotations.coco import CocoWriter

        coco = CocoWriter(dest, out, polygons)
    try:
        for record in reader.records():
            stats.images += 1
            results, problems = reader.results(record)
            stats.problems += [(record.image, m, why) for m, why in problems]
            severity = reader.severity(record)
            stats.graded += bool(severity)
            if fmt == "dicom-seg":
                for result in results:
                    _dicom(dest, result, fractional, stats)
            else:
                drawn = _shapes(results, stats)
                if coco is not None:
                    coco.add(record, drawn, severity)
                elif results or severity:
                    geojson.write(dest, record, drawn, severity)
                    stats.files += 1
            if progress is not None:
                progress(stats.images, total)
        _check_found(reader, stats, out, fmt)
        if coco is not None:
            coco.close(sorted(reader.categories.values(), key=lambda c: c.id))
            stats.files = 1
    except BaseException:
        if coco is not None:
            coco.abort()
        raise
    return stats


def _shapes(results: list[Result], stats: Export) -> list[Shape]:
    """Every region of each result; a result whose files cannot be read is a problem."""
    drawn: list[Shape] = []
    for result in results:
        try:
            found = list(shapes(result, result.mask(), result.probabilities()))
        except Unexported as err:
            stats.problems.append((result.record.image, result.model, str(err)))
            continue
        drawn += found
        stats.results += 1
        stats.shapes += len(found)
    return drawn


def _dicom(dest: Path, result: Result, fractional: bool, stats: Export) -> None:
    from legitseg.annotations import dicom_seg

    try:
        source = dicom_seg.source_dataset(result)
        probs = result.probabilities() if fractional else None
        seg = dicom_seg.segmentation(result, source, result.mask(), probs, fractional)
    except dicom_seg.NotDicom as err:
        log.debug("%s; no DICOM Segmentation", err)
        stats.skipped += 1
        return
    except Unexported as err:
        stats.problems.append((result.record.image, result.model, str(err)))
        return
    dicom_seg.write(dest, result, seg)
    stats.results += 1
    stats.files += 1


def _check_found(reader: OutReader, stats: Export, out: Path, fmt: str) -> None:
    """Raises NothingToScore when nothing at all could be exported."""
    for model in reader.models or []:
        if model not in reader.seen:
            log.warning("model %s has no result in the records of %s", model, out)
    if stats.results or stats.problems or (stats.graded and fmt != "dicom-seg"):
        return
    if stats.skipped:
        raise NothingToScore(f"nothing to export: none of the {stats.skipped} result(s) in {out} comes from a "
                             f"DICOM input, and a DICOM Segmentation must reference its source image")
    what = f"model(s) {', '.join(reader.models)}" if reader.models else "any model"
    raise NothingToScore(f"nothing to export: {out} holds no ok result of {what}")
