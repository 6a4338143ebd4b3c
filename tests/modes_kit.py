"""Helpers shared by the accuracy-mode tests: legitseg's probabilities for a decoded photo."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from legitseg.fsio import cache_root
from legitseg.images.decode import decode_rgb, prepare, read_bytes
from legitseg.inference.activation import activation
from legitseg.inference.registry import BuildSettings, build_runner
from legitseg.manifest.spec import ModelSpec, load_manifest
from legitseg.models.factory import load_model
from tests import reference
from tests.images import picture, save

CPU = torch.device("cpu")


def photos(root: Path, sizes: list[tuple[int, int]]) -> list[Path]:
    """PNG photographs (lossless, so Pillow and OpenCV decode the same pixels)."""
    return [save(root / f"photo{i}.png", picture(h, w, seed=40 + i)) for i, (h, w) in enumerate(sizes)]


def decoded(path: Path) -> np.ndarray:
    """legitseg's decode of a file (8-bit RGB)."""
    return decode_rgb(read_bytes(path), "PNG")


def runners(manifest: Path, name: str) -> dict[str, object]:
    """The model's runner on each backend (ONNX Runtime members gated against torch)."""
    spec = load_manifest(manifest).models[name]
    loaded = load_model(spec)
    settings = BuildSettings(cache_dir=cache_root())  # the test session's cache (tests/conftest.py)
    return {b: build_runner(loaded, CPU, "fp32", b, settings) for b in ("torch", "onnxruntime")}


def legit_probs(runner, rgb: np.ndarray, spec: ModelSpec | None = None) -> np.ndarray:
    """activation(runner.logits) of one image, float64 numpy."""
    spec = spec or runner.loaded.spec
    y = runner.logits([prepare(rgb, runner.prep)])[0]
    return activation(y.float(), spec, dim=0).double().numpy()


def reference_modules(kit, name: str) -> list:
    """The members of a ModelKit entry, built by tests/reference.py (no legitseg code)."""
    entry = kit.models[name]
    files = entry["weights"] if isinstance(entry["weights"], list) else [entry["weights"]]
    return [reference.build({**entry, "weights": f}, kit.root) for f in files]
