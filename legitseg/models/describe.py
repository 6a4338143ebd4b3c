"""What `models list` and `models check` report about each model: one record per model,
written as JSON, as tab-separated text or as a table row (the CLI picks which).

Nothing here imports torch: `models list` describes the manifest as written, with
"encoder default" where normalize is not set; `models check` adds the mean/std that
the built model really uses.
"""

from __future__ import annotations

import logging
from typing import Any

from legitseg.manifest.spec import Manifest, ModelSpec
from legitseg.models.check import CheckResult

log = logging.getLogger(__name__)

ENCODER_DEFAULT = "encoder default"
LIST_COLUMNS = ("name", "task", "arch", "encoder", "classes", "input_size", "resize", "interpolation",
                "normalize", "threshold", "weights", "sha256")
CHECK_COLUMNS = ("model", "result", "build_s", "parameters", "weights_mb", "output", "input_size", "resize",
                 "normalize", "threshold", "error")


def _weights(manifest: Manifest, spec: ModelSpec) -> str | list[str]:
    names = []
    for weights, _ in spec.weight_files:
        try:
            names.append(str(weights.relative_to(manifest.path.parent.absolute())))
        except ValueError:
            names.append(str(weights))
    return names if spec.is_ensemble else names[0]


def _normalize(spec: ModelSpec, mean: tuple[float, ...] | None, std: tuple[float, ...] | None) -> dict[str, Any]:
    if spec.normalize is not None:
        return {"source": "manifest", "mean": list(spec.normalize.mean), "std": list(spec.normalize.std)}
    if mean is None or std is None:
        log.warning("model %r: no normalize in the manifest; the encoder's default mean/std (%s) will be used",
                    spec.name, spec.encoder)
        return {"source": ENCODER_DEFAULT, "mean": None, "std": None}
    log.warning("model %r: no normalize in the manifest; using the default of encoder %s: mean %s, std %s",
                spec.name, spec.encoder, _numbers(mean), _numbers(std))
    return {"source": ENCODER_DEFAULT, "mean": list(mean), "std": list(std)}


def model_record(manifest: Manifest, spec: ModelSpec, mean: tuple[float, ...] | None = None,
                 std: tuple[float, ...] | None = None) -> dict[str, Any]:
    """The effective settings of one model; `mean`/`std` are the resolved ones when known.

    Logs one warning when normalize falls back to the encoder's default.
    """
    binary = spec.task == "segmentation" and spec.classes == 1
    severity = spec.task == "severity"
    return {
        "name": spec.name, "task": spec.task, "arch": spec.arch, "encoder": spec.encoder,
        "in_channels": spec.in_channels, "classes": spec.classes, "labels": list(spec.label_names),
        "input_size": list(spec.input_size) if spec.input_size else None,
        "resize": spec.resize, "interpolation": spec.interpolation,
        "normalize": _normalize(spec, mean, std),
        "threshold": spec.threshold if binary else None,
        "temperature": spec.temperature if severity else None,
        "class_values": list(spec.values) if severity else None,
        "pooling": spec.pooling if severity else None,
        "arch_params": dict(spec.arch_params), "ignore_keys": list(spec.ignore_keys),
        "backend": spec.backend, "weights": _weights(manifest, spec), "sha256": spec.sha256,
    }


def check_record(manifest: Manifest, spec: ModelSpec, result: CheckResult) -> dict[str, Any]:
    """model_record plus the outcome of `models check`."""
    return {
        **model_record(manifest, spec, result.mean, result.std),
        "ok": result.ok, "error": result.error, "build_seconds": result.build_seconds,
        "parameters": result.parameters, "weight_bytes": result.weight_bytes,
        "output_shape": list(result.output_shape) if result.output_shape else None, "dtype": result.dtype,
    }


def _numbers(values) -> str:
    return "[" + ", ".join(f"{v:g}" for v in values) + "]"


def normalize_text(record: dict[str, Any]) -> str:
    n = record["normalize"]
    if n["mean"] is None:
        return n["source"]
    text = f"mean {_numbers(n['mean'])} std {_numbers(n['std'])}"
    return text if n["source"] == "manifest" else f"{text} ({n['source']})"


def list_row(record: dict[str, Any]) -> list[str]:
    """The cells of `models list`, in LIST_COLUMNS order."""
    size = "x".join(map(str, record["input_size"])) if record["input_size"] else "native"
    return [record["name"], record["task"], record["arch"] or "-", record["encoder"], str(record["classes"]),
            size, record["resize"], record["interpolation"], normalize_text(record),
            _threshold(record), record["weights"], record["sha256"]]


def check_row(record: dict[str, Any]) -> list[str]:
    """The cells of `models check`, in CHECK_COLUMNS order."""
    size = "x".join(map(str, record["input_size"])) if record["input_size"] else "native"
    shape = record["output_shape"]
    return [
        record["name"], "ok" if record["ok"] else "FAILED",
        f"{record['build_seconds']:.2f}" if record["build_seconds"] is not None else "-",
        f"{record['parameters']:,}" if record["parameters"] is not None else "-",
        f"{record['weight_bytes'] / 1e6:.1f}" if record["weight_bytes"] is not None else "-",
        f"{shape} {record['dtype']}" if shape else "-",
        size, record["resize"], normalize_text(record), _threshold(record), record["error"] or "-",
    ]


def _threshold(record: dict[str, Any]) -> str:
    if record["threshold"] is not None:
        return f"{record['threshold']:g}"
    return "argmax" if record["task"] == "segmentation" else "-"


def tsv(columns: tuple[str, ...], rows: list[list[str]]) -> str:
    """Header and rows, tab-separated; tabs and line breaks inside a cell become spaces."""
    def clean(cell: str) -> str:
        return " ".join(cell.replace("\t", " ").splitlines())

    return "".join("\t".join(clean(c) for c in row) + "\n" for row in [list(columns), *rows])
