"""`legitseg run`: plan, lock, resume, stream, summarise (SPEC sections 4-6).

Yields events for the CLI to show; never prints. Integrity problems (exit 3)
surface before any image is read; nothing under OUT changes before the lock
is held.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from legitseg.errors import ImageError, LegitsegError, UsageError
from legitseg.lock import OutputLock
from legitseg.manifest import Manifest, ModelSpec
from legitseg.pipeline.decode import DEFAULT_MAX_PIXELS, read_bytes, sha256_bytes
from legitseg.pipeline.sources import Source, discover
from legitseg.weights import verify_sha256
from legitseg.writers import (
    read_record,
    rebuild_summaries,
    record_rows,
    remove_stale_tmp,
    write_json,
)

log = logging.getLogger(__name__)


@dataclass
class RunConfig:
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
    arguments: dict[str, Any] = field(default_factory=dict)
    stdin_lines: Iterable[str] | None = None


@dataclass
class Planned:
    total: int
    todo: int
    skipped: int


@dataclass
class Skipped:
    source: Source
    rows: list[dict[str, Any]]


@dataclass
class Started:
    """Models are built; `device` is what they run on."""

    device: str
    backends: dict[str, str]


@dataclass
class Finished:
    status: str  # completed | interrupted
    processed: int
    skipped: int
    failed: int
    run_json: Path


def default_writers(device_type: str) -> int:
    """Writer threads (postprocessing on the CPU, PNG encoding, atomic writes).

    Two on the CPU, where the forward pass needs the cores. On a GPU the writers are
    the bottleneck: measured on an H200 with 16 cores (docs/benchmarks.md), going from
    2 to 8 writers raised DeepLabV3Plus+efficientnet-b2 @512 fp16 from 160 to 190 img/s.
    """
    if device_type == "cuda":
        return max(2, min(8, (os.cpu_count() or 1) // 2))
    return 2


def default_workers(device_type: str) -> int:
    cores = os.cpu_count() or 1
    if device_type == "cuda":
        return max(2, min(12, cores - 2))
    # On the CPU the forward pass wants the cores; one or two decode threads keep it fed.
    return max(1, min(4, cores // 2))


def _up_to_date(source: Source, record: dict[str, Any] | None, models: list[ModelSpec]) -> bool:
    if not record or record.get("status") != "ok":
        return False
    entries = record.get("models", {})
    for spec in models:
        e = entries.get(spec.name)
        if not e or e.get("status") != "ok" or e.get("weights_sha256") != spec.sha256:
            return False
    try:
        return sha256_bytes(read_bytes(source.path)) == record.get("sha256")
    except ImageError:
        return False


def plan(sources: list[Source], out: Path, models: list[ModelSpec], overwrite: bool,
         workers: int) -> tuple[list[Source], list[tuple[Source, dict[str, Any]]]]:
    """Split sources into (to process, skipped with their records). Hashes only images that have a record."""
    if overwrite:
        return list(sources), []

    def check(source: Source) -> tuple[Source, dict[str, Any] | None, bool]:
        record = read_record(out, source.name)
        return source, record, _up_to_date(source, record, models)

    todo, skipped = [], []
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="legitseg-plan") as pool:
        for source, record, fresh in pool.map(check, sources):
            if fresh:
                skipped.append((source, record))
            else:
                todo.append(source)
    return todo, skipped


def execute(cfg: RunConfig, stop: threading.Event) -> Iterator[Any]:
    """Run the whole job, yielding Planned, Skipped, Started, ImageOutcome and finally Finished.

    Order matters for what a failure leaves behind: weights hashes (exit 3) and
    INPUT arguments (exit 2) are checked before OUT is touched; an OUT that already
    exists is locked at once (exit 5); models are built (exit 3) before anything
    is written; only then is OUT created and written to.
    Raises LegitsegError subclasses; their exit codes are SPEC section 6's.
    """
    started_at = time.time()
    if cfg.precision == "fp16" and cfg.device == "cpu":
        raise UsageError("--precision fp16 needs a CUDA device; on the CPU use fp32 or bf16")
    for spec in cfg.models:
        verify_sha256(spec.weights, spec.sha256, spec.name)
    sources = discover(cfg.inputs, cfg.stdin_lines)
    lock = OutputLock(cfg.out)
    try:
        if cfg.out.exists():
            lock.acquire()
        yield from _execute_locked(cfg, stop, sources, lock, started_at)
    finally:
        lock.release()


def _execute_locked(cfg: RunConfig, stop: threading.Event, sources: list[Source], lock: OutputLock,
                    started_at: float) -> Iterator[Any]:
    # torch (and the device it finds) is imported only when there is work: a rerun with
    # nothing to do stays a matter of hashing files.
    device_type = "cpu" if cfg.device == "cpu" else "cuda" if cfg.device.startswith("cuda") else "cpu"
    settings = {"device": None, "batch_size": cfg.batch_size, "writers": cfg.writers,
                "workers": cfg.workers if cfg.workers is not None else default_workers(device_type)}
    todo, skipped = plan(sources, cfg.out, cfg.models, cfg.overwrite, max(settings["workers"], 2))
    runners: list = []
    if todo and not stop.is_set():
        from legitseg.pipeline.infer import check_precision, choose_device

        device = choose_device(cfg.device)
        check_precision(cfg.precision, device)
        settings["device"] = str(device)
        if cfg.workers is None:
            settings["workers"] = default_workers(device.type)
        settings["batch_size"] = cfg.batch_size or (16 if device.type == "cuda" else 4)
        settings["writers"] = cfg.writers or default_writers(device.type)
        runners = _build_runners(cfg, device)
    if not lock.held:
        lock.acquire()
    removed = remove_stale_tmp(cfg.out)
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted run", removed)

    counts = {"processed": 0, "skipped": len(skipped), "failed": 0}
    status = "failed"
    try:
        yield Planned(len(sources), len(todo), len(skipped))
        selected = {s.name for s in cfg.models}
        for source, record in skipped:
            yield Skipped(source, [r for r in record_rows(record) if r["model"] in selected])
        if runners and not stop.is_set():
            yield Started(settings["device"], {r.name: r.backend for r in runners})
            from legitseg.pipeline.engine import Engine

            run_id = f"{time.strftime('%Y%m%dT%H%M%S', time.localtime(started_at))}-{os.getpid()}"
            engine = Engine(runners, cfg.out, batch_size=settings["batch_size"], workers=settings["workers"],
                            writers=settings["writers"], save_probabilities=cfg.save_probabilities,
                            max_pixels=cfg.max_pixels, stop=stop, run_id=run_id)
            for outcome in engine.process(todo):
                counts["processed" if outcome.ok else "failed"] += 1
                yield outcome
        status = "interrupted" if stop.is_set() else "completed"
    finally:
        run_json = _finish(cfg, status, counts, settings, runners, started_at)
    yield Finished(status, counts["processed"], counts["skipped"], counts["failed"], run_json)


def _finish(cfg: RunConfig, status: str, counts: dict[str, int], settings: dict[str, Any],
            runners: list, started_at: float) -> Path:
    """Rebuild scores.* from the records and write run.json (also after a failure, when possible)."""
    from legitseg.provenance import command_line, versions

    models = {s.name: {"weights": str(s.weights), "weights_sha256": s.sha256} for s in cfg.models}
    for r in runners:
        models[r.name].update(backend=r.backend, parity=r.parity,
                              build_seconds=round(r.loaded.build_seconds, 3))
    run_json = cfg.out / "run.json"
    try:
        rebuild_summaries(cfg.out)
        write_json(run_json, {
            "status": status,
            "versions": versions(),
            **settings,
            "precision": cfg.precision,
            "arguments": {**cfg.arguments, "command": command_line()},
            "manifest": {"path": str(cfg.manifest.path.absolute()), "sha256": cfg.manifest.sha256},
            "models": models,
            "counts": counts,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started_at)),
            "ended": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        })
    except LegitsegError as err:
        if status != "failed":
            raise
        # Already failing (disk full, say): the first error is the one to report.
        log.error("could not write the run summary: %s", err)
    return run_json


def _build_runners(cfg: RunConfig, device) -> list:
    from legitseg.factory import load_model
    from legitseg.onnx_backend import build_ort_runner, choose_backend
    from legitseg.pipeline.infer import TorchRunner

    runners = []
    for spec in cfg.models:
        loaded = load_model(spec)
        runner = TorchRunner(loaded, device, cfg.precision)
        if choose_backend(cfg.backend, spec, device, cfg.precision) == "onnxruntime":
            # Exported from the verified module; torch stays the runner if the gate says no.
            runner = build_ort_runner(loaded, runner, spec.parity_tolerance).runner
        runners.append(runner)
        log.info("built %s (%s, %.2fs)", spec.name, spec.arch or spec.encoder, loaded.build_seconds)
    return runners
