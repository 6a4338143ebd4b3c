"""Verification tolerances: what a case may differ by, per model (docs/verification.md).

No numpy or torch: the command line reads the defaults at import time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from legitseg.errors import UsageError

# Largest |dp| that storage alone can produce: half a uint8 step, plus half a float16 step
# (in [0.5, 1)) for the map that was quantised and again for the map compared with it.
QUANTISATION_FLOOR = 0.5 / 255 + 2 * 2.0**-12


@dataclass(frozen=True)
class Tolerances:
    """What a case may differ by, per model.

    max_dp: largest absolute probability difference (any pixel, any class);
    min_agreement: smallest fraction of pixels whose mask value is identical;
    max_score_delta: largest difference of a severity score.
    """

    max_dp: float = 0.01
    min_agreement: float = 0.999
    max_score_delta: float = 0.01

    def problems(self) -> list[str]:
        """Out-of-range values, named (empty when all are valid)."""
        out = []
        if not (math.isfinite(self.max_dp) and QUANTISATION_FLOOR <= self.max_dp <= 1.0):
            out.append(f"max_dp {self.max_dp}: must be between {QUANTISATION_FLOOR:.4f} "
                       "(the uint8 quantisation of stored maps) and 1")
        if not (math.isfinite(self.min_agreement) and 0.0 <= self.min_agreement <= 1.0):
            out.append(f"min_agreement {self.min_agreement}: must be between 0 and 1")
        if not (math.isfinite(self.max_score_delta) and self.max_score_delta >= 0.0):
            out.append(f"max_score_delta {self.max_score_delta}: must be a number >= 0")
        return out

    def checked(self) -> Tolerances:
        """self, or UsageError naming the bad values (for command-line options)."""
        problems = self.problems()
        if problems:
            raise UsageError("tolerances: " + "; ".join(problems))
        return self

    def to_json(self) -> dict[str, float]:
        return {"max_dp": self.max_dp, "min_agreement": self.min_agreement,
                "max_score_delta": self.max_score_delta}
