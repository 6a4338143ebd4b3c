"""`legitseg models check`: hash, build, strict load and a dummy forward per model.

The evidence for seed requirements PR-001 (builds offline, well under 30 s) and
PR-004 (weights load strictly and give finite outputs of the declared shape).
"""

from __future__ import annotations

from dataclasses import dataclass

from legitseg.errors import LegitsegError
from legitseg.manifest.spec import ModelSpec


@dataclass
class CheckResult:
    name: str
    ok: bool
    build_seconds: float | None = None
    parameters: int | None = None
    weight_bytes: int | None = None
    output_shape: tuple[int, ...] | None = None
    dtype: str | None = None
    error: str | None = None
    mean: tuple[float, ...] | None = None  # the normalisation the built model uses
    std: tuple[float, ...] | None = None


def probe_model(spec: ModelSpec) -> CheckResult:
    """Build `spec` with its verified weights and run one dummy forward (`legitseg models check`).

    Never raises for a bad model: the problem is in the result's `error`.
    """
    import torch

    from legitseg.models.factory import load_model

    try:
        loaded = load_model(spec)
    except LegitsegError as err:
        return CheckResult(spec.name, False, error=str(err))
    norm = {"mean": loaded.mean, "std": loaded.std}
    h, w = loaded.probe_input_size()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, spec.in_channels, h, w, generator=gen)
    try:
        with torch.inference_mode():
            y = loaded.module(x)
    except RuntimeError as err:
        return CheckResult(spec.name, False, loaded.build_seconds, loaded.parameters, loaded.weight_bytes,
                           error=f"dummy forward at {h}x{w} failed: {err}", **norm)
    want = (1, spec.classes) if spec.task != "segmentation" else (1, spec.classes, h, w)
    result = CheckResult(spec.name, True, loaded.build_seconds, loaded.parameters, loaded.weight_bytes,
                         tuple(y.shape), str(y.dtype).removeprefix("torch."), **norm)
    problems = []
    if tuple(y.shape) != want:
        problems.append(f"output shape {tuple(y.shape)}, expected {want}")
    if y.dtype != torch.float32:
        problems.append(f"output dtype {y.dtype}, expected float32")
    if not torch.isfinite(y).all():
        problems.append("output has NaN or Inf values")
    if problems:
        result.ok, result.error = False, "; ".join(problems)
    return result
