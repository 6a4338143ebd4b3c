"""Comparing one case's outputs with a verification package's expected outputs, and the report.

Pure numbers and text: no torch, no file layout beyond reading the arrays it is given.
Probability maps are stored in packages quantised to uint8 (`round(p * 255)`), so a
comparison carries a quantisation error of at most 1/510, plus the float16 rounding of the
maps of both runs (at most 2**-12 each); tolerances must stay above that floor (0.00245).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from legitseg.verify.tolerances import QUANTISATION_FLOOR, Tolerances


@dataclass
class Measure:
    """One number compared with its limit. `value` None: not comparable (shapes differ, missing)."""

    name: str  # mask_agreement | max_dp | score_delta | grade
    value: float | None
    limit: float | None
    ok: bool
    note: str = ""

    def describe(self) -> str:
        if self.name == "grade":
            return self.note
        if self.value is None:
            return f"{self.name} not comparable ({self.note})"
        op = ">=" if self.name == "mask_agreement" else "<="
        verdict = "" if self.ok else f", limit {op} {self.limit:g}"
        return f"{self.name} {self.value:.6g}{verdict}"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"value": self.value, "limit": self.limit, "ok": self.ok}
        if self.note:
            out["note"] = self.note
        return out


@dataclass
class ModelComparison:
    model: str
    measures: list[Measure] = field(default_factory=list)
    error: str | None = None  # the model failed on this case in the verifying run

    @property
    def ok(self) -> bool:
        return self.error is None and all(m.ok for m in self.measures)

    def failures(self) -> list[str]:
        if self.error is not None:
            return [f"{self.model}: failed to run: {self.error}"]
        return [f"{self.model}: {m.describe()}" for m in self.measures if not m.ok]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ok": self.ok}
        if self.error is not None:
            out["error"] = self.error
        out.update({m.name: m.to_json() for m in self.measures})
        return out


def quantise(probabilities: np.ndarray) -> np.ndarray:
    """(C, H, W) probabilities in [0, 1] -> uint8 round(p * 255)."""
    p = np.clip(probabilities.astype(np.float32), 0.0, 1.0)
    return np.rint(p * 255.0).astype(np.uint8)


def compare_segmentation(model: str, expected_mask: np.ndarray, expected_q: np.ndarray,
                         mask: np.ndarray, probabilities: np.ndarray, tol: Tolerances) -> ModelComparison:
    """Mask agreement (fraction of equal pixels) and max |dp| against the dequantised map."""
    out = ModelComparison(model)
    if mask.shape != expected_mask.shape:
        out.measures.append(Measure("mask_agreement", None, tol.min_agreement, False,
                                    f"mask shape {mask.shape} expected {expected_mask.shape}"))
    else:
        agreement = float(np.mean(mask == expected_mask))
        out.measures.append(Measure("mask_agreement", agreement, tol.min_agreement,
                                    agreement >= tol.min_agreement))
    if probabilities.shape != expected_q.shape:
        out.measures.append(Measure("max_dp", None, tol.max_dp, False,
                                    f"probability shape {probabilities.shape} expected {expected_q.shape}"))
    else:
        dp = np.abs(probabilities.astype(np.float32) - expected_q.astype(np.float32) / 255.0)
        worst = float(dp.max()) if dp.size else 0.0
        ok = math.isfinite(worst) and worst <= tol.max_dp
        out.measures.append(Measure("max_dp", worst if math.isfinite(worst) else None, tol.max_dp, ok,
                                    "" if math.isfinite(worst) else "non-finite probabilities"))
    return out


def compare_severity(model: str, expected: dict[str, Any], probabilities: list[float], score: float,
                     grade: int, tol: Tolerances) -> ModelComparison:
    """Score delta, max |dp| over the class probabilities, and the grade (must be equal)."""
    out = ModelComparison(model)
    want = [float(v) for v in expected.get("probabilities") or []]
    if len(want) != len(probabilities):
        out.measures.append(Measure("max_dp", None, tol.max_dp, False,
                                    f"{len(probabilities)} classes expected {len(want)}"))
    else:
        worst = max((abs(a - b) for a, b in zip(probabilities, want, strict=True)), default=0.0)
        out.measures.append(Measure("max_dp", worst, tol.max_dp, worst <= tol.max_dp))
    delta = abs(float(score) - float(expected.get("score", math.nan)))
    ok = math.isfinite(delta) and delta <= tol.max_score_delta
    out.measures.append(Measure("score_delta", delta if math.isfinite(delta) else None, tol.max_score_delta, ok,
                                "" if math.isfinite(delta) else "no expected score"))
    same = grade == expected.get("grade")
    out.measures.append(Measure("grade", float(grade), None, same,
                                f"grade {grade}" + ("" if same else f" expected {expected.get('grade')}")))
    return out


# -- the readable report ------------------------------------------------------------------
def _cell(m: Measure | None) -> str:
    if m is None:
        return ""
    text = "n/a" if m.value is None else (f"{int(m.value)}" if m.name == "grade" else f"{m.value:.6g}")
    return text if m.ok else f"**{text} FAIL**"


def render_markdown(data: dict[str, Any]) -> str:
    """The Markdown report of a verification.json document."""
    verdict = "PASSED" if data["ok"] else "FAILED"
    run = data.get("run", {})
    versions = run.get("versions", {})
    lines = [
        f"# Verification {verdict}",
        "",
        f"- package: `{data['package']}` (made {data.get('package_created', '?')} "
        f"with legitseg {data.get('package_legitseg', '?')})",
        f"- package sha256 (of its package.json; pin it with `--expect-digest`): `{data['package_sha256']}`",
        f"- verified: {data['verified_at']}, legitseg {versions.get('legitseg')}, torch {versions.get('torch')}, "
        f"onnxruntime {versions.get('onnxruntime')}, device {run.get('device')}",
        f"- manifest: `{data['manifest']['path']}` (sha256 `{data['manifest']['sha256']}`)",
        f"- cases: {data['counts']['passed']} passed, {data['counts']['failed']} failed",
        "",
        "## Models",
        "",
        "| model | backend (package / now) | weights sha256 | settings | max dp | min agreement | max score delta |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for name, m in data["models"].items():
        tol = m["tolerances"]
        sha = "same" if m["weights_sha256"]["ok"] else f"**differs**: `{m['weights_sha256']['actual']}`"
        settings = "same" if m["settings"]["ok"] else "**differs**: " + ", ".join(
            f"{k} {v['package']!r} -> {v['manifest']!r}" for k, v in m["settings"]["differs"].items())
        lines.append(f"| {name} | {m['backend']['package']} / {m['backend']['now']} | {sha} | {settings} | "
                     f"{tol['max_dp']:g} | {tol['min_agreement']:g} | {tol['max_score_delta']:g} |")
    lines += ["", "## Cases", "",
              "| case | model | verdict | mask agreement | max dp | score delta | grade |",
              "|---|---|---|---:|---:|---:|---:|"]
    for case in data["cases"]:
        for model, c in case["models"].items():
            cells = []
            for key in ("mask_agreement", "max_dp", "score_delta", "grade"):
                raw = c.get(key)
                cells.append("" if raw is None else _cell(Measure(key, raw["value"], raw["limit"], raw["ok"])))
            verdict_cell = "pass" if c["ok"] else f"**FAIL**{': ' + c['error'] if c.get('error') else ''}"
            lines.append(f"| {case['name']} | {model} | {verdict_cell} | " + " | ".join(cells) + " |")
    lines += ["", "Probability maps are stored quantised to uint8; a difference below "
              f"{QUANTISATION_FLOOR:.4f} can come from that quantisation alone.", ""]
    return "\n".join(lines)
