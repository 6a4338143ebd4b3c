"""Run options, typed and validated once (UsageError, exit 2), and the defaults that depend on the device.

`RunConfig` is built by the CLI (or the Python API) and carried unchanged through the
run; `arguments()` derives what run.json records from it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from legitseg.errors import UsageError
from legitseg.images.decode import DEFAULT_MAX_PIXELS
from legitseg.manifest.spec import Manifest, ModelSpec
from legitseg.output.shard import Shard

PRECISIONS = ("fp32", "tf32", "fp16", "bf16")
BACKENDS = ("auto", "torch", "onnxruntime")
ENGINES = ("local", "ray")


def _choices(values: tuple[str, ...]) -> str:
    return f"{', '.join(values[:-1])} or {values[-1]}"


@dataclass
class RunConfig:
    """Everything a run needs, validated once (UsageError, exit 2) when it is built."""

    inputs: list[str]
    out: Path
    manifest: Manifest
    models: list[ModelSpec]
    device: str = "auto"
    batch_size: int | None = None
    workers: int | None = None
    writers: int | None = None  # default: default_writers(device type)
    precision: str = "fp32"
    backend: str | None = None  # auto | torch | onnxruntime; None: each model's manifest `backend`
    save_probabilities: bool = False
    overwrite: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    retry_failed: bool = False  # redo images whose failure would repeat (bad file, same model)
    require_images: bool = False  # an INPUT folder without images is an error (exit 6)
    null: bool = False  # paths on stdin are NUL-separated (find -print0)
    stdin: IO[bytes] | None = None  # where INPUT '-' reads paths from
    overlay: bool = False  # also write OUT/overlays/<model>/<name>.jpg
    tta: bool | None = None  # --tta/--no-tta; None: each model's manifest `tta`
    runners: list | None = None  # already built for `models` (a Predictor's); None: built when there is work
    shard: Shard | None = None  # --shard i/N: only this part of the images (legitseg.output.shard)
    engine: str = "local"  # local | ray (legitseg.engines.ray_data)
    address: str | None = None  # --address of a Ray cluster (engine ray)

    def __post_init__(self) -> None:
        check_options(self.device, self.precision, self.backend, self.batch_size, self.workers, self.max_pixels)
        if self.engine not in ENGINES:
            raise UsageError(f"--engine {self.engine!r}: choose {_choices(ENGINES)}")
        if self.address is not None and self.engine != "ray":
            raise UsageError("--address is the address of a Ray cluster: it needs --engine ray")
        self.effective_models()
        if self.overlay and self.engine == "ray":
            raise UsageError("--overlay is not available with --engine ray yet; run the overlays with the local engine")

    def effective_models(self) -> None:
        """Apply --tta/--no-tta to the specs, so records and resume see the settings that ran."""
        if self.tta is not None:
            from legitseg.manifest.modes import with_tta

            self.models = [with_tta(s, self.tta) for s in self.models]

    def arguments(self) -> dict[str, Any]:
        """The options as given, for run.json (derived, so it cannot disagree with what ran)."""
        return {"inputs": list(self.inputs), "out": str(self.out), "models": [s.name for s in self.models],
                "device": self.device, "batch_size": self.batch_size, "workers": self.workers,
                "precision": self.precision, "backend": self.backend,
                "save_probabilities": self.save_probabilities, "overwrite": self.overwrite,
                "max_pixels": self.max_pixels, "retry_failed": self.retry_failed,
                "require_images": self.require_images, "null": self.null, "overlay": self.overlay, "tta": self.tta,
                "shard": str(self.shard) if self.shard else None, "engine": self.engine,
                "address": self.address}


def check_options(device: str, precision: str, backend: str | None, batch_size: int | None,
                  workers: int | None, max_pixels: int | None) -> None:
    """The checks every run and every Predictor makes on its options. Raises UsageError (exit 2)."""
    if precision not in PRECISIONS:
        raise UsageError(f"--precision {precision!r}: choose {_choices(PRECISIONS)}")
    if backend is not None and backend not in BACKENDS:
        raise UsageError(f"--backend {backend!r}: choose {_choices(BACKENDS)}")
    if precision in ("fp16", "tf32") and device == "cpu":
        raise UsageError(f"--precision {precision} needs a CUDA device; on the CPU use fp32 or bf16")
    for name, value in (("--batch-size", batch_size), ("--workers", workers), ("--max-pixels", max_pixels)):
        if value is not None and value < (0 if name == "--workers" else 1):
            raise UsageError(f"{name} {value}: out of range")


def default_writers(device_type: str) -> int:
    """Postprocessing and writer threads (resize to the original size, PNG encoding, atomic writes).

    Two on the CPU, where the forward pass needs the cores. On a GPU the writers are
    the bottleneck: measured on an H200 with 16 cores (docs/benchmarks.md), going from
    2 to 8 writers raised DeepLabV3Plus+efficientnet-b2 @512 fp16 from 160 to 190 img/s.
    With JPEG decode and postprocessing on the GPU the cores are left to PNG encoding
    and writes (OpenCV and file I/O release the GIL). The threads are sized to the cores
    (docs/architecture.md): the main thread and nvJPEG's take two, the decode workers a
    quarter (`default_workers`), and the postprocessing and the writer pools (this many each)
    share the rest.
    """
    if device_type == "cuda":
        cores = os.cpu_count() or 1
        return max(2, (cores - 2 - default_workers("cuda")) // 2)
    return 2


def default_batch_size(device_type: str) -> int:
    return 32 if device_type == "cuda" else 4


def default_workers(device_type: str) -> int:
    cores = os.cpu_count() or 1
    if device_type == "cuda":  # with nvJPEG the workers only read, hash and check headers
        return max(2, cores // 4)
    # On the CPU the forward pass wants the cores; one or two decode threads keep it fed.
    return max(1, min(4, cores // 2))


