"""Regions of a mask as COCO RLE and as polygons on pixel edges (issue 29): RLE exact, polygons
rasterised back by pycocotools agreeing on >= 99.5% of each region's pixels, at 12 MP too."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from pycocotools import mask as coco_mask

from legitseg.annotations.regions import keyhole, polygons, regions, rle


def full(region, h: int, w: int) -> np.ndarray:
    out = np.zeros((h, w), np.uint8)
    ch, cw = region.crop.shape
    out[region.y:region.y + ch, region.x:region.x + cw] = region.crop
    return out


def agreement(region, h: int, w: int) -> tuple[float, float]:
    """(share of the region's pixels the polygons cover, pixels they add outside it / region)."""
    back = coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects(
        [keyhole(outer, holes) for outer, holes in polygons(region)], h, w))).astype(bool)
    truth = full(region, h, w).astype(bool)
    return (back & truth).sum() / region.area, (back & ~truth).sum() / region.area


def shapes_mask(h: int, w: int) -> np.ndarray:
    """Holes (one inside another region's hole too), one-pixel regions, regions on every border,
    a diagonal chain (8-connected through corners only), and a second class."""
    m = np.zeros((h, w), np.uint8)
    s = max(1, min(h, w) // 20)
    cv2.circle(m, (w // 2, h // 2), 6 * s, 1, -1)
    cv2.circle(m, (w // 2, h // 2), 3 * s, 0, -1)  # a hole
    cv2.circle(m, (w // 2, h // 2), s, 1, -1)  # an island inside the hole: its own region
    m[h // 2 - 4 * s, w // 2 + 4 * s] = 0  # a one-pixel hole
    m[0:2 * s, 0:3 * s] = 1  # the top-left corner
    m[h - s:h, w // 3:w // 2] = 2  # the bottom border, class 2
    m[h // 3:h // 2, w - 1] = 1  # a one-pixel-wide strip on the right border
    m[3 * s, w - 3 * s] = 1  # a one-pixel region
    m[h - 1, 0] = 2  # a one-pixel region in the bottom-left corner
    for k in range(5):  # a diagonal chain
        m[3 * s + k, 5 * s + k] = 1
    return m


@pytest.mark.parametrize("size", [(40, 52), (120, 160), (3000, 4000)], ids=["40x52", "160x120", "12MP"])
def test_rle_is_exact_and_polygons_agree_on_each_region(size):
    h, w = size
    mask = shapes_mask(h, w)
    found = list(regions(mask, 3))
    n1 = cv2.connectedComponents((mask == 1).astype(np.uint8), connectivity=8)[0] - 1
    n2 = cv2.connectedComponents((mask == 2).astype(np.uint8), connectivity=8)[0] - 1
    assert len(found) == n1 + n2 >= 5
    union = np.zeros((h, w), np.uint8)
    for region in found:
        truth = full(region, h, w)
        encoded = rle(region, h, w)
        decoded = coco_mask.decode({"size": encoded["size"], "counts": encoded["counts"].encode()})
        np.testing.assert_array_equal(decoded, truth)
        assert region.area == int(truth.sum())
        covered, extra = agreement(region, h, w)
        assert covered >= 0.995 and extra <= 0.005, (region.bbox, covered, extra)
        union[truth.astype(bool)] = region.class_index
    np.testing.assert_array_equal(union, mask)


def test_a_one_pixel_region_is_its_unit_square_and_a_hole_is_a_ring():
    m = np.zeros((6, 6), np.uint8)
    m[2, 3] = 1
    (single,) = regions(m, 2)
    ((outer, holes),) = polygons(single)
    assert sorted(outer) == [(3, 2), (3, 3), (4, 2), (4, 3)] and holes == []
    m = np.zeros((6, 6), np.uint8)
    m[1:5, 1:5] = 1
    m[2:4, 2:4] = 0
    (ring,) = regions(m, 2)
    ((outer, holes),) = polygons(ring)
    assert sorted(outer) == [(1, 1), (1, 5), (5, 1), (5, 5)]
    assert len(holes) == 1 and sorted(holes[0]) == [(2, 2), (2, 4), (4, 2), (4, 4)]
    assert agreement(ring, 6, 6) == (1.0, 0.0)


def test_random_noise_regions_are_exact():
    rng = np.random.default_rng(1)
    mask = (rng.random((64, 96)) > 0.55).astype(np.uint8)
    for region in regions(mask, 2):
        assert agreement(region, 64, 96) == (1.0, 0.0)
