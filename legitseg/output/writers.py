"""Everything legitseg writes under OUT (SPEC section 5): the file layout and the Sink.

Every file is written under a temporary name in its own folder, flushed to disk
and renamed into place (`fsio.atomic_write`), so a reader (or a run after a
SIGKILL) never sees a partial file under a final name. The per-image record is
written last: it is the unit of completion.

The Sink turns the engine's `ImageResult`s into files and records; it knows
nothing of torch or of how results were computed, so every engine (local
threads, a cluster) writes through it.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from legitseg._version import __version__
from legitseg.errors import RuntimeFailure
from legitseg.fsio import atomic_write, dumps
from legitseg.output.lock import summary_lock
from legitseg.output.overlay import Style, encode_jpeg, segmentation_overlay, severity_overlay
from legitseg.output.records import (
    CSV_FIELDS,
    FORMAT_VERSION,
    QUALITY_FIELDS,
    ImageRecord,
    ImageResult,
    ModelEntry,
    ModelOutput,
    RecordError,
    SegmentationResult,
    SeverityResult,
)

log = logging.getLogger(__name__)
RECORDS = "records"
MASKS = "masks"
PROBABILITIES = "probabilities"
OVERLAYS = "overlays"
RUNS = "runs"  # OUT/runs/<run_id>.json: one per run, never overwritten


# -- layout -------------------------------------------------------------------------------
def mask_path(name: str, model: str) -> str:
    return f"{MASKS}/{model}/{name}.png"


def probability_path(name: str, model: str) -> str:
    return f"{PROBABILITIES}/{model}/{name}.npz"


def overlay_path(name: str, model: str) -> str:
    return f"{OVERLAYS}/{model}/{name}.jpg"


def record_path(out: Path, name: str) -> Path:
    return out / RECORDS / f"{name}.json"


# No PNG row filter: masks are label maps, where OpenCV's default (SUB) predicts nothing. Measured
# on 4000x3000 masks: 36 instead of 48 ms and 20% smaller files, same pixels (docs/benchmarks.md).
PNG_PARAMS = [cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_NONE]


def encode_png(mask: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", mask, PNG_PARAMS)
    if not ok:
        raise RuntimeFailure(f"OpenCV could not encode a {mask.dtype} mask of shape {mask.shape} as PNG")
    return buf.tobytes()


def encode_npz(probabilities: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, probabilities=probabilities.astype(np.float16, copy=False))
    return buf.getvalue()


# -- records ------------------------------------------------------------------------------
def write_record(out: Path, record: ImageRecord) -> None:
    atomic_write(record_path(out, record.name), record.to_bytes())


def read_record(out: Path, name: str) -> ImageRecord | None:
    """The record of an earlier run, or None when there is none or it cannot be parsed (logged)."""
    path = record_path(out, name)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        log.warning("cannot read record %s (%s); the image is processed again", path, err)
        return None
    try:
        return ImageRecord.from_json(json.loads(text))
    except (ValueError, RecordError) as err:
        log.warning("record %s is not valid (%s); the image is processed again", path, err)
        return None


@dataclass
class RecordScan:
    """All records under OUT, and the files under records/ that are not valid records."""

    records: list[ImageRecord] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)


def scan_records(out: Path) -> RecordScan:
    scan = RecordScan()
    root = out / RECORDS
    if not root.is_dir():
        return scan
    for p in sorted(p for p in root.rglob("*.json") if p.is_file()):
        try:
            scan.records.append(ImageRecord.from_json(json.loads(p.read_text(encoding="utf-8"))))
        except (OSError, ValueError, RecordError) as err:
            # Only complete records are renamed into place; anything else is foreign or damaged.
            log.warning("skipping %s in the summaries: not a valid record (%s)", p, err)
            scan.unreadable.append(str(p.relative_to(out)))
    return scan


def rebuild_summaries(out: Path, current_run: str | None = None) -> RecordScan:
    """Rewrite scores.jsonl and scores.csv from all records (never duplicated).

    Rows written by `current_run` say `computed: true`. Rebuilds by processes sharing OUT
    (shards) take turns (`lock.summary_lock`), so the last one reads every record."""
    with summary_lock(out):
        return _rebuild_summaries(out, current_run)


def _rebuild_summaries(out: Path, current_run: str | None) -> RecordScan:
    jsonl = io.StringIO()
    table = io.StringIO()
    scan = scan_records(out)
    # Quality columns only where a `quality:` policy ran, so scores.csv without one stays as it was.
    fields = CSV_FIELDS + QUALITY_FIELDS if any(r.quality is not None for r in scan.records) else CSV_FIELDS
    writer = csv.DictWriter(table, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for record in scan.records:
        for row in record.rows(current_run=current_run):
            jsonl.write(dumps(row, ensure_ascii=False) + "\n")
            writer.writerow({k: dumps(v) if isinstance(v, dict | list) else v for k, v in row.items()})
    atomic_write(out / "scores.jsonl", jsonl.getvalue().encode("utf-8", "backslashreplace"))
    atomic_write(out / "scores.csv", table.getvalue().encode("utf-8", "backslashreplace"))
    return scan


# -- the sink -----------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelInfo:
    """What the sink records about a model besides its results."""

    name: str
    task: str
    weights_sha256: str
    settings: str  # records.settings_digest
    backend: str | None = None
    parity: float | None = None


@dataclass
class ImageOutcome:
    """What became of one image: its record as written, and its rows for this run's models."""

    record: ImageRecord
    rows: list[dict[str, Any]]

    @property
    def ok(self) -> bool:
        """Nothing failed (an image the quality policy skipped counts as done, not failed)."""
        return not self.record.failed


