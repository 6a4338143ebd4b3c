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
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from legitseg.errors import ImageError, LegitsegError, NoImages, UsageError
from legitseg.fsio import remove_stale_tmp, sha256_bytes, write_json
from legitseg.images.decode import read_bytes
from legitseg.images.naming import recorded_keys
from legitseg.images.sources import OUT_MARKER, Discovery, Found, Source, find_all
from legitseg.manifest.spec import ModelSpec
from legitseg.models.weights import verify_sha256
from legitseg.options import (  # noqa: F401 - RunConfig and the defaults are used through legitseg.run too
    RunConfig,
    check_options,
    default_batch_size,
    default_workers,
    default_writers,
    resolve_device,
)
from legitseg.output.lock import OutputLock, summary_lock
from legitseg.output.records import ImageRecord
from legitseg.output.resume import Resume
from legitseg.output.shard import check_layout, claim_layout
from legitseg.output.writers import RECORDS, RUNS, ImageOutcome, rebuild_summaries, write_summaries
from legitseg.timeline import begin, mark

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
    adequate: int | None = None  # images judged adequate (done or skipped); None without a quality policy


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


def plan(sources: list[Source], records: Mapping[str, ImageRecord], out: Path, models: list[ModelSpec],
         overwrite: bool, workers: int, retry_failed: bool = False, overlay: bool = False,
         quality=None) -> tuple[list[Source], list[ImageRecord]]:
    """Split sources into (to process, skipped records). Hashes only images that have a record
    (`records`: OUT's records by output name, as `Resume` read them).

    Skipped: same bytes, weights and settings, and done, or failed in a way that would
    repeat (unless `retry_failed`)."""
    if overwrite:
        return list(sources), []

    def check(source: Source) -> tuple[Source, ImageRecord | None]:
        record = records.get(source.name)
        if record is None:
            return source, None
        try:
            data = read_bytes(source.path)
        except ImageError:
            return source, None
        digest = sha256_bytes(data)
        if quality is not None or record.quality is not None:  # a changed limit: the verdict, not the models
            from legitseg.images.quality_resume import resumed

            return source, resumed(out, record, data, quality,
                                   lambda r: r.done_for(models, digest, retry_failed, overlay))
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
    begin("run")
    for spec in cfg.models:
        for weights, sha256 in spec.weight_files:
            verify_sha256(weights, sha256, spec.name)
    paths = find_all(cfg.inputs, cfg.stdin, null=cfg.null, out=cfg.out)
    _report_discovery(paths, cfg.require_images)
    if cfg.shard is not None:
        check_layout(cfg.out, cfg.shard)  # exit 2 now, before models are built, for another N
    if cfg.engine == "ray":
        if cfg.manifest.quality is not None:
            raise UsageError("the manifest's quality: policy is measured by the local engine only; "
                             "run without --engine ray or remove quality:")
        from legitseg.engines.ray_data import require_ray

        require_ray()
    lock = OutputLock(cfg.out, cfg.shard)
    try:
        if cfg.out.exists():
            lock.acquire()
        # OUT's records, read once (under the lock when OUT exists): names, skip decisions,
        # previous entries and the summaries all come from this one reading.
        resume = Resume.read(cfg.out, exact=lock.exclusive or not lock.held)
        found = paths.named(recorded_keys(resume.records))
        if cfg.shard is not None:
            total = len(found.sources)
            found.sources = cfg.shard.select(found.sources)
            log.info("shard %s: %d of %d image(s)", cfg.shard, len(found.sources), total)
        yield from _execute_locked(cfg, stop, found, resume, lock, started_at)
    finally:
        lock.release()


def _report_discovery(found: Found, require_images: bool) -> None:
    """Name every file passed over (one line per reason, then the paths) and every empty INPUT."""
    by_reason: dict[str, list[str]] = {}
    for path, reason in found.skipped:
        by_reason.setdefault(reason, []).append(path)
    for reason, paths in by_reason.items():
        shown = ", ".join(paths[:20]) + (f", ... ({len(paths) - 20} more in run.json)" if len(paths) > 20 else "")
        log.info("skipped %d path(s): %s: %s", len(paths), reason, shown)
    for folder in found.empty_inputs:
        log.warning("INPUT %s holds no images", folder)
    if require_images and (found.empty_inputs or not found.paths):
        what = ", ".join(found.empty_inputs) or "the INPUTs"
        raise NoImages(f"--require-images: no images found in {what}")


