"""The input-adequacy policy (`quality:` in models.yaml) and the verdict it gives on measures.

Pure data and arithmetic: the measures themselves are computed from the decoded photograph
by `images/quality.py`; here they are only compared with the policy's limits. Kept below
the output layer so a record's verdict can be judged again from its stored measures
(a changed limit) without decoding the image (docs/quality.md).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# Version of the measures' formulas (docs/quality.md). Stored measures of another version are
# measured again, never compared with limits chosen for these.
METHOD = 1
WORKING_SIZE = 512  # longer side of the working copy, in pixels

# measure -> unit; the names are the record's keys (docs/quality.md gives each formula).
UNITS = {
    "sharpness": "grey levels^2 (variance of the Laplacian at the working size)",
    "mean_luminance": "fraction of full scale (0-1)",
    "dark_fraction": "fraction of working pixels with luminance <= 5",
    "bright_fraction": "fraction of working pixels with luminance >= 250",
    "contrast": "grey levels (standard deviation of luminance)",
    "short_side": "pixels (shorter side of the upright image, before any resize)",
    "colour_cast": "fraction (spread of the channel means over their mean)",
}

# limit field -> (reason, measure, direction): "min" limits flag values below them, "max" above.
LIMITS: dict[str, tuple[str, str, str]] = {
    "min_sharpness": ("blurry", "sharpness", "min"),
    "min_mean_luminance": ("too_dark", "mean_luminance", "min"),
    "max_dark_fraction": ("too_dark", "dark_fraction", "max"),
    "max_mean_luminance": ("overexposed", "mean_luminance", "max"),
    "max_bright_fraction": ("overexposed", "bright_fraction", "max"),
    "min_contrast": ("low_contrast", "contrast", "min"),
    "min_short_side": ("low_resolution", "short_side", "min"),
    "max_colour_cast": ("colour_cast", "colour_cast", "max"),
}
REASONS = ("blurry", "too_dark", "overexposed", "low_resolution", "low_contrast", "colour_cast", "quality_model")


class QualityPolicy(BaseModel):
    """The top-level `quality:` section. A limit set to null is not checked.

    Defaults come from the degradation study of docs/quality.md. They are not clinically
    validated: a device team sets and validates its own.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    on_inadequate: Literal["flag", "skip"] = "flag"
    require_adequate: bool = False
    min_sharpness: float | None = Field(5.0, ge=0)
    min_mean_luminance: float | None = Field(0.15, ge=0, le=1)
    max_dark_fraction: float | None = Field(0.5, ge=0, le=1)
    max_mean_luminance: float | None = Field(0.9, ge=0, le=1)
    max_bright_fraction: float | None = Field(0.25, ge=0, le=1)
    min_contrast: float | None = Field(5.0, ge=0)
    min_short_side: int | None = Field(200, ge=1)
    max_colour_cast: float | None = Field(1.2, ge=0)

    def digest(self) -> str:
        """sha256 of every field (defaults included) and the measures' method: a record whose
        verdict carries another digest is judged again (docs/quality.md, resume)."""
        payload = {"method": METHOD, "policy": self.model_dump(mode="json")}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Reason:
    """One limit a measure crossed."""

    reason: str
    measure: str
    value: float
    limit: float

    def to_json(self) -> dict[str, Any]:
        return {"reason": self.reason, "measure": self.measure, "value": self.value, "limit": self.limit}


@dataclass
class Quality:
    """An image's measures and the policy's verdict on them (the record's `quality` block)."""

    measures: dict[str, float]
    adequate: bool = True
    reasons: list[Reason] = field(default_factory=list)
    policy: str = ""  # QualityPolicy.digest() of the verdict
    on_inadequate: str = "flag"
    method: int = METHOD

    @property
    def skipped(self) -> bool:
        """The models are not run on this image (skip policy, inadequate)."""
        return not self.adequate and self.on_inadequate == "skip"

    @property
    def reason_names(self) -> list[str]:
        return list(dict.fromkeys(r.reason for r in self.reasons))

    def to_json(self) -> dict[str, Any]:
        return {"adequate": self.adequate, "reasons": [r.to_json() for r in self.reasons],
                "measures": dict(self.measures), "units": dict(UNITS), "method": self.method,
                "policy": self.policy, "on_inadequate": self.on_inadequate}

    @classmethod
    def from_json(cls, data: Any) -> Quality | None:
        """The block of a record, or None when it is not one (then the image is measured again)."""
        if not isinstance(data, dict) or not isinstance(data.get("measures"), dict):
            return None
        try:
            measures = {str(k): float(v) for k, v in data["measures"].items()}
            reasons = [Reason(str(r["reason"]), str(r["measure"]), float(r["value"]), float(r["limit"]))
                       for r in data.get("reasons") or []]
        except (KeyError, TypeError, ValueError):
            return None
        return cls(measures, bool(data.get("adequate", True)), reasons, str(data.get("policy", "")),
                   str(data.get("on_inadequate", "flag")), int(data.get("method", 0) or 0))


def judge(measures: dict[str, float], policy: QualityPolicy) -> Quality:
    """The verdict of `policy` on `measures`: every limit crossed is a reason (value and limit)."""
    reasons = []
    for name, (reason, measure, direction) in LIMITS.items():
        limit = getattr(policy, name)
        value = measures.get(measure)
        if limit is None or value is None:
            continue
        if (value < limit) if direction == "min" else (value > limit):
            reasons.append(Reason(reason, measure, value, float(limit)))
    return Quality(dict(measures), not reasons, reasons, policy.digest(), policy.on_inadequate)
