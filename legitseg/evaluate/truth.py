"""Read ground truth for `legitseg evaluate`: label-map folders and severity CSVs.

Label maps are PNG or TIFF files (suffix in any case). Other image files in a model's
ground-truth folder (JPEG above all: lossy compression blurs class indices into values
between them) are never read, and never skipped silently: each one is returned as a
problem naming the file. A severity CSV is UTF-8 (with or without a byte-order mark) or
UTF-16 with a byte-order mark (Excel's "Unicode text"), separated by commas or, as
Excel's "Unicode text" is, by tabs. No printing.
"""

from __future__ import annotations

import codecs
import csv
import io
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from legitseg.errors import ImageError, UsageError
from legitseg.images.sources import IMAGE_SUFFIXES

log = logging.getLogger(__name__)
SEVERITY_CSV = "severity.csv"  # true grades of every severity model without its own <model>.csv

LABEL_MAP_SUFFIXES = (".png", ".tif", ".tiff")  # lossless formats that hold class indices exactly
# Pillow refuses images it thinks are decompression bombs (DecompressionBombError, not an
# OSError); a few damaged files raise SyntaxError from its plugins.
PIL_READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
_WHOLE_NUMBER = re.compile(r"[0-9]+")  # ASCII digits only: `²`.isdigit() is True, int('²') fails


def read_label_map(path: Path, classes: int, size: tuple[int, int]) -> np.ndarray:
    """A ground-truth label map as class indices of shape `size` (H, W). Raises ImageError."""
    h, w = size
    try:
        with Image.open(path) as im:
            arr = np.asarray(im)
    except PIL_READ_ERRORS as err:
        raise ImageError(f"ground truth {path} cannot be read (the prediction is {w}x{h}): {err}") from err
    if arr.ndim == 3:
        if arr.shape[2] >= 3 and not (np.array_equal(arr[..., 0], arr[..., 1])
                                      and np.array_equal(arr[..., 0], arr[..., 2])):
            raise ImageError(f"ground truth {path} is a colour image; expected a single-channel label map")
        arr = arr[..., 0]
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if arr.dtype.kind not in "iu":
        raise ImageError(f"ground truth {path} holds {arr.dtype} values; expected whole-number class indices")
    if arr.shape != tuple(size):
        hint = " (rotated? masks are upright, EXIF orientation applied)" if arr.shape == (w, h) else ""
        raise ImageError(f"ground truth {path} is {arr.shape[1]}x{arr.shape[0]} but the prediction "
                         f"is {w}x{h} (width x height){hint}; it is not resized")
    values = np.unique(arr)
    if classes == 2 and set(values.tolist()) <= {0, 255}:
        return (arr == 255).astype(np.uint8)
    if values.size and (values.min() < 0 or values.max() >= classes):
        bad = [int(v) for v in values if v < 0 or v >= classes][:5]
        raise ImageError(f"ground truth {path} holds values {bad} outside 0..{classes - 1}"
                         + (" (binary maps may hold 0/1 or 0/255)" if classes == 2 else ""))
    return arr


@dataclass
class TruthFolder:
    """The label maps of one model's folder, keyed by their path without the suffix, and the
    files that are not used (key or file name, reason)."""

    files: dict[str, Path]
    skipped: list[tuple[str, str]]


def truth_files(folder: Path) -> TruthFolder:
    """Label maps under one model's ground-truth folder; other image files are `skipped`."""
    found: dict[str, list[Path]] = {}
    skipped: list[tuple[str, str]] = []
    for p in sorted(folder.rglob("*")):
        suffix = p.suffix.lower()
        if not p.is_file() or suffix not in IMAGE_SUFFIXES:
            continue  # notes, CSVs, .DS_Store: not label maps, nothing to warn about
        rel = p.relative_to(folder).as_posix()
        if suffix in LABEL_MAP_SUFFIXES:
            found.setdefault(rel[: -len(p.suffix)], []).append(p)
        elif suffix in (".jpg", ".jpeg", ".jpe"):
            skipped.append((rel, f"ground truth {p} is a JPEG, which cannot hold exact class "
                                 f"indices; not read (save label maps as PNG)"))
        else:
            skipped.append((rel, f"ground truth {p} is not a PNG or TIFF label map; not read"))
    files = {}
    for key, paths in found.items():
        if len(paths) > 1:
            skipped.append((key, f"ground truth {' and '.join(map(str, paths))} are label maps for the "
                                 f"same image; keep one"))
        else:
            files[key] = paths[0]
    return TruthFolder(files, skipped)


