"""`legitseg evaluate` broken down by input adequacy (the `quality:` policy's verdict, docs/quality.md)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from legitseg.output.records import ImageRecord


def adequacy_of(records: list[ImageRecord]) -> dict[str, bool]:
    """Image name (and path as given) -> adequate, for records that carry a verdict."""
    out: dict[str, bool] = {}
    for r in records:
        if isinstance(r.quality, dict) and isinstance(r.quality.get("adequate"), bool):
            out[r.name] = out[r.image] = r.quality["adequate"]
    return out


def by_adequacy(m: Any, adequacy: dict[str, bool]) -> dict[str, Any]:
    """`m` is a scoring.ModelEvaluation (not named here: scoring imports this module).

    Per group (adequate, inadequate, not measured): images scored and the headline measures
    (segmentation: mean Dice and IoU over images; severity: MAE and exact-grade share)."""
    groups: dict[str, dict[str, Any]] = {}

    def group(image: str) -> str:
        value = adequacy.get(image)
        return "not_measured" if value is None else "adequate" if value else "inadequate"

    if m.task == "segmentation":
        per: dict[str, list[dict[str, float | None]]] = {}
        for image, values in m.per_image().items():
            per.setdefault(group(image), []).append(values)
        for name, rows in per.items():
            dice = [r["dice"] for r in rows if r.get("dice") is not None]
            iou = [r["iou"] for r in rows if r.get("iou") is not None]
            groups[name] = {"images": len(rows), "mean_dice": float(np.mean(dice)) if dice else None,
                            "mean_iou": float(np.mean(iou)) if iou else None}
    else:
        per_grade: dict[str, list[tuple[int, int]]] = {}
        for image, true, pred, _ in m.grades:
            per_grade.setdefault(group(image), []).append((true, pred))
        for name, pairs in per_grade.items():
            diff = np.array([p - t for t, p in pairs], dtype=np.float64)
            groups[name] = {"images": len(pairs), "mae": float(np.abs(diff).mean()),
                            "exact": float((diff == 0).mean())}
    return dict(sorted(groups.items()))
