"""The one place a backend is chosen and built (SPEC 4.2, 4.5).

`build_runner` is the registry: adding a backend (TensorRT, ...) means one builder
function and one entry in `BUILDERS`. A model with accuracy modes gets a ModeRunner
around one backend runner per ensemble member.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from legitseg.errors import UsageError
from legitseg.inference.modes import ModeRunner, needs_modes
from legitseg.inference.ort_runner import gate
from legitseg.inference.runners import Runner
from legitseg.inference.torch_runner import TorchRunner

if TYPE_CHECKING:
    from legitseg.manifest.spec import ModelSpec
    from legitseg.models.factory import LoadedModel

log = logging.getLogger(__name__)
BACKENDS = ("auto", "torch", "onnxruntime")


def choose_backend(requested: str | None, spec: ModelSpec, device: torch.device, precision: str) -> str:
    """torch or onnxruntime for one model: `requested` (--backend) if given, else the manifest's.

    auto means onnxruntime on the CPU in fp32, torch otherwise. onnxruntime asked
    for on the command line where it cannot run (CUDA, fp16/bf16) is a UsageError;
    asked for by the manifest, it becomes torch with a warning, since one manifest
    serves CPU and GPU machines alike.
    """
    choice = requested or spec.backend
    fits = device.type == "cpu" and precision == "fp32"
    if choice == "auto":
        return "onnxruntime" if fits else "torch"
    if choice == "onnxruntime" and not fits:
        why = f"the onnxruntime backend runs on the CPU in fp32 only (device {device}, precision {precision})"
        if requested:
            raise UsageError(f"--backend onnxruntime: {why}; use --backend torch or auto")
        log.warning("%s: manifest asks for backend onnxruntime but %s; using torch", spec.name, why)
        return "torch"
    return choice


def _torch(loaded: LoadedModel, device: torch.device, precision: str) -> Runner:
    return TorchRunner(loaded, device, precision)


def _onnxruntime(loaded: LoadedModel, device: torch.device, precision: str) -> Runner:
    # Built from the verified module and gated against torch; torch stays the runner if the gate says no.
    reference = _torch(loaded, device, precision)
    result = gate(loaded, reference, loaded.spec.parity_tolerance)
    if result.runner is reference and result.parity is not None and math.isfinite(result.parity):
        reference.parity = result.parity  # torch after a failed gate: the record says by how much
    if result.runner is reference and result.figures is not None:
        reference.parity_gate = result.figures.to_json()  # and run.json which part of the rule failed
    return result.runner


BUILDERS: dict[str, Callable[[LoadedModel, torch.device, str], Runner]] = {
    "torch": _torch,
    "onnxruntime": _onnxruntime,
}


def build_runner(loaded: LoadedModel, device: torch.device, precision: str, requested: str | None) -> Runner:
    """The runner for one loaded model: the registry's builder for the chosen backend.

    A model with accuracy modes (TTA, ensemble, letterbox, tile) gets a ModeRunner around
    one backend runner per ensemble member (each gated on its own for ONNX Runtime).
    """
    builder = BUILDERS[choose_backend(requested, loaded.spec, device, precision)]
    if not needs_modes(loaded.spec):
        return builder(loaded, device, precision)
    return ModeRunner(loaded, [builder(m, device, precision) for m in loaded.members or (loaded,)])