@dataclass(frozen=True)
class TrueGrade:
    grade: int
    line: int  # line of the CSV, for messages


def _decode(path: Path, raw: bytes) -> str:
    if raw.startswith(codecs.BOM_UTF8):
        text = raw[len(codecs.BOM_UTF8):].decode("utf-8", errors="strict")
    elif raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        text = raw.decode("utf-16")
    else:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise UsageError(f"{path}: not UTF-8 text (byte {err.start}); save it as 'CSV UTF-8' "
                             f"or as UTF-16 with a byte-order mark") from err
    if "\x00" in text:
        raise UsageError(f"{path}: holds NUL characters (UTF-16 or UTF-32 without a byte-order mark?); "
                         f"save it as 'CSV UTF-8'")
    return text


def open_table(path: Path, what: str) -> csv.DictReader:
    """A CSV (UTF-8, or UTF-16 with a BOM; commas, or tabs as Excel writes them) as rows by
    column. Raises UsageError naming the file for one that cannot be read or decoded."""
    try:
        text = _decode(path, path.read_bytes())
    except UnicodeDecodeError as err:
        raise UsageError(f"{path}: not valid {err.encoding} text (byte {err.start})") from err
    except OSError as err:
        raise UsageError(f"cannot read {what} {path}: {err.strerror or err}") from err
    header = text.split("\n", 1)[0]
    delimiter = "\t" if "\t" in header and "," not in header else ","
    return csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)


def read_grades(path: Path) -> dict[str, TrueGrade]:
    """`image,grade` rows of a severity CSV. Raises UsageError naming the file and line."""
    reader = open_table(path, "severity ground truth")
    try:
        fields = reader.fieldnames
        if not fields or not {"image", "grade"} <= {f.strip() for f in fields}:
            raise UsageError(f"{path}: needs the columns image,grade; found {fields}")
        reader.fieldnames = [f.strip() for f in fields]
        grades: dict[str, TrueGrade] = {}
        for row in reader:
            line = reader.line_num
            image, grade = (row.get("image") or "").strip(), (row.get("grade") or "").strip()
            if not _WHOLE_NUMBER.fullmatch(grade):
                raise UsageError(f"{path}:{line}: grade {grade!r} of {image!r} is not a whole number >= 0")
            if image in grades:
                raise UsageError(f"{path}:{line}: image {image!r} is listed twice")
            grades[image] = TrueGrade(int(grade), line)
    except csv.Error as err:
        raise UsageError(f"{path}:{reader.line_num}: not a valid CSV: {err}") from err
    return grades


def check_grade_range(path: Path, grades: dict[str, TrueGrade], model: str, classes: int) -> None:
    """Refuse a true grade the model cannot predict (0..classes-1). Raises UsageError."""
    for image, g in grades.items():
        if g.grade >= classes:
            raise UsageError(f"{path}:{g.line}: true grade {g.grade} of {image!r} is outside 0..{classes - 1}, "
                             f"the grades of severity model {model}")


def severity_csv_for(truth: Path, model: str, explicit: Path | None) -> Path | None:
    """The true grades of `model`: an explicit --severity-csv wins over the folder's files."""
    own = truth / f"{model}.csv"
    if explicit is not None:
        if own.is_file():
            log.warning("%s is not used for model %s: --severity-csv %s was given", own, model, explicit)
        return explicit
    for path in (own, truth / SEVERITY_CSV):
        if path.is_file():
            return path
    return None
