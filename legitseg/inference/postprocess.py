"""Model outputs -> masks, probabilities and scores (SPEC 4.3, 4.4).

Runs on the device that ran the model; only the finished mask (and, if asked
for, the float16 probabilities) come back to the host.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from legitseg.inference import uncertainty
from legitseg.inference.activation import activation, activation_
from legitseg.manifest.referral import uncertainty_on
from legitseg.output.records import SegmentationResult, SeverityResult

if TYPE_CHECKING:
    from legitseg.manifest.spec import ModelSpec

__all__ = ["SegmentationResult", "SeverityResult", "activation", "count_components", "regions", "segmentation", "severity"]


def segmentation(logits: torch.Tensor, size: tuple[int, int], spec: ModelSpec,
                 keep_probabilities: bool) -> SegmentationResult:
    """One image's logits (C, h, w) -> result at the original size (H, W).

    The mask comes from the logits themselves: a binary mask is `logits > cutoff`, the
    logit at which the float32 sigmoid crosses the threshold, and a multi-class mask is
    the argmax of the logits (softmax keeps the order). So no full-size probability map
    is made unless probabilities are kept. Tile mode's logits are made for this call at
    the original size and are used (and activated) in place. A model with uncertainty on
    keeps its probabilities: the measures are computed from them (docs/uncertainty.md).
    """
    keep_probabilities = keep_probabilities or uncertainty_on(spec)
    members = uncertainty.members_of(logits)
    if logits.device.type != "cpu":
        mask_t, probs_t = segmentation_on_device(logits, size, spec, keep_probabilities)
        return finish_segmentation(mask_t.cpu().numpy(), None if probs_t is None else probs_t.cpu().numpy(),
                                   size, spec, members)
    with torch.inference_mode():
        up = logits if _in_place(logits, size, spec) else upsample(logits, size)
        # numpy: no OpenMP team from a pool thread, and a fast argmax
        planes = up.numpy()
        mask = (np.greater(planes[0], sigmoid_cutoff(spec.threshold)).view(np.uint8) if spec.classes == 1
                else argmax_planes(planes))
        probs = None
        if keep_probabilities:
            prob = activation_(up, spec) if up is logits else activation(up, spec, dim=0)
            probs = prob.to(torch.float16).numpy()
    return finish_segmentation(mask, probs, size, spec, members)


def _in_place(logits: torch.Tensor, size: tuple[int, int], spec: ModelSpec) -> bool:
    """Tile mode's logits are made at the original size for postprocessing and may be used up."""
    return spec.resize == "tile" and tuple(logits.shape[-2:]) == tuple(size) and logits.dtype == torch.float32


