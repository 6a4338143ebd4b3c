"""The per-model uncertainty settings of a manifest entry (docs/uncertainty.md):
`uncertainty: true` and a referral policy `refer: {uncertainty: <measure>, above: x}`.

Both have defaults (off, none), so a manifest without them has the settings digest it
had before; once given they are part of it. Measures that compare TTA views or ensemble
members need the model to have either.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from legitseg.manifest.spec import ModelSpec

# Measures per task, in the order they are written (docs/uncertainty.md defines each).
SEGMENTATION_MEASURES = ("entropy", "boundary_entropy", "near_threshold", "member_spread", "member_disagreement")
SEVERITY_MEASURES = ("entropy", "grade_spread", "member_spread")
MEMBER_MEASURES = ("member_spread", "member_disagreement")
Measure = Literal["entropy", "boundary_entropy", "near_threshold", "member_spread", "member_disagreement",
                  "grade_spread"]


class ReferPolicy(BaseModel):
    """Refer an image to a person when `uncertainty` (a measure) is above `above`."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    uncertainty: Measure
    above: float = Field(ge=0.0)


def uncertainty_on(spec: ModelSpec) -> bool:
    """Whether the model's uncertainty measures are computed (asked for, or needed by `refer`)."""
    return spec.uncertainty or spec.refer is not None


def check_referral(spec: ModelSpec) -> None:
    """Raises ValueError when the policy's measure does not exist for the model."""
    if spec.refer is None:
        return
    measure = spec.refer.uncertainty
    valid = SEGMENTATION_MEASURES if spec.task == "segmentation" else SEVERITY_MEASURES
    if measure not in valid:
        raise ValueError(f"refer.uncertainty {measure!r} does not apply to a {spec.task} model; "
                         f"valid: {', '.join(valid)}")
    if measure in MEMBER_MEASURES and not spec.tta and not spec.is_ensemble:
        raise ValueError(f"refer.uncertainty {measure!r} compares TTA views or ensemble members, "
                         "but this model has neither (add 'tta' or several 'weights')")
