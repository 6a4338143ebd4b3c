"""Independent implementations of the accuracy modes (docs/accuracy.md), for checking legitseg.

Plain torch/numpy/cv2 and the models of tests/reference.py; none of legitseg's code.
Where legitseg moves uint8 pixels for a TTA view, this flips the normalised float
tensor; where legitseg puts inputs on a canvas with slices, this calls F.pad; tile
positions, the letterbox size and the Gaussian window are recomputed from their
documented formulas. Every function returns probabilities at the model's resolution
(letterbox: cropped back) or, for tiles, at the image's, as float64 numpy (C, h, w).
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tests.reference import CV_INTERPOLATION, mean_std

# (forward transform of an NCHW tensor, its inverse), as docs/accuracy.md defines the views.
VIEWS = {
    "identity": (lambda t: t, lambda t: t),
    "hflip": (lambda t: torch.flip(t, [3]), lambda t: torch.flip(t, [3])),
    "vflip": (lambda t: torch.flip(t, [2]), lambda t: torch.flip(t, [2])),
    "rot180": (lambda t: torch.flip(t, [2, 3]), lambda t: torch.flip(t, [2, 3])),
    "rot90": (lambda t: torch.rot90(t, 1, [2, 3]), lambda t: torch.rot90(t, 3, [2, 3])),
    "rot270": (lambda t: torch.rot90(t, 3, [2, 3]), lambda t: torch.rot90(t, 1, [2, 3])),
}


def normalised(img: np.ndarray, entry: dict) -> torch.Tensor:
    mean, std = mean_std(entry)
    x = (img.astype(np.float64) / 255.0 - mean) / std
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None].float()


def probs(y: torch.Tensor, entry: dict) -> torch.Tensor:
    y = y.double()
    if entry["task"] == "severity":
        return torch.softmax(y / entry.get("temperature", 1.0), dim=1)
    return torch.sigmoid(y) if entry["classes"] == 1 else torch.softmax(y, dim=1)


def averaged(modules: list[nn.Module], x: torch.Tensor, entry: dict, views: list[str]) -> torch.Tensor:
    """Mean over members and views of the probabilities of x (1, C, H, W), views undone."""
    total = 0
    with torch.no_grad():
        for module in modules:
            for v in ["identity", *views]:
                fwd, inv = VIEWS[v]
                y = module(fwd(x))
                total = total + (inv(probs(y, entry)) if y.ndim == 4 else probs(y, entry))
    return total / (len(modules) * (1 + len(views)))


def stretch(modules: list[nn.Module], rgb: np.ndarray, entry: dict, views: list[str]) -> np.ndarray:
    """TTA and ensembles of stretch models: probabilities at input_size."""
    h, w = entry["input_size"]
    img = cv2.resize(rgb, (w, h), interpolation=CV_INTERPOLATION[entry.get("interpolation", "linear")])
    return averaged(modules, normalised(img, entry), entry, views)[0].numpy()


def letterbox(modules: list[nn.Module], rgb: np.ndarray, entry: dict, views: list[str]) -> np.ndarray:
    """Scale to fit input_size (aspect kept, rounded half up), pad zeros after normalisation
    centred (odd extra row/column bottom/right), predict, crop the content back."""
    ih, iw = entry["input_size"]
    h, w = rgb.shape[:2]
    scale = min(ih / h, iw / w)
    rh = min(ih, max(1, math.floor(h * iw / w + 0.5))) if scale == iw / w else ih
    rw = min(iw, max(1, math.floor(w * ih / h + 0.5))) if scale != iw / w else iw
    img = cv2.resize(rgb, (rw, rh), interpolation=CV_INTERPOLATION[entry.get("interpolation", "linear")])
    top, left = (ih - rh) // 2, (iw - rw) // 2
    x = F.pad(normalised(img, entry), (left, iw - rw - left, top, ih - rh - top))
    p = averaged(modules, x, entry, views)[0]
    return (p if p.ndim == 1 else p[:, top:top + rh, left:left + rw]).numpy()


def starts(size: int, tile: int, overlap: float) -> list[int]:
    if size <= tile:
        return [0]
    step = max(1, math.floor(tile * (1 - overlap)))
    n = math.ceil((size - tile) / step)
    return [math.floor(i * (size - tile) / n + 0.5) for i in range(n + 1)]


def gaussian(n: int) -> np.ndarray:
    c, s = (n - 1) / 2, n / 8
    return np.exp(-((np.arange(n) - c) ** 2) / (2 * s * s))


def tiled(modules: list[nn.Module], rgb: np.ndarray, entry: dict, views: list[str]) -> np.ndarray:
    """Sliding window at native resolution: probabilities at the image's size."""
    th, tw = entry["tile_size"] if isinstance(entry["tile_size"], list) else [entry["tile_size"]] * 2
    overlap = entry.get("overlap", 0.5)
    h, w = rgb.shape[:2]
    if entry.get("blend", "gaussian") == "gaussian":
        win = np.outer(gaussian(th), gaussian(tw))
        win /= win.max()
    else:
        win = np.ones((th, tw))
    acc = np.zeros((entry["classes"], h, w))
    norm = np.zeros((h, w))
    x_all = normalised(rgb, entry)
    for y0 in starts(h, th, overlap):
        for x0 in starts(w, tw, overlap):
            crop = x_all[..., y0:y0 + th, x0:x0 + tw]
            ch, cw = crop.shape[-2:]
            padded = F.pad(crop, (0, tw - cw, 0, th - ch))
            p = averaged(modules, padded, entry, views)[0, :, :ch, :cw].numpy()
            acc[:, y0:y0 + ch, x0:x0 + cw] += p * win[:ch, :cw]
            norm[y0:y0 + ch, x0:x0 + cw] += win[:ch, :cw]
    return acc / norm
