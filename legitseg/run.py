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

from legitseg.errors import ImageError, LegitsegError
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
    writers: int = 2
    precision: str = "fp32"
    backend: str = "auto"
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

    Raises LegitsegError subclasses; their exit codes are SPEC section 6's.
    """
    from legitseg.pipeline.infer import check_precision, choose_device
    from legitseg.provenance import command_line, versions

    started_at = time.time()
    device = choose_device(cfg.device)
    check_precision(cfg.precision, device)
    for spec in cfg.models:
        verify_sha256(spec.weights, spec.sha256, spec.name)
    sources = discover(cfg.inputs, cfg.stdin_lines)
    workers = cfg.workers if cfg.workers is not None else default_workers(device.type)
    batch_size = cfg.batch_size or (16 if device.type == "cuda" else 4)

    lock = OutputLock(cfg.out)
    lock.acquire()
    counts = {"processed": 0, "skipped": 0, "failed": 0}
    status = "failed"
    run_info: dict[str, Any] = {}
    try:
        removed = remove_stale_tmp(cfg.out)
        if removed:
            log.info("removed %d temporary file(s) left by an interrupted run", removed)
        todo, skipped = plan(sources, cfg.out, cfg.models, cfg.overwrite, max(workers, 2))
        counts["skipped"] = len(skipped)
        yield Planned(len(sources), len(todo), len(skipped))
        selected = {s.name for s in cfg.models}
        for source, record in skipped:
            yield Skipped(source, [r for r in record_rows(record) if r["model"] in selected])
        run_info = {"device": str(device), "models": {}}
        if todo and not stop.is_set():
            runners = _build_runners(cfg, device)
            run_info["models"] = {
                r.name: {"weights": str(r.loaded.spec.weights), "weights_sha256": r.loaded.spec.sha256,
                         "backend": r.backend, "parity": r.parity, "build_seconds": round(r.loaded.build_seconds, 3)}
                for r in runners
            }
            yield Started(str(device), {r.name: r.backend for r in runners})
            from legitseg.pipeline.engine import Engine

            engine = Engine(runners, cfg.out, batch_size=batch_size, workers=workers, writers=cfg.writers,
                            save_probabilities=cfg.save_probabilities, max_pixels=cfg.max_pixels,
                            stop=stop, run_id=f"{time.strftime('%Y%m%dT%H%M%S', time.localtime(started_at))}-{os.getpid()}")
            for outcome in engine.process(todo):
                counts["processed" if outcome.ok else "failed"] += 1
                yield outcome
        status = "interrupted" if stop.is_set() else "completed"
    finally:
        try:
            if status != "failed" or cfg.out.is_dir():
                rebuild_summaries(cfg.out)
            run_json = cfg.out / "run.json"
            write_json(run_json, {
                "status": status,
                "versions": versions(),
                "device": run_info.get("device", str(device)),
                "precision": cfg.precision,
                "batch_size": batch_size,
                "workers": workers,
                "arguments": {**cfg.arguments, "command": command_line()},
                "manifest": {"path": str(cfg.manifest.path.absolute()), "sha256": cfg.manifest.sha256},
                "models": run_info.get("models") or {
                    s.name: {"weights": str(s.weights), "weights_sha256": s.sha256} for s in cfg.models},
                "counts": counts,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started_at)),
                "ended": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            })
        except LegitsegError as err:
            log.error("could not write the run summary: %s", err)
            if status != "failed":
                raise
        finally:
            lock.release()
    yield Finished(status, counts["processed"], counts["skipped"], counts["failed"], run_json)


def _build_runners(cfg: RunConfig, device) -> list:
    from legitseg.factory import load_model
    from legitseg.pipeline.infer import TorchRunner

    runners = []
    for spec in cfg.models:
        loaded = load_model(spec)
        runners.append(TorchRunner(loaded, device, cfg.precision))
        log.info("built %s (%s, %.2fs)", spec.name, spec.arch or spec.encoder, loaded.build_seconds)
    return runners
