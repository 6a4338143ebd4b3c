"""Subgroups of `legitseg evaluate --metadata FILE --by COL,...` (docs/evaluate.md).

The metadata CSV has an `image` column, matched like ground truth (the output name, e.g.
`visit1/a.jpg`, else the name without its suffix), and one column per grouping. Each value
of a column is a subgroup: its metrics with confidence intervals (`stats.metric_block`),
and per column the gap between the best and the worst subgroup. A value held only by
images that were not scored is an empty subgroup (n = 0, no metrics); scored images missing
from the metadata and metadata rows of no scored image are named in a warning.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from legitseg.errors import UsageError
from legitseg.evaluate.stats import metric_block, per_image_errors
from legitseg.evaluate.truth import open_table

if TYPE_CHECKING:
    from legitseg.evaluate.scoring import ModelEvaluation
    from legitseg.evaluate.stats import StatsOptions

log = logging.getLogger(__name__)
BLANK = "(blank)"  # the subgroup of an empty cell
SHOWN = 10  # names listed in a warning
HIGHER_IS_BETTER = {"dice": True, "iou": True, "failure": False, "mae": False}


@dataclass(frozen=True)
class Metadata:
    path: Path
    rows: dict[str, dict[str, str]]  # image -> its cells, stripped


def read_metadata(path: Path, by: tuple[str, ...]) -> Metadata:
    """Read the metadata CSV (UTF-8 or UTF-16 with a BOM; commas, or tabs as Excel writes them).

    Raises UsageError naming the file (and line) for a missing file, a missing `image` or
    `--by` column, or an image listed twice."""
    reader = open_table(path, "metadata")
    try:
        fields = [f.strip() for f in reader.fieldnames or []]
        wanted = ("image", *by)
        absent = [c for c in wanted if c not in fields]
        if absent:
            raise UsageError(f"{path}: no column {', '.join(absent)}; found {', '.join(fields) or 'none'}")
        reader.fieldnames = fields
        rows: dict[str, dict[str, str]] = {}
        for row in reader:
            image = (row.get("image") or "").strip()
            if image in rows:
                raise UsageError(f"{path}:{reader.line_num}: image {image!r} is listed twice")
            rows[image] = {c: (row.get(c) or "").strip() for c in by}
    except csv.Error as err:
        raise UsageError(f"{path}:{reader.line_num}: not a valid CSV: {err}") from err
    return Metadata(path, rows)


def _key(name: str, rows: dict[str, dict[str, str]]) -> str | None:
    if name in rows:
        return name
    p = PurePosixPath(name)
    short = str(p.with_suffix("")) if p.suffix else name
    return short if short in rows else None


def _named(names: list[str]) -> str:
    return ", ".join(names[:SHOWN]) + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")


def subgroup_tables(m: ModelEvaluation, options: StatsOptions) -> dict[str, Any]:
    """{"missing_from_metadata", "not_scored", "by": {column: {"groups": {value: block}, "gap": ...}}}."""
    meta: Metadata = options.metadata
    names = per_image_errors(m, options.fail_below)[0]
    keys = {name: _key(name, meta.rows) for name in names}
    missing = [name for name, key in keys.items() if key is None]
    used = {key for key in keys.values() if key is not None}
    extra = [image for image in meta.rows if image not in used]
    if missing:
        log.warning("%s: %d scored image(s) missing from metadata %s, left out of every subgroup: %s",
                    m.model, len(missing), meta.path, _named(missing))
    if extra:
        log.warning("%s: %d image(s) in metadata %s were not scored: %s", m.model, len(extra), meta.path,
                    _named(extra))
    out: dict[str, Any] = {"missing_from_metadata": missing, "not_scored": extra, "by": {}}
    for column in options.by:
        values = sorted({row[column] for row in meta.rows.values()})
        groups = {}
        for value in values:
            members = {name for name, key in keys.items() if key is not None and meta.rows[key][column] == value}
            groups[value or BLANK] = {"images": len(members), **metric_block(m, options, members)}
        out["by"][column] = {"groups": groups, "gap": _gaps(groups)}
    return out


def _gaps(groups: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Best and worst subgroup (those with a value) per metric, and the difference."""
    gaps = {}
    for metric, higher in HIGHER_IS_BETTER.items():
        key = "rate" if metric == "failure" else "mean"
        have = {g: b[metric][key] for g, b in groups.items() if metric in b and b[metric][key] is not None}
        if not have:
            continue
        ordered = sorted(have, key=lambda g: (have[g], g), reverse=higher)
        best, worst = ordered[0], ordered[-1]
        gaps[metric] = {"best": best, "worst": worst, "gap": abs(have[best] - have[worst])}
    return gaps
