"""The activation legitseg applies to a model's logits, defined once: postprocessing, the
parity gate, the accuracy modes and the variant check all use it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from legitseg.manifest.spec import ModelSpec


def activation(logits: torch.Tensor, spec: ModelSpec, dim: int = 1) -> torch.Tensor:
    """The activation legitseg applies (SPEC 4.3, 4.4); classes along `dim`.

    Segmentation: sigmoid for one class, else softmax. Severity: softmax(logits / temperature).
    Quality: as severity; a scalar head (classes: 1) sigmoid(logits / temperature).
    The parity gate, postprocessing, the accuracy modes and the variant check all use it.
    """
    if spec.task == "quality" and spec.classes == 1:
        return torch.sigmoid(logits / spec.temperature)
    if spec.task != "segmentation":
        return torch.softmax(logits / spec.temperature, dim=dim)
    return torch.sigmoid(logits) if spec.classes == 1 else torch.softmax(logits, dim=dim)


def activation_(logits: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """`activation` of one segmentation output (C, H, W), in place."""
    if spec.classes == 1:
        return logits.sigmoid_()
    logits.sub_(logits.amax(dim=0, keepdim=True)).exp_()
    return logits.div_(logits.sum(dim=0, keepdim=True))
