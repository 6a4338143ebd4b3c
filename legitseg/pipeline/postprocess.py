"""Model outputs -> masks, probabilities and scores (SPEC 4.3, 4.4).

Runs on the device that ran the model; only the finished mask (and, if asked
for, the float16 probabilities) come back to the host.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from legitseg.manifest import ModelSpec
from legitseg.records import SegmentationResult, SeverityResult

__all__ = ["SegmentationResult", "SeverityResult", "activation", "count_components", "segmentation", "severity"]


def activation(logits: torch.Tensor, spec: ModelSpec, dim: int = 1) -> torch.Tensor:
    """The activation legitseg applies (SPEC 4.3, 4.4); classes along `dim`.

    Segmentation: sigmoid for one class, else softmax. Severity: softmax(logits / temperature).
    The parity gate and the postprocessing below both use this one definition.
    """
    if spec.task == "severity":
        return torch.softmax(logits / spec.temperature, dim=dim)
    return torch.sigmoid(logits) if spec.classes == 1 else torch.softmax(logits, dim=dim)


def activation_(logits: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """`activation` of one segmentation output (C, H, W), in place."""
    if spec.classes == 1:
        return logits.sigmoid_()
    logits.sub_(logits.amax(dim=0, keepdim=True)).exp_()
    return logits.div_(logits.sum(dim=0, keepdim=True))


def segmentation(logits: torch.Tensor, size: tuple[int, int], spec: ModelSpec,
                 keep_probabilities: bool) -> SegmentationResult:
    """One image's logits (C, h, w) -> result at the original size (H, W).

    Tile mode's logits are made for this call at the original size: the activation is
    applied to them in place, so a full-resolution map per class exists once.
    """
    with torch.inference_mode():
        if spec.resize == "tile" and tuple(logits.shape[-2:]) == tuple(size) and logits.dtype == torch.float32:
            prob = activation_(logits, spec)
        else:
            up = F.interpolate(logits[None].float(), size=size, mode="bilinear", align_corners=False)[0]
            prob = activation(up, spec, dim=0)
        if spec.classes == 1:
            mask_t = (prob[0] > spec.threshold).to(torch.uint8)
            counts = torch.stack([(mask_t == 0).sum(), mask_t.sum(dtype=torch.int64)])
        else:
            mask_t = prob.argmax(dim=0)
            counts = torch.bincount(mask_t.flatten(), minlength=spec.classes)
            mask_t = mask_t.to(torch.uint8 if spec.classes <= 256 else torch.int32)
        mask = mask_t.cpu().numpy()
        if mask.dtype == np.int32:
            mask = mask.astype(np.uint16)
        counts = counts.cpu().tolist()
        probs = prob.to(torch.float16).cpu().numpy() if keep_probabilities else None
    total = size[0] * size[1]
    labels = spec.label_names
    area = {labels[i]: counts[i] / total for i in range(1, len(labels))}
    components = {labels[i]: count_components(mask, i) if counts[i] else 0 for i in range(1, len(labels))}
    return SegmentationResult(mask, probs, area, components)


def count_components(mask: np.ndarray, label: int) -> int:
    """Connected regions (8-connectivity) of one label."""
    n, _ = cv2.connectedComponents((mask == label).astype(np.uint8), connectivity=8)
    return int(n) - 1


def severity(logits: torch.Tensor, spec: ModelSpec) -> SeverityResult:
    """One image's logits (classes,) -> probabilities, grade (argmax) and score (expected class value)."""
    with torch.inference_mode():
        p = activation(logits.float(), spec, dim=0).cpu().double().numpy()
    values = np.asarray(spec.values, dtype=np.float64)
    return SeverityResult([float(v) for v in p], int(p.argmax()), float((p * values).sum()))
