"""`--engine ray`: the same work as the local engine, as a Ray Data pipeline over a cluster.

    sources -> from_items -> map(decode)            Ray tasks, 1 CPU each
            -> map_batches(_ModelActor)             actors holding the models (1 GPU each, or 1 CPU)
            -> iter_rows on the driver              ImageResults, in input order
            -> writers.Sink (in legitseg.run)       masks, records, as with the local engine

Decoding is `pipeline.decode.load_image`; the actors build their runners with
`factory.load_model` + `registry.build_runner` (the backend the driver resolved)
and run the local engine's own batch and postprocessing code on each batch, so masks
and scores are those of the local engine. Planning (resume), naming, the lock and all
writes stay on the driver: the cluster only computes.

Ray is an optional extra (`pip install 'legitseg[ray]'`); nothing here imports it at
module level. Workers need legitseg installed and the images and weights files at the
same paths as the driver (a shared file system).
"""

from __future__ import annotations

import logging
import os
import pickle
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from legitseg.errors import ImageError, LegitsegError, RuntimeFailure, UsageError
from legitseg.images.decoded import DecodedImage, Prep
from legitseg.images.sources import Source
from legitseg.inference.ort_import import telemetry_env
from legitseg.output.records import ImageResult

log = logging.getLogger(__name__)
INSTALL_HINT = "pip install 'legitseg[ray]' (or pip install -r requirements_ray.txt)"


def require_ray() -> None:
    """Raise UsageError (exit 2) when Ray Data cannot be imported."""
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError as err:
        raise UsageError(f"--engine ray needs Ray Data, which is not installed ({err}); "
                         f"install it with {INSTALL_HINT}") from err


def _decode(row: dict[str, Any], preps: list[Prep], max_pixels: int) -> dict[str, Any]:
    """Ray task: one source -> its pickled DecodedImage, or (source, message, sha256) on failure."""
    source: Source = pickle.loads(row["source"])
    decoded = _load(source, preps, max_pixels)
    if isinstance(decoded, ImageError):
        payload: Any = (source, str(decoded), decoded.sha256)
    else:
        payload = decoded
    return {"i": row["i"], "item": pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)}


def _load(source: Source, preps: list[Prep], max_pixels: int) -> DecodedImage | ImageError:
    # The local engine's decode stage, with its error handling: any decoder error is this image's.
    from legitseg.engines.stages import decode

    return decode(source, preps, max_pixels)  # decoded here, on the CPU


@dataclass
class DriverRunner:
    """What the driver knows of a model it never runs: verified weights, backend, input plan.

    The Runner attributes the driver reads (run.json, records, RayEngine); `logits` is the actors'.
    """

    loaded: Any
    device: Any
    precision: str
    backend: str
    prep: Prep
    parity: float | None = None

    @property
    def name(self) -> str:
        return self.loaded.spec.name


def driver_runners(specs: list, device, precision: str, backend: str | None, settings=None) -> list:
    """The driver's runners for `--engine ray`. Raises WeightsError/ManifestError (exit 3).

    Weights are loaded and sha256-checked here as for the local engine. On a GPU the actors
    build their own CUDA runners, so the driver builds none: a runner of its own would put a
    CUDA context and a copy of every model on the driver's GPU 0 for nothing. On the CPU it
    builds them, since the ONNX Runtime parity gate decides each model's backend there.
    """
    import torch

    from legitseg.inference.registry import BuildSettings, build_runner, choose_backend
    from legitseg.inference.runners import prep_for
    from legitseg.models.factory import load_model

    runners: list = []
    for spec in specs:
        loaded = load_model(spec)
        if torch.device(device).type == "cuda":
            runners.append(DriverRunner(loaded, device, precision, choose_backend(backend, spec, device, precision),
                                        prep_for(loaded)))
        else:
            runners.append(build_runner(loaded, device, precision, backend, settings or BuildSettings()))
    return runners


