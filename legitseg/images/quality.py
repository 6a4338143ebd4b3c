"""Input adequacy measures of one decoded photograph (docs/quality.md gives each formula).

Computed once per image, in the decode worker, on a working copy of the upright 8-bit RGB
photograph: the mean of each k x k block, k = the smallest integer that brings the longer
side to at most WORKING_SIZE (never below 1 nor above the shorter side), the last partial
rows and columns dropped. The block sums are integers, so every implementation of the
formula gets the same working copy; the measures are float64 arithmetic on it. Blockiness
alone is measured at full resolution (on a central crop): a downscaled copy has no 8x8 grid.
"""

from __future__ import annotations

import math

import numpy as np

from legitseg.manifest.quality import (
    METHOD,
    MODEL_MEASURE,
    WORKING_SIZE,
    Quality,
    QualityPolicy,
    judge,
)

DARK_LEVEL = 5.0  # luminance at or below this (of 255) counts as clipped dark
BRIGHT_LEVEL = 250.0  # at or above this, clipped bright
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights of R, G, B
BLOCK = 8  # side of a JPEG luminance block, in pixels
BLOCK_CROP = 512  # blockiness: side of the central full-resolution crop it is measured on
BLOCK_FLOOR = 1.0  # grey levels added to both means of the blockiness ratio: a flat image reads 1, not 0/0


def block_factor(height: int, width: int) -> int:
    """k of the working copy: ceil(longer side / WORKING_SIZE), within [1, shorter side]."""
    return max(1, min(height, width, math.ceil(max(height, width) / WORKING_SIZE)))


def working_copy(rgb: np.ndarray) -> np.ndarray:
    """(h, w, 3) float64 block means of an (H, W, 3) uint8 image, in grey levels."""
    height, width = rgb.shape[:2]
    k = block_factor(height, width)
    if k == 1:
        return rgb.astype(np.float64)
    h, w = height // k, width // k
    # Summed exactly in integers, k rows at a time then k columns: whole-row additions run
    # vectorised, a few times faster than numpy's strided reduction or a float copy.
    rows = rgb[: h * k, : w * k].reshape(h, k, w * k * 3)
    acc = rows[:, 0].astype(np.uint16 if 255 * k < 2**16 else np.uint32)
    for i in range(1, k):
        acc += rows[:, i]
    cols = acc.reshape(h, w, k, 3)
    sums = cols[:, :, 0].astype(np.uint32)
    for j in range(1, k):
        sums += cols[:, :, j]
    return sums / float(k * k)


def measures(rgb: np.ndarray) -> dict[str, float]:
    """Every measure of an upright (H, W, 3) uint8 RGB image, by name (units: manifest.quality.UNITS)."""
    work = working_copy(rgb)
    luma = LUMA[0] * work[..., 0] + LUMA[1] * work[..., 1] + LUMA[2] * work[..., 2]
    if luma.shape[0] >= 3 and luma.shape[1] >= 3:
        lap = (luma[:-2, 1:-1] + luma[2:, 1:-1] + luma[1:-1, :-2] + luma[1:-1, 2:] - 4.0 * luma[1:-1, 1:-1])
        sharpness = float(lap.var())
    else:  # no interior pixel: nothing to measure an edge with
        sharpness = 0.0
    channel = work.reshape(-1, 3).mean(axis=0)
    grey = float(channel.mean())
    return {
        "sharpness": sharpness,
        "mean_luminance": float(luma.mean()) / 255.0,
        "dark_fraction": float(np.count_nonzero(luma <= DARK_LEVEL)) / luma.size,
        "bright_fraction": float(np.count_nonzero(luma >= BRIGHT_LEVEL)) / luma.size,
        "contrast": float(luma.std()),
        "short_side": float(min(rgb.shape[0], rgb.shape[1])),
        "colour_cast": float(channel.max() - channel.min()) / max(grey, 1.0),
        "blockiness": blockiness(rgb),
    }


def blockiness(rgb: np.ndarray) -> float:
    """How much an 8x8 block grid shows in the luminance (JPEG compression), as a ratio; 1: none.

    On the central crop of at most BLOCK_CROP x BLOCK_CROP pixels at full resolution, for each
    direction whose crop side n is at least 2 x BLOCK: the mean absolute step between neighbours
    k and k+1 (k = 0..n-2) is averaged per phase p = (k+1) mod 8; the strongest phase is taken
    as the grid (EXIF rotation and crops move it) and the other seven as the inside of blocks.
    Result: (mean over directions of the grid phase + 1) / (mean over directions of the mean
    of the other phases + 1); 1.0 when no direction is long enough.
    """
    height, width = rgb.shape[:2]
    h, w = min(height, BLOCK_CROP), min(width, BLOCK_CROP)
    top, left = (height - h) // 2, (width - w) // 2
    crop = rgb[top:top + h, left:left + w]
    luma = LUMA[0] * crop[..., 0] + LUMA[1] * crop[..., 1] + LUMA[2] * crop[..., 2]
    grid, inside = [], []
    for axis in (0, 1):  # steps between rows, then between columns
        if luma.shape[axis] < 2 * BLOCK:
            continue
        steps = np.abs(np.diff(luma, axis=axis)).mean(axis=1 - axis)  # one mean per k
        phases = [float(steps[(p - 1) % BLOCK::BLOCK].mean()) for p in range(BLOCK)]
        strongest = max(phases)
        grid.append(strongest)
        inside.append((sum(phases) - strongest) / (BLOCK - 1))
    if not grid:
        return 1.0
    return (sum(grid) / len(grid) + BLOCK_FLOOR) / (sum(inside) / len(inside) + BLOCK_FLOOR)


def assess(rgb: np.ndarray, policy: QualityPolicy, stored: Quality | None = None) -> Quality:
    """The measures of `rgb` and `policy`'s verdict on them. The quality model's score in
    `stored` (measures of an older method) is kept: these formulas do not make it."""
    found = measures(rgb)
    if stored is not None and MODEL_MEASURE in stored.measures:
        found[MODEL_MEASURE] = stored.measures[MODEL_MEASURE]
        return judge(found, policy, stored.model)
    return judge(found, policy)


def current(quality: Quality | None) -> bool:
    """True when stored measures were computed by these formulas (else the image is measured again)."""
    return quality is not None and quality.method == METHOD
