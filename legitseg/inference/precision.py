"""The compute settings of a torch model: the autocast dtype per --precision, and the memory
layouts that `layout_tuning.tune` chooses between.
"""

from __future__ import annotations

import torch

# Autocast dtype per --precision; tf32 is fp32 storage with TensorFloat-32 matmuls and convolutions.
PRECISIONS = {"fp32": None, "tf32": None, "fp16": torch.float16, "bf16": torch.bfloat16}

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