class _ModelActor:
    """A Ray actor: the models on one device, running the local engine's batch step (`Stages.step`)."""

    def __init__(self, specs: list, backends: list[str], device: str, precision: str,
                 batch_size: int, save_probabilities: bool, max_pixels: int, threads: int,
                 cache_dir: str | None = None, ort_threads: int | None = None):
        import torch

        # CPU results depend on torch's intra-op thread count (float reductions split
        # differently); the actor uses the driver's, as the local engine would.
        torch.set_num_threads(threads)

        from pathlib import Path

        from legitseg.engines.stages import Stages
        from legitseg.inference.registry import BuildSettings, build_runner
        from legitseg.models.factory import load_model

        dev = torch.device(device)
        # The driver's graph cache (no second export on this machine) and ONNX Runtime threads sized
        # to this actor's CPUs, not to every core of the node, which other actors share.
        settings = BuildSettings(Path(cache_dir) if cache_dir else None, ort_threads or threads)
        runners = [build_runner(load_model(spec), dev, precision, backend, settings)
                   for spec, backend in zip(specs, backends, strict=True)]
        for runner, backend in zip(runners, backends, strict=True):
            # run.json and every record name the driver's backend: an actor whose own parity gate
            # decides otherwise (another CPU) must not run the model on something else unrecorded.
            if runner.backend != backend:
                raise RuntimeFailure(f"model {runner.name!r}: the driver runs it on {backend}, but on this "
                                     f"Ray worker the parity gate chose {runner.backend}; run on one kind of "
                                     f"machine or pass --backend {runner.backend}")
        self.precision = precision
        # The local engine's stages (decoding was done by the CPU tasks); `step` runs a batch whole.
        self.stages = Stages(runners, save_probabilities=save_probabilities)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from legitseg.inference.torch_runner import tf32_switch

        items = [pickle.loads(b) for b in batch["item"]]
        entries = [x if isinstance(x, DecodedImage)
                   else self.stages.failed(x[0], ImageError(x[1], sha256=x[2])) for x in items]
        with tf32_switch(self.precision):
            results = self.stages.step(entries)
        for output in (o for r in results for o in r.outputs.values() if o.result is not None):
            output.result.values()  # counts a mask's regions here, not in the driver's few writer threads
        packed = np.empty(len(results), dtype=object)
        packed[:] = [pickle.dumps(r, protocol=pickle.HIGHEST_PROTOCOL) for r in results]
        return {"i": batch["i"], "result": packed}


