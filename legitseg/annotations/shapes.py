"""One result's regions as shapes: the fields every format shares, computed once.

Each `Shape` is one 8-connected region of one label with its area, box, mean probability
and provenance; COCO, GeoJSON and DICOM writers only lay these out.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from legitseg.annotations.regions import Region, Ring, polygons, regions, rle
from legitseg.annotations.source import Category, Result


@dataclass
class Shape:
    category: Category
    region: Region
    score: float | None  # mean probability of the label inside the region, when saved
    result: Result

    @property
    def area(self) -> int:
        return self.region.area

    @property
    def bbox(self) -> list[int]:
        return self.region.bbox

    def rle(self) -> dict:
        h, w = self.result.record.size or (0, 0)
        return rle(self.region, h, w)

    def polygons(self) -> list[tuple[Ring, list[Ring]]]:
        return polygons(self.region)

    def trace(self) -> dict[str, str | None]:
        """What makes the shape traceable: its model, run and weights."""
        return {"model": self.result.model, "run_id": self.result.run_id,
                "weights_sha256": self.result.entry.weights_sha256 or None}


def shapes(result: Result, mask: np.ndarray, probs: np.ndarray | None) -> Iterator[Shape]:
    """Every region of every non-background label of `result`, class by class."""
    classes = len(result.categories) + 1
    for region in regions(mask, classes):
        score = None
        if probs is not None:
            score = round(region.mean_of(result.class_probability(probs, region.class_index)), 6)
        yield Shape(result.categories[region.class_index - 1], region, score, result)