def _execute_locked(cfg: RunConfig, stop: threading.Event, found: Discovery, resume: Resume,
                    lock: OutputLock, started_at: float) -> Iterator[Any]:
    sources = found.sources
    # torch (and the device it finds) is imported only when there is work: a rerun with
    # nothing to do stays a matter of hashing files.
    device_type = "cuda" if cfg.device.startswith("cuda") else "cpu"
    settings = _Settings(batch_size=cfg.batch_size, writers=cfg.writers,
                         workers=cfg.workers if cfg.workers is not None else default_workers(device_type))
    todo, skipped = plan(sources, resume.records, cfg.out, cfg.models, cfg.overwrite, max(settings.workers, 2),
                         cfg.retry_failed, cfg.overlay, cfg.manifest.quality)
    for record in skipped:  # a verdict given again by the quality policy was rewritten by the plan
        if record is not resume.records.get(record.name):
            resume.wrote(record)
    mark("planned")
    runners: list = []
    if todo and not stop.is_set():
        # A Predictor's runners are on their device already; else `auto` is resolved here.
        chosen = resolve_device(str(cfg.runners[0].device) if cfg.runners else cfg.device, cfg.precision,
                                cfg.batch_size, cfg.workers, cfg.writers)
        device = chosen.device
        mark("device")
        settings.workers, settings.batch_size, settings.writers = chosen.workers, chosen.batch_size, chosen.writers
        settings.device = str(device)
        if cfg.runners:
            runners = list(cfg.runners)
        elif cfg.engine == "ray":  # the actors build the runners; the driver only verifies and plans
            from legitseg.engines.ray_data import driver_runners

            runners = driver_runners(cfg.models, device, cfg.precision, cfg.backend, cfg.env.build_settings())
        else:
            runners = build_runners(cfg.models, device, cfg.precision, cfg.backend, cfg.env.build_settings())
    if not lock.held:
        lock.acquire()
        # OUT did not exist when its records were read: another run may have written some since.
        resume.exact = lock.exclusive and not (cfg.out / RECORDS).exists()
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
    skipped_failed = sum(r.failed for r in skipped)
    adequate = sum(_adequate(r) for r in skipped)
    counts = {"processed": 0, "skipped": len(skipped), "failed": 0, "skipped_failed": skipped_failed}
    status = "failed"
    try:
        yield Planned(len(sources), len(todo), len(skipped), skipped_failed)
        selected = {s.name for s in cfg.models}
        for record in skipped:
            yield Skipped(record, record.rows(selected, run_id))
        if runners and not stop.is_set():
            yield Started(settings.device or "", {r.name: r.backend for r in runners})
            for outcome in _stream(cfg, runners, settings, todo, stop, run_id, resume):
                counts["processed" if outcome.ok else "failed"] += 1
                adequate += _adequate(outcome.record)
                yield outcome
        status = "interrupted" if stop.is_set() else "completed"
    finally:
        run_json = _finish(cfg, status, counts, settings, runners, started_at, run_id, found, resume)
    yield Finished(status, counts["processed"], counts["skipped"], counts["failed"], run_json, run_id,
                   skipped_failed, adequate if cfg.manifest.quality is not None else None)


def _adequate(record: ImageRecord) -> bool:
    return not record.failed and record.quality is not None and record.quality.get("adequate") is True


def _stream(cfg: RunConfig, runners: list, settings: _Settings, todo: list[Source],
            stop: threading.Event, run_id: str, resume: Resume) -> Iterator[ImageOutcome]:
    from legitseg.inference.torch_runner import tf32_switch
    from legitseg.output.overlay import Style
    from legitseg.output.records import ModelInfo
    from legitseg.output.writers import Sink

    infos = [ModelInfo.of(r) for r in runners]
    writers = settings.writers or 2
    options = dict(batch_size=settings.batch_size or 1, workers=settings.workers, post_threads=writers,
                   save_probabilities=cfg.save_probabilities, max_pixels=cfg.max_pixels, stop=stop)
    if cfg.engine == "ray":
        from legitseg.engines.ray_data import RayEngine

        engine = RayEngine(runners, address=cfg.address, precision=cfg.precision,
                           settings=cfg.env.build_settings(), **options)
    else:
        from legitseg.engines.local import Engine

        engine = Engine(runners, keep_rgb=cfg.overlay, quality=cfg.manifest.quality, gpu_decode=cfg.env.gpu_decode,
                        profile=cfg.env.profile, quiet_torch=True, **options)
    settings.jpeg_decoder = "nvjpeg" if getattr(engine, "device_decode", False) else "opencv"
    # The writers' queue is as deep as the engine's (on the GPU: two batches, which arrive whole).
    sink = Sink(cfg.out, infos, run_id, writers, depth=getattr(engine, "depth", None),
                overlays={s.name: Style.of(s) for s in cfg.models} if cfg.overlay else None, resume=resume)
    from legitseg.provenance import math_mode as effective_math

    with tf32_switch(cfg.precision):
        settings.math = effective_math(settings.device or "cpu", cfg.precision)
        yield from sink.consume(engine.process(todo))


def _finish(cfg: RunConfig, status: str, counts: dict[str, int], settings: _Settings,
            runners: list, started_at: float, run_id: str, found: Discovery, resume: Resume) -> Path:
    """Write scores.* from OUT's records as read at the start plus those this run wrote (from
    disk again where other processes may have written: shards), this run's file under runs/
    and run.json (also after a failure, when possible)."""
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
        if resume.exact:
            with summary_lock(cfg.out):  # uncontended here; taken so that every writer of scores.* takes it
                write_summaries(cfg.out, resume.in_order(), run_id)
            unreadable = resume.unreadable_paths()
        else:
            unreadable = rebuild_summaries(cfg.out, run_id).unreadable
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
            "counts": {**counts, "unreadable_records": len(unreadable)},
            "unreadable_records": unreadable[:MAX_LISTED],
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


def build_runners(specs: list[ModelSpec], device, precision: str, backend: str | None,
                  settings: Any = None) -> list:
    """Load (sha256-checked) and build one runner per model (`settings`: registry.BuildSettings,
    from the run's Environment). Raises WeightsError/ManifestError (exit 3)."""
    from legitseg.inference.registry import BuildSettings, build_runner
    from legitseg.models.factory import load_model

    settings = settings or BuildSettings()
    runners = []
    for spec in specs:
        loaded = load_model(spec)
        mark(f"built {spec.name}")
        runners.append(build_runner(loaded, device, precision, backend, settings))
        mark(f"ready {spec.name}")
        log.info("built %s (%s, %.2fs)", spec.name, spec.arch or spec.encoder, loaded.build_seconds)
    return runners
