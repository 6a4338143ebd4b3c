"""`legitseg run`: plan, lock, resume, build runners, stream through the engine into the sink.

Yields events for the CLI (or any other caller) to show; never prints. Integrity
problems (exit 3) surface before any image is read; nothing under OUT changes
before the lock is held.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from legitseg.errors import ImageError, LegitsegError, NoImages
from legitseg.fsio import remove_stale_tmp, sha256_bytes, write_json
from legitseg.images.decode import read_bytes
from legitseg.images.naming import source_key
from legitseg.images.sources import OUT_MARKER, Discovery, Source, discover_all
from legitseg.manifest.spec import ModelSpec
from legitseg.models.weights import verify_sha256
from legitseg.options import (  # noqa: F401 - RunConfig and the defaults are used through legitseg.run too
    BACKENDS,
    ENGINES,
    PRECISIONS,
    RunConfig,
    check_options,
    default_batch_size,
    default_workers,
    default_writers,
)
from legitseg.output.lock import OutputLock
from legitseg.output.records import ImageRecord
from legitseg.output.shard import check_layout, claim_layout
from legitseg.output.writers import RECORDS, RUNS, ImageOutcome, read_record, rebuild_summaries

log = logging.getLogger(__name__)

MAX_LISTED = 1000  # skipped files named in the run file; more are counted


@dataclass
class Planned:
    total: int
    todo: int
    skipped: int
    skipped_failed: int = 0  # of `skipped`: failed before and would fail again


@dataclass
class Skipped:
    record: ImageRecord
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
    run_id: str = ""
    skipped_failed: int = 0


@dataclass
class _Settings:
    device: str | None = None
    batch_size: int | None = None
    workers: int = 1
    writers: int | None = None
    math: dict[str, Any] = field(default_factory=dict)
    jpeg_decoder: str | None = None


def new_run_id(started_at: float) -> str:
    """`<local start time>-<pid>-<4 random hex>`: unique, so no run file is ever overwritten."""
    return f"{time.strftime('%Y%m%dT%H%M%S', time.localtime(started_at))}-{os.getpid()}-{secrets.token_hex(2)}"


def plan(sources: list[Source], out: Path, models: list[ModelSpec], overwrite: bool,
         workers: int, retry_failed: bool = False, overlay: bool = False) -> tuple[list[Source], list[ImageRecord]]:
    """Split sources into (to process, skipped records). Hashes only images that have a record.

    Skipped: same bytes, weights and settings, and done, or failed in a way that would
    repeat (unless `retry_failed`)."""
    if overwrite:
        return list(sources), []

    def check(source: Source) -> tuple[Source, ImageRecord | None]:
        record = read_record(out, source.name)
        if record is None:
            return source, None
        try:
            digest = sha256_bytes(read_bytes(source.path))
        except ImageError:
            return source, None
        return source, record if record.done_for(models, digest, retry_failed, overlay) else None

    todo, skipped = [], []
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="legitseg-plan") as pool:
        for source, record in pool.map(check, sources):
            if record is not None:
                skipped.append(record)
            else:
                todo.append(source)
    return todo, skipped


def execute(cfg: RunConfig, stop: threading.Event) -> Iterator[Any]:
    """Run the whole job, yielding Planned, Skipped, Started, ImageOutcome and finally Finished.

    Order matters for what a failure leaves behind: weights hashes (exit 3) and
    INPUT arguments (exit 2) are checked before OUT is touched; an OUT that already
    exists is locked at once (exit 5); models are built (exit 3) before anything
    is written; only then is OUT created and written to.
    Raises LegitsegError subclasses with the exit codes of docs/exit-codes.md.
    """
    started_at = time.time()
    for spec in cfg.models:
        for weights, sha256 in spec.weight_files:
            verify_sha256(weights, sha256, spec.name)
    found = discover_all(cfg.inputs, cfg.stdin, null=cfg.null, out=cfg.out, existing=_recorded_source(cfg.out))
    _report_discovery(found, cfg.require_images)
    if cfg.shard is not None:
        total = len(found.sources)
        found.sources = cfg.shard.select(found.sources)
        log.info("shard %s: %d of %d image(s)", cfg.shard, len(found.sources), total)
        check_layout(cfg.out, cfg.shard)  # exit 2 now, before models are built, for another N
    if cfg.engine == "ray":
        from legitseg.engines.ray_data import require_ray

        require_ray()
    lock = OutputLock(cfg.out, cfg.shard)
    try:
        if cfg.out.exists():
            lock.acquire()
        yield from _execute_locked(cfg, stop, found, lock, started_at)
    finally:
        lock.release()


def _recorded_source(out: Path):
    """For naming: the source key OUT records under an output name (older records: their image path)."""

    def existing(name: str) -> str | None:
        record = read_record(out, name)
        if record is None:
            return None
        return record.source or source_key(record.image)

    return existing


def _report_discovery(found: Discovery, require_images: bool) -> None:
    """Name every file passed over (one line per reason, then the paths) and every empty INPUT."""
    by_reason: dict[str, list[str]] = {}
    for path, reason in found.skipped:
        by_reason.setdefault(reason, []).append(path)
    for reason, paths in by_reason.items():
        shown = ", ".join(paths[:20]) + (f", ... ({len(paths) - 20} more in run.json)" if len(paths) > 20 else "")
        log.info("skipped %d path(s): %s: %s", len(paths), reason, shown)
    for folder in found.empty_inputs:
        log.warning("INPUT %s holds no images", folder)
    if require_images and (found.empty_inputs or not found.sources):
        what = ", ".join(found.empty_inputs) or "the INPUTs"
        raise NoImages(f"--require-images: no images found in {what}")


def _execute_locked(cfg: RunConfig, stop: threading.Event, found: Discovery, lock: OutputLock,
                    started_at: float) -> Iterator[Any]:
    sources = found.sources
    # torch (and the device it finds) is imported only when there is work: a rerun with
    # nothing to do stays a matter of hashing files.
    device_type = "cuda" if cfg.device.startswith("cuda") else "cpu"
    settings = _Settings(batch_size=cfg.batch_size, writers=cfg.writers,
                         workers=cfg.workers if cfg.workers is not None else default_workers(device_type))
    todo, skipped = plan(sources, cfg.out, cfg.models, cfg.overwrite, max(settings.workers, 2), cfg.retry_failed,
                         cfg.overlay)
    runners: list = []
    if todo and not stop.is_set():
        if cfg.runners:
            device = cfg.runners[0].device
        else:
            from legitseg.inference.torch_runner import check_precision, choose_device

            device = choose_device(cfg.device)
            check_precision(cfg.precision, device)
        settings.device = str(device)
        if cfg.workers is None:
            settings.workers = default_workers(device.type)
        settings.batch_size = cfg.batch_size or default_batch_size(device.type)
        settings.writers = cfg.writers or default_writers(device.type)
        if cfg.runners:
            runners = list(cfg.runners)
        elif cfg.engine == "ray":  # the actors build the runners; the driver only verifies and plans
            from legitseg.engines.ray_data import driver_runners

            runners = driver_runners(cfg.models, device, cfg.precision, cfg.backend)
        else:
            runners = build_runners(cfg.models, device, cfg.precision, cfg.backend)
    if not lock.held:
        lock.acquire()
    if cfg.shard is not None:
        claim_layout(cfg.out, cfg.shard)  # the first shard records N; another N is refused (exit 2)
    (cfg.out / OUT_MARKER).touch()
    # Every OUT has records/, even with no image in it: a run over an empty folder leaves a
    # folder that every command reads as an OUT of zero images.
    (cfg.out / RECORDS).mkdir(exist_ok=True)
    # Temporary files of a killed run; shards leave them (another shard may be writing its own).
    removed = remove_stale_tmp(cfg.out) if lock.exclusive else 0
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted run", removed)

    run_id = new_run_id(started_at)
    skipped_failed = sum(not r.ok for r in skipped)
    counts = {"processed": 0, "skipped": len(skipped), "failed": 0, "skipped_failed": skipped_failed}
    status = "failed"
    try:
        yield Planned(len(sources), len(todo), len(skipped), skipped_failed)
        selected = {s.name for s in cfg.models}
        for record in skipped:
            yield Skipped(record, record.rows(selected, run_id))
        if runners and not stop.is_set():
            yield Started(settings.device or "", {r.name: r.backend for r in runners})
            for outcome in _stream(cfg, runners, settings, todo, stop, run_id):
                counts["processed" if outcome.ok else "failed"] += 1
                yield outcome
        status = "interrupted" if stop.is_set() else "completed"
    finally:
        run_json = _finish(cfg, status, counts, settings, runners, started_at, run_id, found)
    yield Finished(status, counts["processed"], counts["skipped"], counts["failed"], run_json, run_id,
                   skipped_failed)


def _stream(cfg: RunConfig, runners: list, settings: _Settings, todo: list[Source],
            stop: threading.Event, run_id: str) -> Iterator[ImageOutcome]:
    from legitseg.inference.torch_runner import math_mode
    from legitseg.output.overlay import Style
    from legitseg.output.records import settings_digest
    from legitseg.output.writers import ModelInfo, Sink

    infos = [ModelInfo(r.name, r.loaded.spec.task, r.loaded.spec.sha256, settings_digest(r.loaded.spec),
                       r.backend, r.parity) for r in runners]
    writers = settings.writers or 2
    options = dict(batch_size=settings.batch_size or 1, workers=settings.workers, post_threads=writers,
                   save_probabilities=cfg.save_probabilities, max_pixels=cfg.max_pixels, stop=stop)
    if cfg.engine == "ray":
        from legitseg.engines.ray_data import RayEngine

        engine = RayEngine(runners, address=cfg.address, precision=cfg.precision, **options)
    else:
        from legitseg.engines.local import Engine

        engine = Engine(runners, keep_rgb=cfg.overlay, **options)
    settings.jpeg_decoder = "nvjpeg" if getattr(engine, "device_decode", False) else "opencv"
    # The writers' queue is as deep as the engine's (on the GPU: two batches, which arrive whole).
    sink = Sink(cfg.out, infos, run_id, writers, depth=getattr(engine, "depth", None),
                overlays={s.name: Style.of(s) for s in cfg.models} if cfg.overlay else None)
    from legitseg.provenance import math_mode as effective_math

    with math_mode(cfg.precision):
        settings.math = effective_math(settings.device or "cpu", cfg.precision)
        yield from sink.consume(engine.process(todo))


def _finish(cfg: RunConfig, status: str, counts: dict[str, int], settings: _Settings,
            runners: list, started_at: float, run_id: str, found: Discovery) -> Path:
    """Rebuild scores.* from the records, write this run's file under runs/ and run.json
    (also after a failure, when possible)."""
    from legitseg.output.overlay import Style
    from legitseg.provenance import command_line, environment, versions

    models: dict[str, dict[str, Any]] = {
        s.name: {"weights": [str(w) for w, _ in s.weight_files] if s.is_ensemble else str(s.weights),
                 "weights_sha256": s.sha256} for s in cfg.models}
    for spec in cfg.models:
        if spec.task == "segmentation":  # how overlays and the report draw each label
            models[spec.name]["colors"] = Style.of(spec).hex_colours()
    for r in runners:
        models[r.name].update(backend=r.backend, parity=r.parity, parity_gate=getattr(r, "parity_gate", None),
                              decode=r.loaded.spec.decode,
                              variant=getattr(r, "variant", None),
                              build_seconds=round(r.loaded.build_seconds, 3))
    run_json = cfg.out / "run.json"
    try:
        scan = rebuild_summaries(cfg.out, run_id)
        data = {
            "run_id": run_id,
            "status": status,
            "shard": str(cfg.shard) if cfg.shard else None,
            "engine": cfg.engine,
            "versions": versions(),
            "device": settings.device,
            "batch_size": settings.batch_size,
            "writers": settings.writers,
            "workers": settings.workers,
            "precision": cfg.precision,
            "math": settings.math,
            "jpeg_decoder": settings.jpeg_decoder,
            "arguments": {**cfg.arguments(), "command": command_line()},
            "manifest": {"path": str(cfg.manifest.path.absolute()), "sha256": cfg.manifest.sha256},
            "models": models,
            "counts": {**counts, "unreadable_records": len(scan.unreadable)},
            "unreadable_records": scan.unreadable[:MAX_LISTED],
            "inputs": {"stdin": "-" in cfg.inputs, "images": len(found.sources),
                       "skipped_paths": len(found.skipped),
                       "skipped": [list(s) for s in found.skipped[:MAX_LISTED]],
                       "empty_inputs": found.empty_inputs},
            "environment": environment(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started_at)),
            "ended": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        # The run's own file first: run.json ("the latest run") may be replaced, runs/ never.
        write_json(cfg.out / RUNS / f"{run_id}.json", data)
        write_json(run_json, data)
    except LegitsegError as err:
        if status != "failed":
            raise
        # Already failing (disk full, say): the first error is the one to report.
        log.error("could not write the run summary: %s", err)
    return run_json


def build_runners(specs: list[ModelSpec], device, precision: str, backend: str | None) -> list:
    """Load (sha256-checked) and build one runner per model. Raises WeightsError/ManifestError (exit 3)."""
    from legitseg.inference.registry import build_runner
    from legitseg.models.factory import load_model

    runners = []
    for spec in specs:
        loaded = load_model(spec)
        runners.append(build_runner(loaded, device, precision, backend))
        log.info("built %s (%s, %.2fs)", spec.name, spec.arch or spec.encoder, loaded.build_seconds)
    return runners
