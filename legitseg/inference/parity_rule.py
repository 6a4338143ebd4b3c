"""The parity rule: when ONNX Runtime's outputs cannot be told from torch's in what legitseg writes.

Both runners see the same seeded probe batches (`runners.probe_arrays`). The rule, in
docs/onnx.md ("The parity gate"), has three parts:

1. arithmetic: the largest logit difference, relative to the largest logit torch gave
   (at least 1), is at most the model's `parity_tolerance`. Rounding differences between
   two float32 kernels grow with the size of the numbers, so this figure stays the same
   when a head is sharpened; a wrong graph is off by 1e-2 or more;
2. probabilities: none differs by more than 2^-11 (4.9e-4), the step of the saved float16
   maps between 0.5 and 1, where masks are decided: a stored value moves by one step at most
   there, as torch's own rounding already makes some move;
3. masks and grades: a pixel's class (an image's grade) may differ only where torch's own
   probabilities are a near-tie (within 2^-11 of the threshold, or of each other: the saved
   map cannot say which side such a pixel is on), and for at most `MAX_CHANGED_SHARE` of the
   pixels.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from legitseg.inference.activation import activation
from legitseg.inference.runners import Runner, probe_arrays

RULE = "logit-relative+float16+near-tie v1"
# Verification's default `min_agreement` is 0.999 (verify/tolerances.py): the gate is never laxer.
MAX_CHANGED_SHARE = 1e-3
# float16's spacing in [0.5, 1): the resolution of a saved probability map where masks are decided.
FLOAT16_STEP = 2.0**-11


@dataclass
class ParityFigures:
    """What the gate measured for one model on its probe batches (run.json: `parity_gate`)."""

    probability: float  # max |dp|: the record's `parity` figure (its meaning before the rule)
    logit: float  # max |dz| of the activation's input (logits; centred and / temperature for softmax)
    logit_scale: float  # max(1, max |z|) of torch's logits
    relative: float  # logit / logit_scale: the figure held to parity_tolerance
    changed: int  # mask pixels (severity: images) whose class differs
    changed_off_tie: int  # of those, not near-ties
    compared: int  # mask pixels (severity: images) compared
    tolerance: float = math.nan
    passed: bool = False

    @property
    def changed_share(self) -> float:
        return self.changed / self.compared if self.compared else 0.0

    def failures(self, tolerance: float) -> list[str]:
        """Which parts of the rule fail, in words (empty: ONNX Runtime may run the model)."""
        out = []
        if not math.isfinite(self.relative) or self.relative > tolerance:
            out.append(f"logits differ from torch by {self.relative:.3g} of the largest logit "
                       f"> parity tolerance {tolerance:g}")
        if not self.probability <= FLOAT16_STEP:
            out.append(f"probabilities differ by {self.probability:.3g} > {FLOAT16_STEP:.3g} "
                       "(one float16 step of a saved map near the threshold)")
        if self.changed_off_tie:
            out.append(f"{self.changed_off_tie} mask pixel(s) or grade(s) change away from a near-tie")
        if self.changed_share > MAX_CHANGED_SHARE:
            out.append(f"{self.changed_share:.2g} of the mask pixels change (at most {MAX_CHANGED_SHARE:g})")
        return out

    def decide(self, tolerance: float) -> list[str]:
        failures = self.failures(tolerance)
        self.tolerance, self.passed = tolerance, not failures
        return failures

    def to_json(self) -> dict:
        out = {"rule": RULE, **asdict(self)}
        # 6 significant digits; JSON has no Infinity (a figure that could not be measured is null)
        return {k: (float(f"{v:.6g}") if isinstance(v, float) and math.isfinite(v) else
                    (None if isinstance(v, float) else v)) for k, v in out.items()}


def _activation_input(logits: torch.Tensor, spec) -> torch.Tensor:
    """Logits in the space the activation sees: softmax is blind to a shift per pixel, so centre them."""
    z = logits.double()
    if spec.task != "segmentation":  # severity and quality heads divide by their temperature
        z = z / spec.temperature
    if spec.classes > 1 or spec.task == "severity":  # a sigmoid (one class) is not blind to a shift
        z = z - z.mean(dim=1, keepdim=True)
    return z


def _classes(p_ref: torch.Tensor, p_new: torch.Tensor, spec) -> tuple[int, int, int]:
    """(changed, changed away from a near-tie, compared): pixels (grades) whose class differs.

    A near-tie: torch's probability within FLOAT16_STEP of the threshold (binary), or its
    two largest probabilities within FLOAT16_STEP of each other (argmax).
    """
    if spec.classes == 1 and spec.task != "severity":  # a sigmoid: a mask's threshold, a quality grade's 0.5
        t = spec.threshold if spec.task == "segmentation" else 0.5
        changed = (p_ref[:, 0] > t) != (p_new[:, 0] > t)
        tie = (p_ref[:, 0] - t).abs() <= FLOAT16_STEP
    else:
        changed = p_ref.argmax(dim=1) != p_new.argmax(dim=1)
        top2 = p_ref.topk(2, dim=1).values
        tie = (top2[:, 0] - top2[:, 1]) <= FLOAT16_STEP
    return int(changed.sum()), int((changed & ~tie).sum()), changed.numel()


def compare(reference: Runner, candidate: Runner) -> ParityFigures:
    """Run both runners on the probe batches and measure every part of the rule.

    NaN or Inf anywhere, or a shape that differs, gives infinite figures (the gate fails).
    Errors of the candidate propagate.
    """
    spec = reference.loaded.spec
    worst = {"probability": 0.0, "logit": 0.0, "scale": 1.0}
    changed = off_tie = compared = 0
    with torch.inference_mode():
        for arrays in probe_arrays(spec):
            z_ref, z_new = reference.logits(arrays).float().cpu(), candidate.logits(arrays).float().cpu()
            if z_ref.shape != z_new.shape or not (torch.isfinite(z_ref).all() and torch.isfinite(z_new).all()):
                return ParityFigures(math.inf, math.inf, math.inf, math.inf, 0, 0, 0)
            p_ref, p_new = activation(z_ref, spec), activation(z_new, spec)
            worst["probability"] = max(worst["probability"], (p_ref - p_new).abs().max().item())
            a_ref, a_new = _activation_input(z_ref, spec), _activation_input(z_new, spec)
            worst["logit"] = max(worst["logit"], (a_ref - a_new).abs().max().item())
            worst["scale"] = max(worst["scale"], a_ref.abs().max().item())
            c, o, n = _classes(p_ref.double(), p_new.double(), spec)
            changed, off_tie, compared = changed + c, off_tie + o, compared + n
    return ParityFigures(worst["probability"], worst["logit"], worst["scale"], worst["logit"] / worst["scale"],
                         changed, off_tie, compared)
