"""A mask's connected regions, each as COCO RLE and as polygons with holes on pixel edges.

Coordinates are those of the image's pixel grid: x to the right, y down, (0, 0) the top-left
corner of the top-left pixel, so pixel (x, y) is the square [x, x+1] x [y, y+1]. Polygons
follow pixel edges (a one-pixel region is that unit square), which is COCO's convention
for polygons and QuPath's for GeoJSON.

Regions are 8-connected, as the record's `components` counts them. Work per region is
confined to its bounding box, so a 12 MP mask with many small regions costs little more
than one pass over it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np

Ring = list[tuple[int, int]]  # closed implicitly: the last vertex joins the first


@dataclass
class Region:
    """One connected region of one class: its box and its pixels within the box."""

    class_index: int
    x: int
    y: int
    crop: np.ndarray  # (h, w) uint8 0/1: the region's pixels inside its bounding box
    area: int  # pixels

    @property
    def bbox(self) -> list[int]:
        """[x, y, width, height] in pixel edges (COCO's bbox)."""
        return [self.x, self.y, int(self.crop.shape[1]), int(self.crop.shape[0])]

    def mean_of(self, values: np.ndarray) -> float:
        """Mean of the full-size map `values` (H, W) over the region's pixels."""
        h, w = self.crop.shape
        window = values[self.y:self.y + h, self.x:self.x + w]
        return float(window[self.crop.astype(bool)].astype(np.float64).mean())


def regions(mask: np.ndarray, classes: int) -> Iterator[Region]:
    """Every 8-connected region of classes 1..classes-1, class by class, then top to bottom."""
    for c in range(1, classes):
        binary = (mask == c).astype(np.uint8)
        if not binary.any():
            continue
        n, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8, ltype=cv2.CV_32S)
        for k in range(1, n):
            x, y, w, h, area = (int(v) for v in stats[k])
            crop = (labels[y:y + h, x:x + w] == k).astype(np.uint8)
            yield Region(c, x, y, crop, area)


def rle(region: Region, height: int, width: int) -> dict:
    """The region as compressed COCO RLE over the whole image (pycocotools' own encoder).

    The runs are computed from the bounding box alone: in COCO's column-major order the
    region's pixels are its crop's in column-major order, shifted, so no full-size array
    is made per region.
    """
    from pycocotools import mask as coco_mask

    h = region.crop.shape[0]
    idx = np.flatnonzero(region.crop.T.ravel())  # column-major positions inside the crop
    cols, rows = np.divmod(idx, h)
    full = (region.x + cols).astype(np.int64) * height + region.y + rows
    # Runs of consecutive positions: starts where the step is not 1.
    breaks = np.flatnonzero(np.diff(full) != 1) + 1
    starts = full[np.r_[0, breaks]]
    ends = full[np.r_[breaks - 1, full.size - 1]] + 1
    counts = np.empty(2 * starts.size + 1, dtype=np.int64)
    counts[0] = starts[0]
    counts[1:-1:2] = ends - starts
    counts[2:-1:2] = starts[1:] - ends[:-1]
    counts[-1] = height * width - ends[-1]
    if counts[-1] == 0:
        counts = counts[:-1]
    encoded = coco_mask.frPyObjects({"counts": counts.tolist(), "size": [height, width]}, height, width)
    return {"size": [height, width], "counts": encoded["counts"].decode("ascii")}


def _edge_rings(contours, offset_x: int, offset_y: int) -> list[Ring]:
    """Contours traced on the mask enlarged 2x -> rings on pixel edges of the original.

    In the enlarged mask pixel x covers columns 2x and 2x+1; a contour through the centres
    of its boundary pixels passes column 2x on the left edge and 2x+1 on the right, and the
    column 2x-1 or 2x+2 of the neighbour across an edge of a hole: ceil(u / 2) maps each to
    the edge coordinate. A diagonal step between two regions' blocks maps to one point.
    """
    rings = []
    for contour in contours:
        pts = contour.reshape(-1, 2)
        xs = (pts[:, 0] + 1) // 2 + offset_x
        ys = (pts[:, 1] + 1) // 2 + offset_y
        ring: Ring = []
        for x, y in zip(xs.tolist(), ys.tolist(), strict=True):
            if not ring or ring[-1] != (x, y):
                ring.append((x, y))
        while len(ring) > 1 and ring[-1] == ring[0]:
            ring.pop()
        if len(ring) >= 3:
            rings.append(_drop_collinear(ring))
    return rings


def _drop_collinear(ring: Ring) -> Ring:
    """Vertices in the middle of a straight run add nothing to the outline."""
    pts = np.asarray(ring, dtype=np.int64)
    prev, nxt = np.roll(pts, 1, axis=0), np.roll(pts, -1, axis=0)
    cross = (pts[:, 0] - prev[:, 0]) * (nxt[:, 1] - pts[:, 1]) - (pts[:, 1] - prev[:, 1]) * (nxt[:, 0] - pts[:, 0])
    keep = cross != 0
    return [ring[i] for i in np.flatnonzero(keep).tolist()] if keep.sum() >= 3 else ring


def polygons(region: Region) -> list[tuple[Ring, list[Ring]]]:
    """The region's outline as (outer ring, hole rings) on pixel edges.

    One region is usually one outer ring; a region whose parts touch only at corners is
    traced as one ring that touches itself there. Rings of the enlarged mask's nested
    islands (a region inside a hole belongs to another region) are not this region's.
    """
    big = cv2.resize(region.crop, None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST)
    contours, hierarchy = cv2.findContours(big, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None:
        return []
    hierarchy = hierarchy[0]
    out = []
    for i, (_, _, first_child, parent) in enumerate(hierarchy):
        if parent != -1:
            continue  # a hole: collected with its outer ring below
        outer = _edge_rings([contours[i]], region.x, region.y)
        if not outer:
            continue
        holes_contours = []
        child = first_child
        while child != -1:
            holes_contours.append(contours[child])
            child = hierarchy[child][0]
        out.append((outer[0], _edge_rings(holes_contours, region.x, region.y)))
    return out


def keyhole(outer: Ring, holes: list[Ring]) -> list[int]:
    """One COCO polygon (flat x, y list) for an outer ring with holes.

    COCO's polygons have no holes (several polygons are joined, not subtracted), so each
    hole is joined to the outer ring by a cut walked there and back; pycocotools fills a
    polygon by the even-odd rule, under which a doubled cut adds nothing (even where it
    crosses another hole) and the hole stays empty.
    """
    pts = np.asarray(outer, dtype=np.int64)
    at: dict[int, list[Ring]] = {}
    for hole in holes:  # each cut goes to the nearest vertex of the outer ring itself
        hx, hy = hole[0]
        j = int(np.argmin((pts[:, 0] - hx) ** 2 + (pts[:, 1] - hy) ** 2))
        at.setdefault(j, []).append(hole)
    path: Ring = []
    for j, vertex in enumerate(outer):
        path.append(vertex)
        for hole in at.get(j, ()):
            path += [*hole, hole[0], vertex]
    flat = [float(v) for point in path for v in point]
    if len(flat) < 8:  # pycocotools reads a 4-number list as a box, not a polygon
        flat += flat[:8 - len(flat)]
    return flat
