"""legitseg: batch inference of segmentation-models-pytorch models over image folders.

The public API (docs/python-api.md) is imported on first use, so `import legitseg`
does not import torch::

    from legitseg import Predictor
    predictor = Predictor("models.yaml", device="cpu")
    for prediction in predictor.predict("photos/"):
        ...
"""

import os
from typing import TYPE_CHECKING, Any

# No code path may reach a model hub; huggingface_hub reads this at import time,
# so it is set before anything imports smp.
os.environ["HF_HUB_OFFLINE"] = "1"

from legitseg._version import __version__  # noqa: E402 - after the environment is set; no torch here
from legitseg.errors import (  # noqa: E402
    LegitsegError,
    ManifestError,
    NoImages,
    OutputLocked,
    RuntimeFailure,
    UsageError,
    WeightsError,
)

if TYPE_CHECKING:
    from legitseg.api import ImageFailed, ModelResult, Prediction, Predictor, RunSummary

_LAZY = {name: "legitseg.api" for name in ("ImageFailed", "ModelResult", "Prediction", "Predictor", "RunSummary")}

__all__ = [
    "ImageFailed", "LegitsegError", "ManifestError", "ModelResult", "NoImages", "OutputLocked",
    "Prediction", "Predictor", "RunSummary", "RuntimeFailure", "UsageError", "WeightsError",
    "__version__",
]


def __getattr__(name: str) -> Any:
    """Import the API module on first use of one of its names (it imports torch only when used)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'legitseg' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