class RayEngine:
    """Same interface as `pipeline.engine.Engine`: `process(sources)` yields ImageResults in order.

    `runners` are the driver's own (built to verify weights and resolve backends before
    anything is written); the actors build theirs from the same specs.
    """

    def __init__(self, runners: list, *, address: str | None, precision: str, batch_size: int,
                 workers: int, post_threads: int, save_probabilities: bool, max_pixels: int,
                 stop: threading.Event, settings=None):
        from legitseg.inference.registry import BuildSettings

        self.settings = settings or BuildSettings()  # the driver's: graph cache, ONNX Runtime threads
        self.runners = runners
        self.address = address
        self.precision = precision
        self.batch_size = max(1, batch_size)
        self.save_probabilities = save_probabilities
        self.max_pixels = max_pixels
        self.stop = stop
        self.preps = list(dict.fromkeys(r.prep for r in runners))
        self.device_type = runners[0].device.type

    def _connect(self):
        """The Ray module, initialised: an existing connection, --address / RAY_ADDRESS, or a local cluster.

        Returns (ray, started) where `started` says whether this call started the connection."""
        import ray

        if ray.is_initialized():
            return ray, False
        address = self.address or os.environ.get("RAY_ADDRESS") or None
        try:
            # Workers' stdout would reach ours (and --jsonl readers) with log_to_driver.
            # Workers get ONNX Runtime's telemetry switch too (legitseg/inference/ort_import.py): a worker
            # that imports it by any other road still imports it with telemetry off.
            # A local cluster started here reports no usage statistics (legitseg never touches the network).
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     logging_level=logging.WARNING, runtime_env={"env_vars": telemetry_env()})
        except (ConnectionError, RuntimeError, ValueError) as err:
            where = f"the Ray cluster at {address}" if address else "a local Ray cluster"
            raise RuntimeFailure(f"--engine ray: cannot connect to {where}: {err}") from err
        log.info("ray: connected to %s (%s)", address or "a new local cluster",
                 ", ".join(f"{k} {v:g}" for k, v in sorted(ray.cluster_resources().items())
                           if k in ("CPU", "GPU")))
        return ray, True

    def _dataset(self, ray, sources: list[Source]):
        import ray.data

        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # records, --jsonl and progress in input order
        ctx.enable_progress_bars = False
        resources = ray.cluster_resources()
        items = [{"i": i, "source": pickle.dumps(s, protocol=pickle.HIGHEST_PROTOCOL)}
                 for i, s in enumerate(sources)]
        import torch

        threads = torch.get_num_threads()
        if self.device_type == "cuda":
            # Decoding runs as 1-CPU tasks beside one actor per GPU.
            decode_cpus: float = 1
            actors, per_actor = max(1, int(resources.get("GPU", 0))), {"num_gpus": 1}
        else:
            # Each actor takes as many CPUs as the local engine's torch threads; decode asks for
            # the same, so Ray fuses it into the actors (no decoded pixels cross the object store).
            threads = max(1, min(threads, int(resources.get("CPU", 1))))
            decode_cpus = threads
            actors, per_actor = max(1, int(resources.get("CPU", 1)) // threads), {"num_cpus": threads}
        ds = ray.data.from_items(items)
        ds = ds.map(_decode, fn_kwargs={"preps": self.preps, "max_pixels": self.max_pixels},
                    num_cpus=decode_cpus)
        specs = [r.loaded.spec for r in self.runners]
        backends = [r.backend for r in self.runners]
        return ds.map_batches(
            _ModelActor, batch_size=self.batch_size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors),
            fn_constructor_kwargs=dict(specs=specs, backends=backends, device=self.device_type,
                                       precision=self.precision, batch_size=self.batch_size,
                                       save_probabilities=self.save_probabilities,
                                       max_pixels=self.max_pixels, threads=threads,
                                       cache_dir=str(self.settings.cache_dir) if self.settings.cache_dir else None,
                                       ort_threads=self.settings.ort_threads),
            **per_actor)

    def process(self, sources: list[Source]) -> Iterator[ImageResult]:
        """Yield one ImageResult per source, in input order, until done or `stop` is set.

        Raises RuntimeFailure (exit 4) when the cluster cannot be reached or a stage fails
        as a whole; LegitsegErrors raised in a worker keep their exit code.
        """
        if not sources:
            return
        ray, started = self._connect()
        try:
            rows = iter(self._dataset(ray, sources).iter_rows())
            expected = 0
            while not self.stop.is_set():
                try:
                    row = next(rows, None)
                except LegitsegError:
                    raise
                except Exception as err:  # noqa: BLE001 - whatever Ray raises stops the run with exit 4
                    cause = getattr(err, "cause", None)
                    if isinstance(cause, LegitsegError):
                        raise cause from err
                    raise RuntimeFailure(f"--engine ray: the pipeline failed: {type(err).__name__}: "
                                         f"{str(err).splitlines()[0] if str(err) else ''}") from err
                if row is None:
                    break
                if int(row["i"]) != expected:  # preserve_order is a promise of Ray Data; check it
                    raise RuntimeFailure(f"--engine ray: result {row['i']} arrived in place of {expected}")
                expected += 1
                yield pickle.loads(row["result"])
        finally:
            if started:
                ray.shutdown()