class Sink:
    """Writes ImageResults under OUT: masks, probability maps, then the record (merged with
    the previous record of the same image bytes)."""

    def __init__(self, out: Path, models: list[ModelInfo], run_id: str, writers: int = 2,
                 overlays: dict[str, Style] | None = None, depth: int | None = None):
        self.out = out
        self.models = {m.name: m for m in models}
        self.run_id = run_id
        self.writers = max(1, writers)
        self.depth = depth or 2 * self.writers  # results queued for the writers at most
        self.overlays = overlays  # model -> Style: write overlays (needs ImageResult.rgb)

    def _drop_overlay(self, model: str, name: str) -> None:
        """Remove an overlay left by an earlier result of this name: the new entry names none."""
        if not (self.out / OVERLAYS).is_dir():
            return
        path = self.out / overlay_path(name, model)
        try:
            path.unlink(missing_ok=True)
        except OSError as err:
            raise RuntimeFailure(f"cannot remove the stale overlay {path}: {err.strerror or err}") from err

    def _overlay(self, entry: ModelEntry, model: str, name: str, value, rgb) -> None:
        """Write the overlay of one ok result (with overlays on), else drop a stale one."""
        path = overlay_path(name, model)
        style = self.overlays.get(model) if self.overlays else None
        if style is None or rgb is None:
            self._drop_overlay(model, name)
            return
        try:
            if isinstance(value, SeverityResult):
                drawn = severity_overlay(rgb, style, value.grade, value.score)
            else:
                drawn = segmentation_overlay(rgb, value.mask, style)
                entry.overlay_colors = style.hex_colours()
            data = encode_jpeg(drawn)
        except (ValueError, cv2.error) as err:
            raise RuntimeFailure(f"{model}: cannot draw the overlay of {name}: {err}") from err
        atomic_write(self.out / path, data)
        entry.overlay = path

    def _entry(self, info: ModelInfo, output: ModelOutput, name: str, rgb=None) -> ModelEntry:
        base = dict(task=info.task, weights_sha256=info.weights_sha256, settings=info.settings, run_id=self.run_id)
        if output.error_kind == "inadequate":  # the quality policy skipped the models: not a failure
            self._drop_overlay(info.name, name)
            return ModelEntry(**base, status="inadequate", error=output.error)
        if output.error is not None or output.result is None:
            self._drop_overlay(info.name, name)
            return ModelEntry(**base, status="failed", error=output.error or "no result",
                              error_kind=output.error_kind)
        entry = ModelEntry(**base, status="ok", backend=info.backend, parity=info.parity)
        value = output.result
        if isinstance(value, SeverityResult):
            entry.score, entry.grade, entry.probabilities = value.score, value.grade, value.probabilities
            self._overlay(entry, info.name, name, value, rgb)
            return entry
        assert isinstance(value, SegmentationResult)
        entry.mask = mask_path(name, info.name)
        atomic_write(self.out / entry.mask, encode_png(value.mask))
        if value.probabilities is not None:
            entry.probability_map = probability_path(name, info.name)
            atomic_write(self.out / entry.probability_map, encode_npz(value.probabilities))
        entry.area_fraction, entry.components = value.area_fraction, value.components
        self._overlay(entry, info.name, name, value, rgb)
        return entry

    def write(self, result: ImageResult) -> ImageOutcome:
        """Write one image's files and its record. Raises RuntimeFailure when OUT is not writable."""
        entries = {name: self._entry(self.models[name], out, result.name, result.rgb)
                   for name, out in result.outputs.items()}
        models: dict[str, ModelEntry] = {}
        previous = read_record(self.out, result.name)
        if previous and previous.sha256 == result.sha256:
            # Results of models not selected in this run stay valid for the same image bytes,
            # and stay credited to their run: an entry of an older record, which names none,
            # gets the run that had last written the record, before this run replaces that.
            for k, v in previous.models.items():
                if k not in entries:
                    v.run_id = previous.producer(k)
                    models[k] = v
        models.update(entries)
        failed = [f"{m}: {e.error}" for m, e in entries.items() if not e.ok and e.status != "inadequate"]
        # Skipped by the quality policy: every model but a task: quality model that judged it was not run.
        skipped = any(e.status == "inadequate" for e in entries.values())
        record = ImageRecord(
            image=result.image, name=result.name, sha256=result.sha256,
            size=list(result.size) if result.size else None,
            status="failed" if failed else "inadequate" if skipped else "ok",
            error=result.error or ("; ".join(failed) if failed else None),
            models=models, legitseg=__version__, run_id=self.run_id,
            written_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            source=result.source, format=FORMAT_VERSION,
            quality=result.quality.to_json() if result.quality is not None else None,
        )
        write_record(self.out, record)
        return ImageOutcome(record, record.rows(set(self.models), self.run_id))

    def consume(self, results: Iterable[ImageResult]) -> Iterator[ImageOutcome]:
        """Write results in a small thread pool; yield outcomes in input order.

        At most `depth` (default 2 x writers) images wait to be written, whatever the number of inputs.
        """
        pool = ThreadPoolExecutor(self.writers, thread_name_prefix="legitseg-write")
        queued: deque[Future] = deque()
        try:
            for result in results:
                queued.append(pool.submit(self.write, result))
                while len(queued) > self.depth:
                    yield queued.popleft().result()
            while queued:
                yield queued.popleft().result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
