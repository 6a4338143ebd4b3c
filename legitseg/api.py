"""The Python API: the pipeline of `legitseg run`, from a notebook or a research script.

`Predictor` verifies and builds the models once, then `predict` streams images
(paths, folders, numpy arrays, PIL images) through the same engine the CLI uses and
yields a `Prediction` per image; `Predictor.run` and `run` write an output folder
exactly as `legitseg run` does (the CLI calls `run`). Nothing here imports torch at
import time: `import legitseg` stays cheap, models are built when a Predictor is made.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeAlias

from legitseg._version import __version__
from legitseg.errors import (
    EXIT_IMAGES_FAILED,
    EXIT_OK,
    EXIT_SIGINT,
    LegitsegError,
    NoAdequateImage,
    UsageError,
)
from legitseg.manifest.choices import DEFAULT_MAX_PIXELS

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

    from legitseg.manifest.spec import Manifest
    from legitseg.output.records import ImageResult, ModelOutput

    ImageLike: TypeAlias = str | bytes | os.PathLike[str] | np.ndarray | Image.Image
    Inputs: TypeAlias = ImageLike | Iterable[ImageLike]

__all__ = ["ImageFailed", "ModelResult", "Prediction", "Predictor", "RunSummary", "run"]
PathLike: TypeAlias = str | os.PathLike[str]


class ImageFailed(LegitsegError):
    """One image failed and `raise_on_error=True` was asked for; `.prediction` holds its Prediction."""

    exit_code = EXIT_IMAGES_FAILED

    def __init__(self, prediction: Prediction):
        super().__init__(f"{prediction.image}: {prediction.error}")
        self.prediction = prediction


@dataclass
class ModelResult:
    """What one model gave for one image, with the provenance a record carries.

    Segmentation: `mask` (H, W) uint8 (uint16 above 255 classes) at the image's size,
    `area_fraction` and `components` per non-background label, and `probabilities`
    (C, H, W) float16 when asked for. Severity: `probabilities` (list of floats, one per
    class), `grade` and `score`. A failed model has `status` "failed", `error`, `error_kind`.
    A model the quality policy did not run (`on_inadequate: skip`) has `status` "inadequate".
    With `uncertainty: true` or a `refer:` policy in the manifest: `uncertainty` (the measures
    of docs/uncertainty.md; segmentation probabilities are then kept), and under a policy
    `refer` and `referral` ({measure, value, above}), as in the record.
    """

    model: str
    task: str  # segmentation | severity
    status: str  # ok | failed
    weights_sha256: str
    settings: str  # digest of the model settings (as in records)
    backend: str  # torch | onnxruntime
    parity: float | None = None
    mask: np.ndarray | None = None
    probabilities: np.ndarray | list[float] | None = None
    area_fraction: dict[str, float] | None = None
    components: dict[str, int] | None = None
    score: float | None = None
    grade: int | None = None
    error: str | None = None
    error_kind: str | None = None  # image | forward | oom | postprocess
    uncertainty: dict[str, Any] | None = None
    refer: bool | None = None
    referral: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class Prediction:
    """One image through every selected model.

    `image` is the path as given, or `array[i]` / `image[i]` for the i-th item of the
    inputs when it was a numpy array / PIL image. `sha256` is that of the file's bytes
    (`input_kind` "file") or of the (H, W, 3) uint8 RGB pixels after conversion
    ("array", "pil"). `size` is (height, width) after EXIF orientation. A failed image
    has `error` and `error_kind` set (every model result failed with it).
    """

    image: str
    name: str
    input_kind: str  # file | array | pil
    sha256: str | None
    size: tuple[int, int] | None
    results: dict[str, ModelResult] = field(default_factory=dict)
    error: str | None = None
    error_kind: str | None = None
    legitseg: str = __version__
    # With a `quality:` policy in the manifest: the measures and the verdict (legitseg.manifest.quality.Quality:
    # `adequate`, `reasons` each with value and limit, `measures`); None without one.
    quality: Any = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def __getitem__(self, model: str) -> ModelResult:
        return self.results[model]


@dataclass(frozen=True)
class RunSummary:
    """What a run did: its status (completed | interrupted), counts, id and run file."""

    status: str
    processed: int
    skipped: int
    failed: int
    skipped_failed: int
    run_id: str
    run_json: Path
    out: Path

    @property
    def exit_code(self) -> int:
        """What `legitseg run` exits with: 0, 1 (some images failed) or 130 (interrupted)."""
        if self.status == "interrupted":
            return EXIT_SIGINT
        return EXIT_IMAGES_FAILED if self.failed else EXIT_OK


def _names(models: Sequence[str] | str | None) -> list[str] | None:
    if isinstance(models, str):
        return [m.strip() for m in models.split(",") if m.strip()]
    return list(models) if models else None


def _manifest(manifest: PathLike | Manifest) -> Manifest:
    from legitseg.manifest.spec import Manifest, load_manifest

    return manifest if isinstance(manifest, Manifest) else load_manifest(manifest)


def run(inputs: PathLike | Sequence[PathLike], out: PathLike, *, manifest: PathLike | Manifest = "models.yaml",
        models: Sequence[str] | str | None = None, device: str = "auto", precision: str = "fp32",
        backend: str | None = None, batch_size: int | None = None, workers: int | None = None,
        save_probabilities: bool = False, overwrite: bool = False, retry_failed: bool = False,
        require_images: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS, null: bool = False,
        stdin: IO[bytes] | None = None, stop: threading.Event | None = None,
        on_event: Callable[[Any], None] | None = None, runners: list | None = None,
        shard: str | None = None, engine: str = "local", address: str | None = None,
        overlay: bool = False, tta: bool | None = None, require_adequate: bool = False,
        **options: Any) -> RunSummary:
    """Do what `legitseg run INPUTS -o OUT` does, with the same options, and return its summary.

    `inputs` are paths: files, folders, or "-" to read paths from `stdin` (bytes).
    `on_event` sees every event of `legitseg.run.execute` (Planned, Skipped, Started,
    ImageOutcome, Finished), as the CLI does for its progress and --jsonl rows; setting
    `stop` ends the run after the images in flight (status "interrupted"). `shard` ("i/N")
    takes this process's part of the inputs; `engine` is "local" or "ray" (with `address`);
    `overlay` also writes OUT/overlays/<model>/<name>.jpg; `tta` True/False overrides every
    model's manifest `tta` (False: none; True: the manifest's, or hflip where it names none).
    `options` are any other fields of `legitseg.options.RunConfig` (so a new run option is
    one field there and one flag in the CLI, not a parameter here too). A failed image is counted in `failed`, not raised. Raises UsageError (exit 2),
    ManifestError or WeightsError (exit 3, before anything is read or written),
    RuntimeFailure (4), OutputLocked (5), NoImages (6). With `require_adequate` (or the manifest's
    `quality: {require_adequate: true}`) a completed run that judged no image adequate raises
    NoAdequateImage (8) once everything is written (docs/quality.md).
    """
    from dataclasses import fields

    from legitseg.output.shard import Shard
    from legitseg.run import Finished, RunConfig, execute

    unknown = sorted(set(options) - {f.name for f in fields(RunConfig)})
    if unknown:
        raise UsageError(f"run: unknown option(s) {', '.join(unknown)}")
    part = Shard.parse(shard) if shard is not None else None  # a usage error before the manifest's
    m = _manifest(manifest)
    specs = m.select(_names(models))
    if require_adequate and m.quality is None:
        raise UsageError(f"--require-adequate needs a quality: section in {m.path} (docs/quality.md)")
    paths = [os.fsdecode(inputs)] if isinstance(inputs, str | bytes | os.PathLike) else [os.fsdecode(p) for p in inputs]
    cfg = RunConfig(inputs=paths, out=Path(out), manifest=m, models=specs, device=device,
                    batch_size=batch_size, workers=workers, precision=precision, backend=backend,
                    save_probabilities=save_probabilities, overwrite=overwrite, max_pixels=max_pixels,
                    retry_failed=retry_failed, require_images=require_images, null=null, stdin=stdin,
                    runners=runners, shard=part, engine=engine, address=address, overlay=overlay,
                    tta=tta, **options)
    finished: Finished | None = None
    with contextlib.closing(execute(cfg, stop or threading.Event())) as events:
        for event in events:
            if on_event is not None:
                on_event(event)
            if isinstance(event, Finished):
                finished = event
    assert finished is not None  # execute() always ends with Finished unless it raised
    if (finished.adequate == 0 and finished.status == "completed" and m.quality is not None
            and (require_adequate or m.quality.require_adequate)):
        raise NoAdequateImage(f"{cfg.out}: no adequate image among {finished.processed + finished.skipped} "
                              "(the reasons are in scores.jsonl and the records' quality blocks)")
    return RunSummary(finished.status, finished.processed, finished.skipped, finished.failed,
                      finished.skipped_failed, finished.run_id, finished.run_json, cfg.out)


class Predictor:
    """Models of a manifest, verified and built once, ready to predict.

    Raises, before anything runs: ManifestError (bad or missing manifest, exit 3),
    WeightsError (a weights file fails its sha256 or does not load, exit 3),
    UsageError (unknown model, bad option, exit 2), RuntimeFailure (no such device, exit 4).
    """

    def __init__(self, manifest: PathLike | Manifest = "models.yaml", models: Sequence[str] | str | None = None,
                 device: str = "auto", precision: str = "fp32", backend: str | None = None,
                 batch_size: int | None = None, *, workers: int | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        from legitseg.models.weights import verify_sha256
        from legitseg.options import Environment, check_options, resolve_device
        from legitseg.run import build_runners

        check_options(device, precision, backend, batch_size, workers, max_pixels)
        self.env = Environment.read()  # as a run reads it: once, here
        self.manifest = _manifest(manifest)
        self.specs = self.manifest.select(_names(models))
        for spec in self.specs:
            verify_sha256(spec.weights, spec.sha256, spec.name)
        self._device_arg = device
        chosen = resolve_device(device, precision, batch_size, workers)
        self.device = str(chosen.device)
        self.precision = precision
        self.backend = backend
        self.batch_size, self.workers, self.writers = chosen.batch_size, chosen.workers, chosen.writers
        self.max_pixels = max_pixels
        self.runners = build_runners(self.specs, chosen.device, precision, backend, self.env.build_settings())
        from legitseg.output.records import ModelInfo

        self._infos = {r.name: ModelInfo.of(r) for r in self.runners}

    @property
    def models(self) -> list[str]:
        """The selected model names, in order."""
        return [s.name for s in self.specs]

    @property
    def backends(self) -> dict[str, str]:
        """The backend each model runs on (torch, or onnxruntime when it passed its parity gate)."""
        return {r.name: r.backend for r in self.runners}

    def predict(self, inputs: Inputs, *, probabilities: bool = False,
                raise_on_error: bool = False) -> Iterator[Prediction]:
        """Yield one Prediction per image, in input order, as each is ready.

        `inputs`: a path, a folder (searched as `legitseg run` does), a numpy array
        ((H, W, 3) uint8 RGB, or (H, W) gray), a PIL image, or an iterable (list,
        generator) of them, read lazily so memory stays bounded. `probabilities`
        keeps float16 (C, H, W) probability maps of segmentation models.
        A failed image is a Prediction with `error` set; with `raise_on_error` it raises
        ImageFailed instead. Raises UsageError for an item that is not an image or a
        path, RuntimeFailure when the device fails.
        """
        from legitseg.engines.local import Engine
        from legitseg.images.inputs import iter_sources
        from legitseg.images.pixels import PixelSource

        # The engine yields one result per source, in order: the kinds queue pairs them up.
        kinds: deque[str] = deque()

        def sources() -> Iterator[Any]:
            for source in iter_sources(inputs):
                kinds.append(source.kind if isinstance(source, PixelSource) else "file")
                yield source

        stop = threading.Event()
        engine = Engine(self.runners, batch_size=self.batch_size, workers=self.workers,
                        post_threads=self.writers, save_probabilities=probabilities,
                        max_pixels=self.max_pixels, stop=stop, quality=self.manifest.quality,
                        gpu_decode=self.env.gpu_decode, profile=self.env.profile)
        results = engine.process(sources())
        # No math mode is held across the yield: each forward pass switches TF32 for itself
        # (TorchRunner.forward), so two predict() generators of different precisions interleave safely.
        try:
            for result in results:
                prediction = self._prediction(result, kinds.popleft())
                if raise_on_error and not prediction.ok:
                    raise ImageFailed(prediction)
                yield prediction
        finally:
            stop.set()
            results.close()

    def predict_one(self, image: ImageLike, *, probabilities: bool = False) -> Prediction:
        """The Prediction of one image (a file path, an array or a PIL image).

        Raises UsageError for a folder or anything else that is not one image (a dict, a
        set, a list, a number...): those would otherwise be read as paths or dropped.
        """
        from legitseg.images.inputs import is_single

        if not is_single(image):
            raise UsageError(f"predict_one: an image of type {type(image).__name__}: give one file path, "
                             "a numpy array or a PIL image (predict() takes folders, lists and generators)")
        if isinstance(image, str | bytes | os.PathLike) and os.path.isdir(image):
            raise UsageError(f"predict_one: {os.fsdecode(image)!r} is a folder; use predict() for folders")
        return next(iter(self.predict(image, probabilities=probabilities)))

    def run(self, inputs: PathLike | Sequence[PathLike], out: PathLike, **options: Any) -> RunSummary:
        """`legitseg run INPUTS -o OUT` with this Predictor's models, device, precision, backend
        and batch size (models are not built again). `options` are those of `legitseg.api.run`
        (save_probabilities, overwrite, retry_failed, ...). Raises as `legitseg.api.run` does."""
        for key in ("manifest", "models", "device", "precision", "backend", "runners"):
            if key in options:
                raise UsageError(f"Predictor.run: {key} is the Predictor's; make another Predictor to change it")
        options.setdefault("batch_size", self.batch_size)
        options.setdefault("workers", self.workers)
        options.setdefault("max_pixels", self.max_pixels)
        options.setdefault("env", self.env)  # the environment as read when the models were built
        return run(inputs, out, manifest=self.manifest, models=self.models, device=self._device_arg,
                   precision=self.precision, backend=self.backend, runners=self.runners, **options)

    def _prediction(self, result: ImageResult, kind: str) -> Prediction:
        results = {name: self._model_result(name, output) for name, output in result.outputs.items()}
        error, error_kind = result.error, "image" if result.error else None
        failed = [(n, r) for n, r in results.items() if r.status == "failed"]
        if error is None and failed:
            error = "; ".join(f"{n}: {r.error}" for n, r in failed)
            error_kind = failed[0][1].error_kind
        return Prediction(result.image, result.name, kind, result.sha256, result.size, results, error, error_kind,
                          quality=result.quality)

    def _model_result(self, name: str, output: ModelOutput) -> ModelResult:
        # The output's own mapping (records.ModelOutput.fields), the one the record entries use.
        info = self._infos[name]
        return ModelResult(name, info.task, weights_sha256=info.weights_sha256, settings=info.settings,
                           backend=info.backend, parity=info.parity, **output.fields(arrays=True))

    def __repr__(self) -> str:
        return f"Predictor(models={self.models}, device={self.device!r}, precision={self.precision!r}, backends={self.backends})"
