"""How many images per ONNX Runtime call run fastest here: chosen on the first batch, then remembered.

On the CPU, ONNX Runtime computes each image of a batch on its own, so a batch run in calls of
fewer images gives the same outputs, bit for bit. Which is faster depends on the model and the
machine. On the 2-core bench machine DeepLabV3Plus + efficientnet-b2 at 384x384 ran 5-15%
faster per image one or two at a time than four at a time (one image's activations stay in
cache), while the demo's mobilenet models at 160-192 ran 1.2-1.5x faster four at a time (a
call's fixed cost dominates): docs/onnx.md, "Images per call".

On the first batch of two or more images, each candidate (the whole batch, 2, 1) runs once to
warm up (ONNX Runtime plans its memory per input shape) and then twice timed, in turns; the
fastest wins. A candidate whose outputs are not bit-identical to the whole batch's is never
used, so the choice changes the speed only. It is cached per graph, batch size, threads,
ONNX Runtime version and CPU (`ort_calls.json` in the cache folder): later runs on the machine
skip the measurement. run.json names it (`models.<name>.variant`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from legitseg.fsio import read_choices, remember_choice
from legitseg.models.onnx_export import INPUT, OUTPUT

log = logging.getLogger(__name__)
TIMED_ROUNDS = 2


def run_in_calls(session: Any, batch: np.ndarray, per_call: int) -> np.ndarray:
    """The session's output for `batch`, computed `per_call` images at a time."""
    if per_call >= batch.shape[0]:
        return session.run([OUTPUT], {INPUT: batch})[0]
    return np.concatenate([session.run([OUTPUT], {INPUT: batch[i:i + per_call]})[0]
                           for i in range(0, batch.shape[0], per_call)])


def candidates(n: int) -> list[int]:
    """Images per call worth timing for a batch of `n`: the whole batch first (the reference)."""
    return [n] + [k for k in (2, 1) if k < n]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cache_key(graph_sha256: str, batch: int, threads: int, ort_version: str) -> str:
    fields = [graph_sha256, batch, threads, ort_version, cpu_name(), os.cpu_count()]
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()


def cache_file(cache_dir: Path) -> Path:
    return cache_dir / "ort_calls.json"


def _read_cache(cache_dir: Path | None) -> dict[str, Any]:
    return read_choices(None if cache_dir is None else cache_file(cache_dir))


def _write_cache(cache_dir: Path | None, key: str, value: Any) -> None:
    remember_choice(None if cache_dir is None else cache_file(cache_dir), key, value)


def choose(session: Any, batch: np.ndarray, key: str, cache_dir: Path | None, name: str) -> tuple[int, np.ndarray]:
    """The fastest images per call for batches like `batch` (cached, else measured now), and
    the output for `batch`."""
    n = batch.shape[0]
    cached = _read_cache(cache_dir).get(key)
    if isinstance(cached, int) and not isinstance(cached, bool) and 1 <= cached <= n:
        log.info("%s: onnxruntime, %d image(s) per call (measured earlier on this machine)", name, cached)
        return cached, run_in_calls(session, batch, cached)
    reference = run_in_calls(session, batch, n)
    usable = [n]
    for k in candidates(n)[1:]:
        if np.array_equal(run_in_calls(session, batch, k), reference):
            usable.append(k)
        else:
            log.info("%s: %d image(s) per call changes the outputs; not used", name, k)
    best_time = dict.fromkeys(usable, math.inf)
    for _ in range(TIMED_ROUNDS):
        for k in usable:
            t0 = time.perf_counter()
            run_in_calls(session, batch, k)
            best_time[k] = min(best_time[k], time.perf_counter() - t0)
    best = min(usable, key=best_time.__getitem__)
    log.info("%s: onnxruntime, %d image(s) per call, the fastest for a batch of %d (%s)", name, best, n,
             ", ".join(f"{k}: {1000 * t:.0f} ms" for k, t in best_time.items()))
    _write_cache(cache_dir, key, best)
    return best, reference