def segmentation_on_device(logits: torch.Tensor, size: tuple[int, int], spec: ModelSpec,
                           keep_probabilities: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The device half of `segmentation` for the GPU: (mask, float16 probabilities or None), both
    still on the device, so that a whole batch comes back in one copy. Same arithmetic as
    `segmentation` on a device tensor; `finish_segmentation` does the rest on the host."""
    keep_probabilities = keep_probabilities or uncertainty_on(spec)
    with torch.inference_mode():
        up = logits if _in_place(logits, size, spec) else upsample(logits, size)
        if spec.classes == 1:
            mask = (up[0] > sigmoid_cutoff(spec.threshold)).view(torch.uint8)
        else:
            mask = up.argmax(dim=0).to(torch.uint8 if spec.classes <= 256 else torch.int32)
        probs = None
        if keep_probabilities:
            prob = activation_(up, spec) if up is logits else activation(up, spec, dim=0)
            probs = prob.to(torch.float16)
    return mask, probs


def counts_on_device(mask: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """Pixels per class of a mask, on its device (int64: background first; two for a binary mask).

    What `finish_segmentation` counts on the host, computed where the mask is so that the counts
    come back in the batch's one copy and no host thread reads the whole mask to count it.
    No `torch.bincount`: on CUDA it reads the largest value back to the host (a synchronisation).
    """
    with torch.inference_mode():
        if spec.classes == 1:
            positive = torch.count_nonzero(mask)
            return torch.stack([mask.numel() - positive, positive])
        counts = torch.zeros(spec.classes, dtype=torch.int64, device=mask.device)
        index = mask.reshape(-1).long()
        return counts.scatter_add_(0, index, torch.ones_like(index))


def finish_segmentation(mask: np.ndarray, probs: np.ndarray | None, size: tuple[int, int],
                        spec: ModelSpec, members: dict | None = None,
                        counts: np.ndarray | None = None) -> SegmentationResult:
    """Areas of a finished mask (H, W) on the host, and its regions to count (`regions`, on the first read of
    the result's `components`: in the thread that writes the mask); `counts` from `counts_on_device` if given;
    with uncertainty on, its measures (`members`: those of the views/members, `uncertainty.members_of`)."""
    if mask.dtype == np.int32:
        mask = mask.astype(np.uint16)
    total = size[0] * size[1]
    per_class: list[int]
    if counts is not None:
        per_class = counts.tolist()
    elif spec.classes == 1:
        positive = int(np.count_nonzero(mask))
        per_class = [total - positive, positive]
    else:
        per_class = np.bincount(mask.ravel(), minlength=spec.classes).tolist()
    labels = spec.label_names
    area = {labels[i]: per_class[i] / total for i in range(1, len(labels))}
    present = tuple(bool(n) for n in per_class[:len(labels)])
    result = SegmentationResult(mask, probs, area,
                                functools.partial(regions, mask, tuple(labels), present, spec.classes == 1))
    uncertainty.annotate(result, spec, members)
    return result


def upsample(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (C, h, w) logits to `size` (half-pixel centres, as torch's align_corners=False).

    On the CPU with OpenCV, one plane at a time: it runs in OpenCV's own thread pool, 3-4x
    faster than torch here and without starting an OpenMP team from a worker thread
    beside the forward pass. Values agree with torch's to ~1e-4 of a logit.
    """
    if logits.device.type == "cpu" and max(size) < 32767:
        planes = logits.float().numpy()
        out = np.empty((planes.shape[0], *size), dtype=np.float32)
        for c, plane in enumerate(planes):
            done = cv2.resize(plane, (size[1], size[0]), dst=out[c], interpolation=cv2.INTER_LINEAR)
            if not np.shares_memory(done, out):
                out[c] = done
        return torch.from_numpy(out)
    return F.interpolate(logits[None].float(), size=size, mode="bilinear", align_corners=False)[0]


@functools.lru_cache(maxsize=64)
def sigmoid_cutoff(threshold: float) -> float:
    """The float32 x above which `torch.sigmoid(x) > threshold` (SPEC 4.3), found on the float32 line.

    A binary search over the float32 values with torch's own sigmoid (on a vector, the
    code path a whole mask takes), so `logits > cutoff` gives the same mask as
    thresholding the sigmoid, without computing it for every pixel.
    """
    def above(bits: int) -> bool:
        x = torch.tensor([bits], dtype=torch.int32).view(torch.float32).expand(256).contiguous()
        return bool((torch.sigmoid(x) > threshold).all())

    def key(value: float) -> int:  # float32 -> an int in the same order
        b = int(torch.tensor([value], dtype=torch.float32).view(torch.int32))
        return b if b >= 0 else -(b & 0x7FFFFFFF)

    def bits(k: int) -> int:
        return k if k >= 0 else -k | -0x80000000

    lo, hi = key(-200.0), key(200.0)  # sigmoid(-200) = 0 <= threshold < 1 = sigmoid(200)
    while hi - lo > 1:  # invariant: not above(lo), above(hi)
        mid = (lo + hi) // 2
        if above(bits(mid)):
            hi = mid
        else:
            lo = mid
    return float(torch.tensor([bits(lo)], dtype=torch.int32).view(torch.float32))


def argmax_planes(planes: np.ndarray) -> np.ndarray:
    """Index of the largest of C planes (C, H, W) per pixel, the first on ties; 0 where any is NaN.

    What `torch.argmax(softmax(x), 0)` gives (a NaN logit makes every probability NaN, and
    argmax over NaNs is 0), one plane at a time: on the CPU torch's argmax over the first
    dimension took 1.2 s for 3 x 4000 x 3000, this 0.17 s. uint8 up to 256 classes, else uint16.
    """
    best = planes[0].copy()
    index = np.zeros(planes.shape[1:], np.uint8 if planes.shape[0] <= 256 else np.uint16)
    for c in range(1, planes.shape[0]):
        above = np.greater(planes[c], best)
        index[above] = c
        np.maximum(best, planes[c], out=best)  # NaN spreads: best is NaN where any plane is
    index[np.isnan(best)] = 0
    return index


def regions(mask: np.ndarray, labels: tuple[str, ...], present: tuple[bool, ...], binary: bool) -> dict[str, int]:
    """Label name -> connected regions of `mask`, background excepted; a label without a pixel (`present`
    false, from the areas' counts) has none and its mask is not walked."""
    return {labels[i]: count_components(mask, i, binary=binary) if present[i] else 0 for i in range(1, len(labels))}


def count_components(mask: np.ndarray, label: int, binary: bool = False) -> int:
    """Connected regions (8-connectivity) of one label; a 0/1 mask is labelled as it is."""
    plane = mask if binary else (mask == label).view(np.uint8)
    try:
        # 16-bit labels write half the memory of int32: about 30% less CPU on a 12 MP mask. OpenCV
        # refuses (cv2.error) past 65535 regions; the count is then made again with 32-bit labels.
        n, _ = cv2.connectedComponents(plane, connectivity=8, ltype=cv2.CV_16U)
    except cv2.error:
        n, _ = cv2.connectedComponents(plane, connectivity=8, ltype=cv2.CV_32S)
    return int(n) - 1


def severity(logits: torch.Tensor, spec: ModelSpec) -> SeverityResult:
    """One image's logits (classes,) -> probabilities, grade (argmax) and score (expected class value)."""
    with torch.inference_mode():
        p = activation(logits.float(), spec, dim=0).cpu().numpy()
    return finish_severity(p, spec, uncertainty.members_of(logits))


def severity_on_device(logits: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """The device half of `severity`: float32 probabilities, still on the device."""
    with torch.inference_mode():
        return activation(logits.float(), spec, dim=0)


def finish_severity(probabilities: np.ndarray, spec: ModelSpec, members: dict | None = None) -> SeverityResult:
    """Grade (argmax) and score (expected class value) from float32 probabilities (classes,).
    A quality model's scalar head (one probability): grade 1 from 0.5 on, else 0."""
    p = probabilities.astype(np.float64)
    values = np.asarray(spec.values, dtype=np.float64)
    grade = int(p.argmax()) if p.size > 1 else int(p[0] >= 0.5)
    result = SeverityResult([float(v) for v in p], grade, float((p * values).sum()))
    uncertainty.annotate(result, spec, members)
    return result
