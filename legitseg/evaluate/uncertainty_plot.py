"""The risk-coverage plot of `legitseg evaluate` (docs/evaluate.md): one line per uncertainty
measure, the failure rate of the images kept against the share kept, when the most
uncertain are referred first. matplotlib's Agg renderer through a Figure (no pyplot state)."""

from __future__ import annotations

import io
from typing import Any


def risk_coverage_plot(model: str, curves: dict[str, Any], fail_below: float, task: str) -> bytes:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 4.0), layout="constrained")
    ax = fig.subplots()
    for measure, block in curves.items():
        points = block["risk_coverage"]
        auroc = "-" if block["auroc"] is None else f"{block['auroc']:.2f}"
        ax.plot([p["coverage"] for p in points], [p["failure_rate"] for p in points],
                marker=".", label=f"{measure} (AUROC {auroc})")
    ax.set_xlim(1.02, -0.02)  # referring more moves right: coverage falls
    ax.set_xlabel("coverage (share of images kept)")
    what = f"IoU < {fail_below:g}" if task == "segmentation" else "grade error >= 2"
    ax.set_ylabel(f"failure rate of kept images ({what})")
    ax.set_title(f"{model}: refer the most uncertain first")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return buf.getvalue()
