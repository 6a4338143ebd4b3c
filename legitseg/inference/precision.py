"""The compute settings of a torch model: the autocast dtype of a --precision, and the memory
layouts that `layout_tuning.tune` chooses between. The precisions themselves, and where each
runs, are named in `legitseg.manifest.choices.PRECISIONS`.
"""

from __future__ import annotations

import torch

# The half precisions autocast to; fp32 and tf32 run in float32 (tf32: TensorFloat-32 matmuls
# and convolutions, switched by torch_runner.tf32_switch).
_AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The dtype autocast runs a --precision in; None for the float32 ones."""
    return _AUTOCAST.get(precision)


# How a model runs on a GPU. Only the memory layout is chosen by timing (`layout_tuning.tune`):
# both layouts compute the same function, so the choice cannot change what a user gets. Casting
# the weights to the half type instead of autocast does change the arithmetic: a model asks for
# it by name (manifest `half_weights: true`, part of its settings digest), never a stopwatch.
LAYOUTS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
# Largest change in probabilities a layout may make against the default one (cuDNN picks other
# kernels for each, whose sums round differently); a layout beyond it is not used.
VARIANT_TOLERANCE = {"fp32": 1e-4, "tf32": 1e-2, "fp16": 1e-2, "bf16": 5e-2}


def variants(precision: str) -> list[str]:
    """The layouts timing may choose between, the default (channels_last) first."""
    return list(LAYOUTS)
