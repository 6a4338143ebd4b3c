"""Run options, typed and validated once (UsageError, exit 2), and the defaults that depend on the device.

`RunConfig` is built by the CLI (or the Python API) and carried unchanged through the
run; `arguments()` derives what run.json records from it. The names it checks (backends,
precisions, engines) and their capabilities are those of `legitseg.manifest.choices`.
`Environment` holds every setting legitseg takes from environment variables, read once
here; deeper code is handed the values.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from legitseg.errors import UsageError
from legitseg.fsio import cache_root
from legitseg.manifest.choices import (
    DEFAULT_MAX_PIXELS,
    check_backend,
    check_engine,
    check_precision,
)
from legitseg.manifest.spec import Manifest, ModelSpec
from legitseg.output.shard import Shard

if TYPE_CHECKING:
    import torch

    from legitseg.inference.registry import BuildSettings

GPU_DECODE_ENV = "LEGITSEG_GPU_DECODE"
ORT_THREADS_ENV = "LEGITSEG_ORT_THREADS"
PROFILE_ENV = "LEGITSEG_PROFILE"
CACHE_ENV = "LEGITSEG_CACHE_DIR"  # read by fsio.cache_root, with XDG_CACHE_HOME and HOME


@dataclass(frozen=True)
class Environment:
    """The settings taken from environment variables, read once when a run or a Predictor is set up."""

    cache_dir: Path  # exported ONNX graphs and layout choices (fsio.cache_root)
    gpu_decode: bool = True  # LEGITSEG_GPU_DECODE=0: JPEGs decoded by OpenCV even on a GPU
    ort_threads: int | None = None  # LEGITSEG_ORT_THREADS; None: every core this process may use
    profile: Path | None = None  # LEGITSEG_PROFILE=FILE: where the run's time went

    @classmethod
    def read(cls, environ: Mapping[str, str] | None = None) -> Environment:
        """Raises UsageError for a value that means nothing (LEGITSEG_ORT_THREADS=two)."""
        env = os.environ if environ is None else environ
        threads = env.get(ORT_THREADS_ENV, "").strip()
        profile = env.get(PROFILE_ENV)
        return cls(cache_root(env), env.get(GPU_DECODE_ENV, "1") != "0",
                   _threads(threads) if threads else None, Path(profile) if profile else None)

    def build_settings(self) -> BuildSettings:
        """What building a runner takes from here."""
        from legitseg.inference.registry import BuildSettings

        return BuildSettings(self.cache_dir, self.ort_threads)


def _threads(value: str) -> int:
    try:
        threads = int(value)
    except ValueError:
        threads = 0
    if threads < 1:
        raise UsageError(f"${ORT_THREADS_ENV}={value!r}: expected a whole number of threads >= 1")
    return threads


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
    backend: str | None = None  # a name of choices.BACKEND_CHOICES; None: each model's manifest `backend`
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
    engine: str = "local"  # a name of choices.ENGINES
    address: str | None = None  # --address of a cluster (an engine that takes one: ray)
    env: Environment = field(default_factory=Environment.read)

    def __post_init__(self) -> None:
        check_options(self.device, self.precision, self.backend, self.batch_size, self.workers, self.max_pixels)
        engine = check_engine(self.engine)
        if self.address is not None and not engine.address:
            raise UsageError("--address is the address of a Ray cluster: it needs --engine ray")
        self.effective_models()
        if self.overlay and not engine.overlay:
            raise UsageError(f"--overlay is not available with --engine {engine.name} yet; "
                             "run the overlays with the local engine")

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
    check_precision(precision, "cpu" if device == "cpu" else None)  # auto and cuda are known once resolved
    check_backend(backend)
    for name, value in (("--batch-size", batch_size), ("--workers", workers), ("--max-pixels", max_pixels)):
        if value is not None and value < (0 if name == "--workers" else 1):
            raise UsageError(f"{name} {value}: out of range")


def default_writers(device_type: str) -> int:
    """Postprocessing and writer threads (resize to the original size, PNG encoding, atomic writes).

    Two on the CPU, where the forward pass needs the cores. On a GPU the writers are
    the bottleneck: more of them raised a GPU run's throughput (docs/benchmarks.md,
    "Numbers behind the defaults"). With JPEG decode and postprocessing on the GPU the cores
    are left to PNG encoding and writes (OpenCV and file I/O release the GIL). The threads are
    sized to the cores (docs/architecture.md): the main thread and nvJPEG's take two, the
    decode workers a quarter (`default_workers`), and the postprocessing and the writer pools
    (this many each) share the rest.
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
    # On the CPU the forward pass wants the cores; two to four decode threads keep it fed (two
    # rather than one on 2 cores: 2-4% more images/s at 12 MP and 1024x768, docs/benchmarks.md).
    return max(2, min(4, cores // 2))




@dataclass(frozen=True)
class DeviceSettings:
    """The device a run or a Predictor uses and the defaults that follow from it."""

    device: torch.device
    batch_size: int
    workers: int
    writers: int


def resolve_device(device: str, precision: str, batch_size: int | None = None, workers: int | None = None,
                   writers: int | None = None) -> DeviceSettings:
    """`auto` or a named device -> the torch device, its precision checked, and the defaults
    for whatever was not given. Imports torch. Raises UsageError (exit 2) or RuntimeFailure (exit 4)."""
    from legitseg.inference.torch_runner import choose_device

    chosen = choose_device(device)
    check_precision(precision, chosen.type)
    return DeviceSettings(chosen, batch_size or default_batch_size(chosen.type),
                          default_workers(chosen.type) if workers is None else workers,
                          writers or default_writers(chosen.type))
