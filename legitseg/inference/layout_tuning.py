"""Which memory layout of a model runs fastest on this GPU: chosen on the first batch, then remembered.

Only layouts are chosen by timing (`precision.variants`: channels_last or contiguous). Both
compute the same function, so which one wins (it depends on the architecture, the batch
and the card: docs/benchmarks.md) changes the speed, not the answer. Half weights
instead of autocast change the arithmetic, so they are never chosen here: a model asks
for them in its manifest (`half_weights`). On the run's first batch each layout runs
twice to warm up and three times timed; its probabilities are compared with the default
layout's, and one that moves them by more than `VARIANT_TOLERANCE` (cuDNN kernels of
another layout sum in another order) or gives NaN/Inf is not used. The choice is cached
per GPU, torch version, weights, precision, weight type and input shape (`layouts.json`
in the cache folder), so every later run on the machine uses the same layout; run.json
names it (`models.<name>.variant`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from legitseg.fsio import read_choices, remember_choice
from legitseg.images.device_memory import out_of_memory
from legitseg.inference.activation import activation
from legitseg.inference.precision import LAYOUTS, VARIANT_TOLERANCE, variants

if TYPE_CHECKING:
    from legitseg.inference.runners import Preprocessor
    from legitseg.models.factory import LoadedModel

log = logging.getLogger(__name__)
WARMUP, TIMED = 2, 3


class Tunable(Protocol):
    """What tuning needs of a runner (torch_runner.TorchRunner, which calls `tune`)."""

    loaded: LoadedModel
    device: torch.device
    precision: str
    variant: str
    layout: str
    half: torch.dtype | None
    pre: Preprocessor
    cache_dir: Path | None  # the run's cache folder (options.Environment); None: nothing remembered

    @property
    def name(self) -> str: ...

    def forward(self, x: torch.Tensor) -> torch.Tensor: ...

    def use_variant(self, variant: str) -> None: ...


def cache_file(cache_dir: Path) -> Path:
    return cache_dir / "layouts.json"


def cache_key(runner: Tunable, shape: tuple[int, ...]) -> str:
    device = runner.device
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    fields = [card, torch.__version__, runner.loaded.spec.sha256, runner.precision, list(shape),
              variants(runner.precision), str(runner.half)]
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()


def _read_cache(cache_dir: Path | None) -> dict[str, Any]:
    return read_choices(None if cache_dir is None else cache_file(cache_dir))


def _write_cache(cache_dir: Path | None, key: str, value: Any) -> None:
    remember_choice(None if cache_dir is None else cache_file(cache_dir), key, value)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(runner: Tunable, x: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Seconds per forward pass of `x` with the runner's current variant, and its output."""
    for _ in range(WARMUP):
        y = runner.forward(x)
    _sync(runner.device)
    t0 = time.perf_counter()
    for _ in range(TIMED):
        y = runner.forward(x)
    _sync(runner.device)
    return (time.perf_counter() - t0) / TIMED, y


def tune(runner: Tunable, arrays: list) -> None:
    """Set `runner` to its fastest variant for batches like `arrays` (cached, else measured now).

    Raises torch.OutOfMemoryError when even the default variant does not fit this batch
    (the engine then retries with smaller batches, and this is measured again).
    """
    spec, default = runner.loaded.spec, runner.layout
    with torch.inference_mode():
        x0 = runner.pre.pad(runner.pre.tensor(arrays))[0].contiguous()
    key = cache_key(runner, tuple(x0.shape))
    cached = _read_cache(runner.cache_dir).get(key)
    if cached in variants(runner.precision):
        if cached != default:
            runner.use_variant(cached)
        log.info("%s: %s (measured earlier on this machine)", runner.name, cached)
        return
    timings: dict[str, float] = {}
    reference = None
    for variant in variants(runner.precision):
        runner.use_variant(variant)
        oom = False
        try:
            seconds, y = _time(runner, x0.contiguous(memory_format=LAYOUTS[variant]))
        except RuntimeError as err:  # cuDNN/cuBLAS workspaces fail as plain RuntimeErrors
            if not out_of_memory(err):
                raise
            oom = True  # handled below, once the traceback is released
        if oom:
            runner.use_variant(default)
            torch.cuda.empty_cache()
            if variant == default:
                raise torch.OutOfMemoryError(f"{runner.name}: out of memory on {runner.device} "
                                             f"with a batch of {len(arrays)}")
            log.info("%s: %s does not fit a batch of %d; not used", runner.name, variant, len(arrays))
            continue
        with torch.inference_mode():
            p = activation(y.float(), spec).cpu()
        del y
        if reference is None:
            reference = p
        else:
            diff = (p - reference).abs().max().item() if p.shape == reference.shape else math.inf
            if not math.isfinite(diff) or diff > VARIANT_TOLERANCE[runner.precision]:
                log.info("%s: %s moves probabilities by %.3g against %s; not used", runner.name, variant,
                         diff, default)
                continue
        timings[variant] = seconds
    best = min(timings, key=timings.__getitem__) if timings else default
    if best != runner.layout:
        runner.use_variant(best)
    log.info("%s: %s, the fastest of %s", runner.name, best,
             ", ".join(f"{v} {1000 * t:.1f} ms" for v, t in timings.items()))
    _write_cache(runner.cache_dir, key, best)
