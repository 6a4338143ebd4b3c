"""Per-image uncertainty of one model's output, and the referral verdict (docs/uncertainty.md).

Pure functions on probabilities: no files, no engine. docs/uncertainty.md is the user's
statement of every formula; the tests hold an independent numpy reference of each.

- From the final probabilities at the original size, exactly as saved in the .npz (float16):
  `entropy`, `boundary_entropy`, `near_threshold` (segmentation); `entropy`, `grade_spread`
  (severity).
- From the TTA views and ensemble members before they are averaged (`MemberStats`, fed
  by `ModeRunner` at the model's resolution): `member_spread`, `member_disagreement`
  (segmentation), `member_spread` of the expected grades (severity). They travel from the
  runner to postprocessing on the averaged output tensor (`MEMBERS_ATTR`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import torch

from legitseg.manifest.referral import uncertainty_on

if TYPE_CHECKING:
    from legitseg.manifest.referral import ReferPolicy
    from legitseg.manifest.spec import ModelSpec
    from legitseg.output.records import SegmentationResult, SeverityResult

# A pixel is near the decision when its probability is within NEAR of a binary model's
# threshold, or when the two largest class probabilities differ by less than 2 * NEAR
# (the same rule for a binary model at threshold 0.5: p_fg - p_bg = 2p - 1).
NEAR = 0.1
# Boundary band half-width in pixels: min(H, W) // BAND_DIVISOR, at least 1.
BAND_DIVISOR = 100
MEMBERS_ATTR = "legitseg_members"
_TINY = np.float32(np.finfo(np.float32).tiny)  # 0 * log(tiny) = 0: the convention 0 log 0 = 0


# -- segmentation, from the final probabilities -----------------------------------------------
def entropy_map(probs: np.ndarray) -> np.ndarray:
    """Normalised predictive entropy per pixel (H, W) in [0, 1] of probabilities (C, H, W).

    C = 1 (a binary model's foreground probability p): the entropy of (p, 1 - p) over ln 2.
    C >= 2: -sum_c p_c ln p_c over ln C.
    """
    p = probs.astype(np.float32, copy=False)
    if p.shape[0] == 1:
        p = p[0]
        q = 1.0 - p
        h = p * np.log(np.maximum(p, _TINY)) + q * np.log(np.maximum(q, _TINY))
        return -h / np.float32(math.log(2))
    h = np.zeros(p.shape[1:], np.float32)
    for plane in p:
        h += plane * np.log(np.maximum(plane, _TINY))
    return -h / np.float32(math.log(p.shape[0]))


def band_width(h: int, w: int) -> int:
    """Half-width of the boundary band in pixels."""
    return max(1, min(h, w) // BAND_DIVISOR)


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """Pixels (H, W) bool with an 8-neighbour inside the image of another class in `mask`."""
    edge = np.zeros(mask.shape, bool)
    h, w = mask.shape
    for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):
        a = (slice(0, h - dy), slice(max(0, -dx), w - max(0, dx)))
        b = (slice(dy, h), slice(max(0, dx), w - max(0, -dx)))
        d = mask[a] != mask[b]
        edge[a] |= d
        edge[b] |= d
    return edge


def boundary_band(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels within Chebyshev distance `width` of a boundary pixel (both sides of the edge)."""
    edge = boundary_map(mask).view(np.uint8)
    kernel = np.ones((2 * width + 1, 2 * width + 1), np.uint8)
    return cv2.dilate(edge, kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0).view(bool)


def near_map(probs: np.ndarray, threshold: float) -> np.ndarray:
    """Pixels (H, W) bool near the decision (see NEAR)."""
    p = probs.astype(np.float32, copy=False)
    if p.shape[0] == 1:
        return np.abs(p[0] - np.float32(threshold)) < NEAR
    top2 = np.partition(p, p.shape[0] - 2, axis=0)[-2:]
    return (top2[1] - top2[0]) < 2 * NEAR


def segmentation_measures(probs: np.ndarray, mask: np.ndarray, threshold: float) -> dict[str, Any]:
    """`entropy` (mean over the image), `boundary_entropy` (mean over the boundary band of
    the predicted mask; None when the mask has a single class), `near_threshold` (share of
    pixels), and `band_width` (pixels), from probabilities (C, H, W) and the mask (H, W)."""
    h = entropy_map(probs)
    width = band_width(*mask.shape)
    band = boundary_band(mask, width)
    n_band = int(np.count_nonzero(band))
    return {
        "entropy": float(h.mean(dtype=np.float64)),
        "boundary_entropy": float(h[band].mean(dtype=np.float64)) if n_band else None,
        "near_threshold": float(np.count_nonzero(near_map(probs, threshold)) / h.size),
        "band_width": width,
    }


# -- severity, from the class probabilities -----------------------------------------------------
def severity_measures(probabilities: list[float] | np.ndarray, values: tuple[float, ...]) -> dict[str, Any]:
    """`entropy` (normalised by ln K) and `grade_spread` (standard deviation of the class value
    under the predicted distribution) of K class probabilities."""
    p = np.asarray(probabilities, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    mean = float((p * v).sum())
    logs = np.log(np.maximum(p, np.finfo(np.float64).tiny))
    return {"entropy": float(-(p * logs).sum() / math.log(len(p))),
            "grade_spread": math.sqrt(max(float((p * (v - mean) ** 2).sum()), 0.0))}


# -- views and members, before they are averaged -------------------------------------------------
class MemberStats:
    """Accumulates the K probabilities of one image's TTA views x ensemble members.

    Segmentation, per pixel of the model's output (C, h, w): running sums of p and p^2 in
    float64 (the spread as sqrt(E[p^2] - E[p]^2) would lose its small values in float32),
    and whether the views' classes (p > threshold, or the argmax) all agree. Severity: each
    view's expected class value.
    """

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.k = 0
        self.s1: torch.Tensor | None = None
        self.s2: torch.Tensor | None = None
        self.first: torch.Tensor | None = None
        self.differs: torch.Tensor | None = None
        self.expected: list[float] = []

    def add(self, p: torch.Tensor) -> None:
        """One view's probabilities: (C, h, w) for segmentation, (classes,) for severity."""
        self.k += 1
        if self.spec.task == "severity":
            values = torch.tensor(self.spec.values, dtype=torch.float64, device=p.device)
            self.expected.append(float((p.double() * values).sum()))
            return
        q = p.double()
        cls = (p[0] > self.spec.threshold) if p.shape[0] == 1 else p.argmax(dim=0)
        if self.s1 is None:
            self.s1, self.s2, self.first = q.clone(), q * q, cls
            self.differs = torch.zeros_like(cls, dtype=torch.bool)
        else:
            self.s1.add_(q)
            self.s2.add_(q * q)
            self.differs |= cls != self.first

    def result(self) -> dict[str, Any]:
        """`members` (K) and the measures; see docs/uncertainty.md."""
        if self.spec.task == "severity":
            e = np.asarray(self.expected, dtype=np.float64)
            return {"members": self.k, "member_spread": float(e.std())}
        assert self.s1 is not None and self.s2 is not None and self.differs is not None
        mean = self.s1 / self.k
        var = (self.s2 / self.k - mean * mean).clamp_(min=0.0)
        return {"members": self.k, "member_spread": float(var.sqrt_().mean()),
                "member_disagreement": float(self.differs.double().mean())}


def members_of(output: Any) -> dict[str, Any] | None:
    """The view/member measures a ModeRunner attached to an averaged output, if any."""
    return getattr(output, MEMBERS_ATTR, None)


# -- the verdict -----------------------------------------------------------------------------------
def referral(measures: dict[str, Any], policy: ReferPolicy) -> dict[str, Any]:
    """`refer` is true when the policy's measure is above its limit. A measure without a value
    (no boundary in the mask, no views under --no-tta) refers nothing: value None."""
    value = measures.get(policy.uncertainty)
    return {"refer": value is not None and value > policy.above, "measure": policy.uncertainty,
            "value": value, "above": policy.above}


def referral_text(entry: Any) -> str:
    """`; referred (measure value > limit)` for a record entry its policy referred, else ''."""
    why = entry.referral or {}
    if entry.refer is not True or not isinstance(why.get("value"), int | float):
        return ""
    return f"; referred ({why.get('measure')} {why['value']:.3g} > {why.get('above')})"


def referred(record: Any) -> bool:
    """Whether any model's refer policy referred a record's image."""
    return any(e.refer is True for e in record.models.values())


def annotate(result: SegmentationResult | SeverityResult, spec: ModelSpec,
             members: dict[str, Any] | None = None) -> None:
    """Fill `result.uncertainty` (and `result.referral` under a policy) when the model has
    uncertainty on; a segmentation result needs its probabilities for it."""
    if not uncertainty_on(spec):
        return
    if spec.task == "severity":
        measures = severity_measures(result.probabilities, spec.values)  # type: ignore[arg-type]
    elif result.probabilities is not None:
        measures = segmentation_measures(result.probabilities, result.mask, spec.threshold)  # type: ignore[union-attr]
    else:
        return
    measures.update(members or {})
    result.uncertainty = measures
    if spec.refer is not None:
        result.referral = referral(measures, spec.refer)
