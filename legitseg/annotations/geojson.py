"""One GeoJSON FeatureCollection per image, in the image's pixel coordinates (QuPath's way).

Coordinates: x to the right, y down, (0, 0) the top-left corner of the image; vertices lie
on pixel edges, so pixel (x, y) is the square [x, x+1] x [y, y+1]. No map projection is
meant (GeoJSON's WGS 84 does not apply). One Polygon per 8-connected region: its outer
ring, then its holes; rings are closed (last position = first).

Properties carry what QuPath reads (`objectType`, `classification` with name and colour)
and legitseg's traceability fields (label, model, area, score, run_id, weights_sha256).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from legitseg.annotations.regions import Ring
from legitseg.annotations.shapes import Shape
from legitseg.fsio import atomic_write, dumps
from legitseg.output.records import ImageRecord

SUFFIX = ".geojson"


def _ring(ring: Ring) -> list[list[int]]:
    return [[x, y] for x, y in ring] + [[ring[0][0], ring[0][1]]]


def _rgb(hex_colour: str) -> list[int]:
    return [int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)]


def feature(shape: Shape) -> dict[str, Any] | None:
    """The region as a GeoJSON Feature (None for a region with no outline, which cannot happen
    for a non-empty region but is not worth a crash)."""
    rings = shape.polygons()
    if not rings:
        return None
    polys = [[_ring(outer), *(_ring(h) for h in holes)] for outer, holes in rings]
    geometry = ({"type": "Polygon", "coordinates": polys[0]} if len(polys) == 1
                else {"type": "MultiPolygon", "coordinates": polys})
    props: dict[str, Any] = {
        "objectType": "annotation",
        "classification": {"name": shape.category.label, "color": _rgb(shape.category.colour)},
        "label": shape.category.label, **shape.trace(), "area": shape.area, "bbox": shape.bbox,
    }
    if shape.score is not None:
        props["score"] = shape.score
    return {"type": "Feature", "geometry": geometry, "properties": props}


def collection(record: ImageRecord, shapes: list[Shape], severity: dict[str, dict[str, Any]]) -> dict[str, Any]:
    features = [f for f in (feature(s) for s in shapes) if f is not None]
    h, w = record.size or (0, 0)
    props: dict[str, Any] = {"image": record.image, "legitseg_name": record.name, "sha256": record.sha256,
                             "width": w, "height": h,
                             "coordinates": "pixels: x right, y down, (0, 0) the top-left corner of the image"}
    if severity:
        props["severity"] = severity
    # "properties" on a FeatureCollection is a foreign member (RFC 7946 section 6.1): readers ignore it.
    return {"type": "FeatureCollection", "properties": props, "features": features}


def write(dest: Path, record: ImageRecord, shapes: list[Shape], severity: dict[str, dict[str, Any]]) -> Path:
    """DEST/<name>.geojson, atomically. Raises RuntimeFailure."""
    path = dest / f"{record.name}{SUFFIX}"
    atomic_write(path, (dumps(collection(record, shapes, severity), ensure_ascii=False) + "\n").encode())
    return path
