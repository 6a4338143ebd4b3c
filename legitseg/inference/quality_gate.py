"""A `task: quality` model as the input-adequacy policy's gate (docs/quality.md).

The engine runs the quality model first on a batch; its score joins each image's measures
(`quality_model`) and the policy judges again. With `on_inadequate: skip`, the images it
now finds inadequate are not given to the other models.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from legitseg.manifest.quality import QualityPolicy, with_model_score
from legitseg.output.records import ModelOutput

if TYPE_CHECKING:
    from legitseg.images.decoded import DecodedImage


def quality_gate(model: str, policy: QualityPolicy, items: list[DecodedImage], todo: list[int],
                 outputs: list[dict[str, ModelOutput]]) -> list[int]:
    """Judge `items` (the images `todo` indexes in the batch) with `model`'s score among their
    measures; return the indices the other models still run on.

    An image whose quality model failed is judged on its measures alone.
    """
    keep = []
    for i, item in zip(todo, items, strict=True):
        result = outputs[i][model].result
        if item.quality is not None and result is not None:
            item.quality = with_model_score(item.quality, model, result.score, policy)
        if item.quality is None or not item.quality.skipped:
            keep.append(i)
    return keep


def spared(item: DecodedImage) -> ModelOutput:
    """The output of a model the quality model's verdict spared: not run, not failed."""
    reasons = ", ".join(item.quality.reason_names) if item.quality is not None else "quality_model"
    return ModelOutput.failed(f"not run: inadequate input ({reasons})", "inadequate")
