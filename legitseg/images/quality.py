"""Input adequacy measures of one decoded photograph (docs/quality.md gives each formula).

Computed once per image, in the decode worker, on a working copy of the upright 8-bit RGB
photograph: the mean of each k x k block, k = the smallest integer that brings the longer
side to at most WORKING_SIZE (never below 1 nor above the shorter side), the last partial
rows and columns dropped. The block sums are integers, so every implementation of the
formula gets the same working copy; the measures are float64 arithmetic on it.
"""

from __future__ import annotations

import math

import numpy as np

from legitseg.manifest.quality import METHOD, WORKING_SIZE, Quality, QualityPolicy, judge

DARK_LEVEL = 5.0  # luminance at or below this (of 255) counts as clipped dark
BRIGHT_LEVEL = 250.0  # at or above this, clipped bright
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights of R, G, B


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
    }


def assess(rgb: np.ndarray, policy: QualityPolicy) -> Quality:
    """The measures of `rgb` and `policy`'s verdict on them."""
    return judge(measures(rgb), policy)


def current(quality: Quality | None) -> bool:
    """True when stored measures were computed by these formulas (else the image is measured again)."""
    return quality is not None and quality.method == METHOD
