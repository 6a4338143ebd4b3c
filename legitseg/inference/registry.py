"""The one place a backend is chosen and built (SPEC 4.2, 4.5).

The names and what each backend can do are written once, in `legitseg.manifest.choices`
(`BACKENDS`); here each name is mapped to its builder (`BUILDERS`). Adding a backend
(TensorRT, ...) means one row there, one builder function here and its runner module.
A model with accuracy modes gets a ModeRunner around one backend runner per ensemble member.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from legitseg.errors import UsageError
from legitseg.inference.modes import ModeRunner, needs_modes
from legitseg.inference.ort_runner import gate
from legitseg.inference.runners import Runner
from legitseg.inference.torch_runner import TorchRunner
from legitseg.manifest.choices import AUTO, BACKENDS, auto_backend, choices

if TYPE_CHECKING:
    from legitseg.manifest.spec import ModelSpec
    from legitseg.models.factory import LoadedModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildSettings:
    """What building a runner takes from the run's settings (`options.Environment`), never from os.environ."""

    cache_dir: Path | None = None  # exported graphs and layout choices are kept under it; None: kept nowhere
    ort_threads: int | None = None  # ONNX Runtime intra-op threads; None: every core this process may use


def choose_backend(requested: str | None, spec: ModelSpec, device: torch.device, precision: str) -> str:
    """The backend of one model: `requested` (--backend) if given, else the manifest's.

    auto is the first backend of `choices.AUTO_ORDER` that runs on the device in the
    precision (onnxruntime on the CPU in fp32, torch otherwise). A backend asked for on
    the command line where it cannot run is a UsageError; asked for by the manifest, it
    becomes what auto would choose, with a warning, since one manifest serves CPU and GPU
    machines alike.
    """
    choice = requested or spec.backend
    if choice == AUTO:
        return auto_backend(device.type, precision)
    backend = BACKENDS[choice]
    if backend.fits(device.type, precision):
        return choice
    why = f"the {choice} backend runs on {backend.where()} only (device {device}, precision {precision})"
    if requested:
        usable = [name for name, b in BACKENDS.items() if b.fits(device.type, precision)]
        raise UsageError(f"--backend {choice}: {why}; use --backend {choices([*usable, AUTO])}")
    fallback = auto_backend(device.type, precision)
    log.warning("%s: manifest asks for backend %s but %s; using %s", spec.name, choice, why, fallback)
    return fallback


def _torch(loaded: LoadedModel, device: torch.device, precision: str, settings: BuildSettings) -> Runner:
    return TorchRunner(loaded, device, precision, cache_dir=settings.cache_dir)


def _onnxruntime(loaded: LoadedModel, device: torch.device, precision: str, settings: BuildSettings) -> Runner:
    # Built from the verified module and gated against torch; torch stays the runner if the gate says no.
    reference = _torch(loaded, device, precision, settings)
    result = gate(loaded, reference, loaded.spec.parity_tolerance, settings.ort_threads, settings.cache_dir)
    if result.runner is reference and result.parity is not None and math.isfinite(result.parity):
        reference.parity = result.parity  # torch after a failed gate: the record says by how much
    if result.runner is reference and result.figures is not None:
        reference.parity_gate = result.figures.to_json()  # and run.json which part of the rule failed
    return result.runner


# One builder per name of choices.BACKENDS (tests/test_registry.py holds them to the same names).
BUILDERS: dict[str, Callable[[LoadedModel, torch.device, str, BuildSettings], Runner]] = {
    "torch": _torch,
    "onnxruntime": _onnxruntime,
}


def build_runner(loaded: LoadedModel, device: torch.device, precision: str, requested: str | None,
                 settings: BuildSettings = BuildSettings()) -> Runner:
    """The runner for one loaded model: the registry's builder for the chosen backend.

    A model with accuracy modes (TTA, ensemble, letterbox, tile) gets a ModeRunner around
    one backend runner per ensemble member (each gated on its own for ONNX Runtime).
    """
    builder = BUILDERS[choose_backend(requested, loaded.spec, device, precision)]
    if not needs_modes(loaded.spec):
        return builder(loaded, device, precision, settings)
    return ModeRunner(loaded, [builder(m, device, precision, settings) for m in loaded.members or (loaded,)])
