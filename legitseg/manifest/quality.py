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
METHOD = 2  # 2: blockiness added
WORKING_SIZE = 512  # longer side of the working copy, in pixels
BLOCKINESS_LIMIT = 1.7  # default max_blockiness, from the study (docs/quality.md)

# measure -> unit; the names are the record's keys (docs/quality.md gives each formula).
UNITS = {
    "sharpness": "grey levels^2 (variance of the Laplacian at the working size)",
    "mean_luminance": "fraction of full scale (0-1)",
    "dark_fraction": "fraction of working pixels with luminance <= 5",
    "bright_fraction": "fraction of working pixels with luminance >= 250",
    "contrast": "grey levels (standard deviation of luminance)",
    "short_side": "pixels (shorter side of the upright image, before any resize)",
    "colour_cast": "fraction (spread of the channel means over their mean)",
    "blockiness": "ratio (luminance steps on the strongest 8-pixel grid over the rest, at full resolution; 1: none)",
    "quality_model": "score 0-1 of the task: quality model (1: best)",
}
# Measured by a model, not by these formulas: kept when the formulas' method changes.
MODEL_MEASURE = "quality_model"

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
    "max_blockiness": ("compressed", "blockiness", "max"),
    "min_quality_model": ("quality_model", MODEL_MEASURE, "min"),
}
REASONS = ("blurry", "too_dark", "overexposed", "low_resolution", "low_contrast", "colour_cast", "compressed",
           "quality_model")


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
    max_blockiness: float | None = Field(BLOCKINESS_LIMIT, ge=1)
    # The score of the manifest's task: quality model; None: the score is recorded, not judged.
    min_quality_model: float | None = Field(None, ge=0, le=1)

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
    model: str | None = None  # the task: quality model whose score is the measure quality_model

    @property
    def skipped(self) -> bool:
        """The models are not run on this image (skip policy, inadequate)."""
        return not self.adequate and self.on_inadequate == "skip"

    @property
    def reason_names(self) -> list[str]:
        return list(dict.fromkeys(r.reason for r in self.reasons))

    def to_json(self) -> dict[str, Any]:
        out = {"adequate": self.adequate, "reasons": [r.to_json() for r in self.reasons],
               "measures": dict(self.measures), "units": {k: UNITS[k] for k in self.measures if k in UNITS},
               "method": self.method, "policy": self.policy, "on_inadequate": self.on_inadequate}
        if self.model is not None:
            out["model"] = self.model
        return out

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
        model = data.get("model")
        return cls(measures, bool(data.get("adequate", True)), reasons, str(data.get("policy", "")),
                   str(data.get("on_inadequate", "flag")), int(data.get("method", 0) or 0),
                   model if isinstance(model, str) else None)


def judge(measures: dict[str, float], policy: QualityPolicy, model: str | None = None) -> Quality:
    """The verdict of `policy` on `measures`: every limit crossed is a reason (value and limit).
    `model` names the quality model when `measures` holds its score."""
    reasons = []
    for name, (reason, measure, direction) in LIMITS.items():
        limit = getattr(policy, name)
        value = measures.get(measure)
        if limit is None or value is None:
            continue
        if (value < limit) if direction == "min" else (value > limit):
            reasons.append(Reason(reason, measure, value, float(limit)))
    return Quality(dict(measures), not reasons, reasons, policy.digest(), policy.on_inadequate, METHOD, model)


def with_model_score(quality: Quality, model: str, score: float, policy: QualityPolicy) -> Quality:
    """`quality` with the quality model's score among its measures, judged again."""
    return judge({**quality.measures, MODEL_MEASURE: float(score)}, policy, model)


def check_quality_models(manifest: Any) -> Any:
    """A manifest has one task: quality model at most; a threshold on its score needs one.

    Raises ValueError (the manifest's validation turns it into a ManifestError, exit 3).
    """
    named = [s.name for s in manifest.models.values() if s.task == "quality"]
    if len(named) > 1:
        raise ValueError(f"models {', '.join(named)} all have task 'quality'; a manifest has one quality model at most")
    for spec in manifest.models.values():
        if spec.task == "quality" and spec.class_values is not None:
            raise ValueError(f"model {spec.name!r}: 'class_values' does not apply to task 'quality': its score is "
                             "the expected grade scaled to 0..1")
    if manifest.quality is not None and manifest.quality.min_quality_model is not None and not named:
        raise ValueError("quality.min_quality_model needs a model with task: quality in models")
    return manifest
