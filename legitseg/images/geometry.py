"""Integer geometry of the accuracy modes: letterbox boxes, tile positions, blend windows.

Pure arithmetic (no torch): the decode workers, the runners and the tests share it,
so the place where an image is put on a canvas and the place its logits are cut
back from are computed by one function.
"""

from __future__ import annotations

import math

import numpy as np

# Standard deviation of the Gaussian blend window, as a fraction of the tile size
# (nnU-Net's 1/8: the window falls to exp(-8) ~ 3e-4 at the tile's edge, never 0).
GAUSSIAN_SIGMA = 1 / 8


def _round_div(num: int, den: int) -> int:
    """num / den rounded half up, in integers (no float error for any image size)."""
    return (2 * num + den) // (2 * den)


def stride_padding(h: int, w: int, stride: int) -> tuple[int, int]:
    """Rows and columns of zeros that take (h, w) up to the next multiples of `stride` (`pad` models)."""
    return (-h) % stride, (-w) % stride


def letterbox_size(h: int, w: int, ih: int, iw: int) -> tuple[int, int]:
    """Size (rh, rw) of an h x w image scaled to fit ih x iw with its aspect ratio kept.

    The limiting side fills the input exactly; the other is rounded to the nearest
    pixel (at least 1, at most the input's).
    """
    if h * iw <= w * ih:  # width-limited (the image is relatively wider than the input)
        return max(1, min(ih, _round_div(h * iw, w))), iw
    return ih, max(1, min(iw, _round_div(w * ih, h)))


def letterbox_offset(rh: int, rw: int, ih: int, iw: int) -> tuple[int, int]:
    """(top, left) of an rh x rw content centred on an ih x iw canvas.

    An odd number of padding rows (columns) puts the extra one at the bottom (right).
    """
    return (ih - rh) // 2, (iw - rw) // 2


def content_slices(rh: int, rw: int, ih: int, iw: int, centred: bool) -> tuple[slice, slice]:
    """Where an rh x rw content sits on an ih x iw canvas: centred (letterbox) or top-left (tiles).

    The one definition both of placing inputs and of cropping logits back.
    """
    if rh > ih or rw > iw:
        raise ValueError(f"content {rh}x{rw} does not fit on a {ih}x{iw} canvas")
    top, left = letterbox_offset(rh, rw, ih, iw) if centred else (0, 0)
    return slice(top, top + rh), slice(left, left + rw)


def tile_starts(size: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of tiles along one axis of `size` pixels, covering it exactly.

    The tiles are spread evenly so that the last one ends at `size`; neighbours overlap
    by at least `overlap` x tile (as far as whole pixels allow). The step is at least
    one pixel whatever the overlap, so there are never two tiles at one place and never
    a division by zero. An axis shorter than the tile has one tile at 0 (padded).
    """
    if size <= tile:
        return [0]
    target = max(1, math.floor(tile * (1.0 - overlap)))
    gaps = math.ceil((size - tile) / target)
    span = size - tile
    return [_round_div(i * span, gaps) for i in range(gaps + 1)]


def tile_boxes(h: int, w: int, th: int, tw: int, overlap: float) -> list[tuple[int, int, int, int]]:
    """(y0, x0, y1, x1) of every tile of an h x w image, row by row; edges clipped to the image."""
    return [(y, x, min(y + th, h), min(x + tw, w))
            for y in tile_starts(h, th, overlap) for x in tile_starts(w, tw, overlap)]


def blend_window(th: int, tw: int, blend: str) -> np.ndarray:
    """(th, tw) float32 weights of one tile's prediction: all ones, or a Gaussian.

    The Gaussian is centred exactly on the tile's centre, (th-1)/2 and (tw-1)/2 in
    pixel indices (between two pixels for an even size), so the window is symmetric:
    w[y, x] == w[th-1-y, x] == w[y, tw-1-x]. Its peak is scaled to 1.
    """
    if blend == "constant":
        return np.ones((th, tw), np.float32)
    if blend != "gaussian":
        raise ValueError(f"unknown blend {blend!r}; valid: gaussian, constant")

    def axis(n: int) -> np.ndarray:
        d = np.arange(n, dtype=np.float64) - (n - 1) / 2.0
        sigma = n * GAUSSIAN_SIGMA
        return np.exp(-(d * d) / (2.0 * sigma * sigma))

    win = np.outer(axis(th), axis(tw))
    return (win / win.max()).astype(np.float32)
