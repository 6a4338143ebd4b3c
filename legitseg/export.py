"""`legitseg export`: one manifest model as an ONNX file plus a JSON sidecar.

The sidecar carries everything needed to serve the graph elsewhere with
legitseg's semantics (SPEC 4.2-4.4): input size and resize rule, normalisation,
activation, threshold or temperature, labels, and the hashes that tie the file
to the weights it came from. The graph is the one `legitseg run` would use (same
exporter, same cache) and is written only after it passes the parity gate.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from legitseg.errors import UsageError, WeightsError
from legitseg.manifest.spec import ModelSpec

log = logging.getLogger(__name__)
SIDECAR_FORMAT = "legitseg-onnx-sidecar"
SIDECAR_VERSION = 1


@dataclass
class ExportResult:
    onnx_path: Path
    sidecar_path: Path
    onnx_sha256: str
    parity: float
    sidecar: dict[str, Any]


def sidecar_path(onnx_path: Path) -> Path:
    """`lesion.onnx` -> `lesion.json`."""
    return onnx_path.with_suffix(".json")


def export_model(spec: ModelSpec, out: Path) -> ExportResult:
    """Verify the weights, export, gate against torch, then write `out` and its sidecar.

    Raises UsageError (out is not a .onnx path), WeightsError/ManifestError (exit 3,
    before anything is exported), ExportFailed (exit 4: the exporter or ONNX Runtime
    refuses the model, or the parity gate fails; nothing is written) and
    RuntimeFailure (exit 4: the files cannot be written).
    """
    if out.suffix.lower() != ".onnx":
        raise UsageError(f"--out {out}: the ONNX file name must end in .onnx (the sidecar is {out.stem}.json)")
    if spec.is_ensemble:
        raise UsageError(f"model {spec.name!r} is an ensemble of {len(spec.weight_files)} weights files; "
                         "export one graph per file (a manifest entry per member)")
    import torch

    from legitseg.fsio import atomic_write, write_json
    from legitseg.inference.ort_runner import OrtRunner, gate
    from legitseg.inference.torch_runner import TorchRunner
    from legitseg.models.factory import load_model
    from legitseg.models.onnx_export import OPSET, ExportFailed, dynamic_axes
    from legitseg.options import Environment

    env = Environment.read()  # the cache folder and ONNX Runtime's threads, as a run reads them
    loaded = load_model(spec)  # the sha256 is checked on the bytes before any loader reads them
    result = gate(loaded, TorchRunner(loaded, torch.device("cpu"), "fp32"), spec.parity_tolerance,
                  env.ort_threads, env.cache_dir)
    if not isinstance(result.runner, OrtRunner) or result.graph is None or result.parity is None:
        raise ExportFailed(f"{result.reason}; nothing written")
    graph, figure = result.graph, result.parity
    sidecar = build_sidecar(spec, loaded.mean, loaded.std, loaded.stride, out.name, graph.sha256,
                            figure, dynamic_axes(loaded), OPSET)
    atomic_write(out, graph.data)
    side = sidecar_path(out)
    write_json(side, sidecar)
    log.info("%s: wrote %s and %s (parity %.2g)", spec.name, out, side, figure)
    return ExportResult(out, side, graph.sha256, figure, sidecar)


def build_sidecar(spec: ModelSpec, mean: tuple[float, ...], std: tuple[float, ...], stride: int,
                  onnx_file: str, onnx_sha256: str, figure: float, axes: dict[str, dict[int, str]],
                  opset: int) -> dict[str, Any]:
    """The sidecar's content: what a server needs to reproduce `legitseg run` with the graph."""
    from legitseg.provenance import dist_version, versions

    segmentation = spec.task == "segmentation"
    sidecar: dict[str, Any] = {
        "format": SIDECAR_FORMAT,
        "format_version": SIDECAR_VERSION,
        "name": spec.name,
        "task": spec.task,
        "arch": spec.arch,
        "encoder": spec.encoder,
        "in_channels": spec.in_channels,
        "classes": spec.classes,
        "labels": list(spec.label_names),
        "onnx_file": onnx_file,
        "onnx_sha256": onnx_sha256,
        "weights_sha256": spec.sha256,
        "opset": opset,
        "input": {
            "name": "input",
            "dtype": "float32",
            "layout": "NCHW",
            "color": "RGB" if spec.in_channels == 3 else "gray",
            "dynamic_axes": {k: {str(a): n for a, n in v.items()} for k, v in axes.items()},
        },
        "input_size": list(spec.input_size) if spec.resize == "stretch" else None,
        "resize": spec.resize,
        "interpolation": spec.interpolation,
        "pad_to_multiple_of": stride if spec.resize == "pad" else None,
        "normalize": {"mean": list(mean), "std": list(std),
                      "formula": "(x / 255 - mean) / std on 8-bit RGB values x"},
        "output": {
            "name": "logits",
            "activation": "sigmoid" if segmentation and spec.classes == 1 else "softmax",
            "shape": "N, classes, H, W" if segmentation else "N, classes",
        },
        "threshold": spec.threshold if segmentation and spec.classes == 1 else None,
        "temperature": spec.temperature if not segmentation else None,
        "class_values": list(spec.values) if not segmentation else None,
        "pooling": spec.pooling if not segmentation else None,
        "parity": {"max_abs_difference": figure, "tolerance": spec.parity_tolerance,
                   "compared": "probabilities of torch and ONNX Runtime on seeded random probe images"},
        "semantics": (
            "segmentation: logits (padding cropped) resized to the original size, bilinear, "
            "align_corners=False; then sigmoid > threshold (binary) or argmax of softmax"
            if segmentation else
            "severity: p = softmax(logits / temperature); grade = argmax p; score = sum p_i * class_values[i]"
        ),
        "versions": {**versions(), "onnx": dist_version("onnx")},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return sidecar


def read_sidecar(onnx_path: Path) -> dict[str, Any]:
    """The sidecar of an exported file, after checking that the file's sha256 is the one it records.

    Raises UsageError when either file is missing or unreadable, WeightsError (exit 3)
    when they do not belong together.
    """
    side = sidecar_path(onnx_path)
    try:
        sidecar = json.loads(side.read_text())
        digest = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot read {onnx_path} and its sidecar {side}: {err}") from err
    if sidecar.get("format") != SIDECAR_FORMAT or sidecar.get("onnx_sha256") != digest:
        raise WeightsError(f"{side} does not describe {onnx_path} (sha256 {digest})")
    return sidecar
