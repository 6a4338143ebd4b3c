"""Everything legitseg writes under OUT (SPEC section 5): the file layout and the Sink.

Every file is written under a temporary name in its own folder and renamed into place,
so a reader (or a run after a SIGKILL) never sees a partial file under a final name. The
Sink writes a group of images' files (masks, probability maps, overlays, records) under
temporary names, makes them durable with one flush (`fsio.Staging`), and only then
renames them, each image's record last: a record, the unit of completion, appears only
once the files it names are on disk.

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
from legitseg.fsio import Staging, atomic_write, dumps
from legitseg.output.lock import summary_lock
from legitseg.output.overlay import Style, encode_jpeg, segmentation_overlay, severity_overlay
from legitseg.output.records import (  # noqa: F401 - ModelInfo is imported from here too
    CSV_FIELDS,
    FORMAT_VERSION,
    QUALITY_FIELDS,
    UNCERTAINTY_FIELDS,
    ImageRecord,
    ImageResult,
    ModelEntry,
    ModelInfo,
    ModelOutput,
    RecordError,
    SeverityResult,
)
from legitseg.output.resume import RECORDS, Resume

log = logging.getLogger(__name__)
MASKS = "masks"
PROBABILITIES = "probabilities"
OVERLAYS = "overlays"
RUNS = "runs"  # OUT/runs/<run_id>.json: one per run, never overwritten


def read_run_files(out: Path) -> tuple[list[tuple[Path, dict[str, Any]]], list[Path]]:
    """Every run file under OUT/runs/ as (path, its JSON object), by name, and the paths of
    those that cannot be read or are not a JSON object (each logged once)."""
    runs, unreadable = [], []
    folder = out / RUNS
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as err:
            log.warning("skipping run file %s: %s", path, err)
            unreadable.append(path)
            continue
        runs.append((path, data))
    return runs, unreadable


def run_folder_holding(out: Path, dest: Path) -> Path | None:
    """The folder of OUT that a run owns (records, masks, probabilities, overlays) which is or
    holds `dest`, else None: what another command may not write into."""
    target = dest.resolve()
    for part in (RECORDS, MASKS, PROBABILITIES, OVERLAYS):
        inner = (out / part).resolve()
        if target == inner or inner in target.parents:
            return out / part
    return None


# -- layout -------------------------------------------------------------------------------
def mask_path(name: str, model: str) -> str:
    return f"{MASKS}/{model}/{name}.png"


def probability_path(name: str, model: str) -> str:
    return f"{PROBABILITIES}/{model}/{name}.npz"


def overlay_path(name: str, model: str) -> str:
    return f"{OVERLAYS}/{model}/{name}.jpg"


def record_path(out: Path, name: str) -> Path:
    return out / RECORDS / f"{name}.json"


# No PNG row filter: masks are label maps, where OpenCV's default (SUB) predicts nothing, so
# encoding is faster and files smaller, with the same pixels (measured: docs/benchmarks.md, "PNG encode").
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
    resume = Resume.read(out, exact=False)
    return RecordScan(resume.in_order(), resume.unreadable_paths())


def rebuild_summaries(out: Path, current_run: str | None = None) -> RecordScan:
    """Rewrite scores.jsonl and scores.csv from all records (never duplicated).

    Rows written by `current_run` say `computed: true`. Rebuilds by processes sharing OUT
    (shards) take turns (`lock.summary_lock`), so the last one reads every record."""
    with summary_lock(out):
        scan = scan_records(out)
        write_summaries(out, scan.records, current_run)
        return scan


def write_summaries(out: Path, records: Iterable[ImageRecord], current_run: str | None) -> None:
    """Write scores.jsonl and scores.csv: the rows of `records`, in order."""
    jsonl = io.StringIO()
    table = io.StringIO()
    records = list(records)
    rows = [row for record in records for row in record.rows(current_run=current_run)]
    # Quality and uncertainty columns only where a policy or the option ran, so scores.csv
    # without them stays as it was (docs/quality.md, docs/uncertainty.md).
    extra = QUALITY_FIELDS if any(r.quality is not None for r in records) else ()
    extra += tuple(k for k in UNCERTAINTY_FIELDS if any(k in row for row in rows))
    writer = csv.DictWriter(table, fieldnames=CSV_FIELDS + extra, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        jsonl.write(dumps(row, ensure_ascii=False) + "\n")
        writer.writerow({k: dumps(v) if isinstance(v, dict | list) else v for k, v in row.items()})
    atomic_write(out / "scores.jsonl", jsonl.getvalue().encode("utf-8", "backslashreplace"))
    atomic_write(out / "scores.csv", table.getvalue().encode("utf-8", "backslashreplace"))


# -- the sink -----------------------------------------------------------------------------
@dataclass
class ImageOutcome:
    """What became of one image: its record as written, and its rows for this run's models."""

    record: ImageRecord
    rows: list[dict[str, Any]]

    @property
    def ok(self) -> bool:
        """Nothing failed (an image the quality policy skipped counts as done, not failed)."""
        return not self.record.failed


# Entry field -> (where its file goes, how its array is encoded): the files a result names.
FILES = {"mask": (mask_path, encode_png), "probability_map": (probability_path, encode_npz)}
# A finished image waits at most this long for its group's flush when results come slowly.
LINGER_S = 1.0


@dataclass
class _Staged:
    """One image written under temporary names: its files, its record last."""

    files: list[tuple[Path, Path]]
    record: ImageRecord


class Sink:
    """Writes ImageResults under OUT: masks, probability maps, overlays, then the record (merged
    with the previous record of the same image bytes, taken from `resume`, never re-read).

    Images are written in groups: every finished image at the head of the queue when more
    than `depth` wait (or when results come slowly, after LINGER_S) is flushed to disk with
    one call and then renamed into place, each record after its files (`fsio.Staging`).
    """

    def __init__(self, out: Path, models: list[ModelInfo], run_id: str, writers: int = 2,
                 overlays: dict[str, Style] | None = None, depth: int | None = None,
                 resume: Resume | None = None):
        self.out = out
        self.models = {m.name: m for m in models}
        self.run_id = run_id
        self.writers = max(1, writers)
        self.depth = depth or 2 * self.writers  # results queued for the writers at most
        self.overlays = overlays  # model -> Style: write overlays (needs ImageResult.rgb)
        self.resume = resume if resume is not None else Resume.read(out, exact=False)
        self.staging = Staging()

    def _drop_overlay(self, model: str, name: str) -> None:
        """Remove an overlay left by an earlier result of this name: the new entry names none."""
        if not (self.out / OVERLAYS).is_dir():
            return
        path = self.out / overlay_path(name, model)
        try:
            path.unlink(missing_ok=True)
        except OSError as err:
            raise RuntimeFailure(f"cannot remove the stale overlay {path}: {err.strerror or err}") from err

    def _overlay(self, entry: ModelEntry, model: str, name: str, value, rgb, files: list) -> None:
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
        files.append(self.staging.stage(self.out / path, data))
        entry.overlay = path

    def _entry(self, info: ModelInfo, output: ModelOutput, name: str, rgb, files: list) -> ModelEntry:
        # The entry reads the result's values: a segmentation's regions are counted here, in this
        # writer thread, right before its mask is encoded as PNG (SegmentationResult.components).
        # Counting that fails fails this image's entry, as postprocessing did before it moved here.
        try:
            entry = info.entry(output, self.run_id)
        except (ValueError, cv2.error) as err:
            entry = info.entry(ModelOutput.failed(f"postprocessing failed: {err}", "postprocess"), self.run_id)
        if not entry.ok:
            self._drop_overlay(info.name, name)
            return entry
        assert output.result is not None
        for key, array in output.result.files().items():
            where, encode = FILES[key]
            path = where(name, info.name)
            files.append(self.staging.stage(self.out / path, encode(array)))
            setattr(entry, key, path)
        self._overlay(entry, info.name, name, output.result, rgb, files)
        return entry

    def _stage(self, result: ImageResult) -> _Staged:
        """Write one image's files and record under temporary names (not yet durable).
        Raises RuntimeFailure when OUT is not writable (what it staged is removed)."""
        files: list[tuple[Path, Path]] = []
        try:
            entries = {name: self._entry(self.models[name], out, result.name, result.rgb, files)
                       for name, out in result.outputs.items()}
            models: dict[str, ModelEntry] = {}
            previous = self.resume.get(result.name)
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
            files.append(self.staging.stage(record_path(self.out, record.name), record.to_bytes()))
        except BaseException:
            self.staging.discard(files)
            raise
        return _Staged(files, record)

    def _commit(self, group: list[_Staged]) -> list[ImageOutcome]:
        """One flush for the group's files, then each image's files and record renamed into place."""
        renamed = 0
        try:
            self.staging.flush([f for staged in group for f in staged.files])
            for staged in group:
                self.staging.rename(staged.files)
                self.resume.wrote(staged.record)
                renamed += 1
        except BaseException:
            for staged in group[renamed:]:
                self.staging.discard(staged.files)
            raise
        selected = set(self.models)
        return [ImageOutcome(s.record, s.record.rows(selected, self.run_id)) for s in group]

    def write(self, result: ImageResult) -> ImageOutcome:
        """Write one image's files and its record. Raises RuntimeFailure when OUT is not writable."""
        try:
            return self._commit([self._stage(result)])[0]
        finally:
            self.staging.close()

    @staticmethod
    def _take(queued: deque[Future]) -> list[_Staged]:
        """The oldest image (waited for) and every image after it already staged without error."""
        group = [queued.popleft().result()]
        while queued and queued[0].done() and queued[0].exception() is None:
            group.append(queued.popleft().result())
        return group

    def consume(self, results: Iterable[ImageResult]) -> Iterator[ImageOutcome]:
        """Write results in a small thread pool; yield outcomes in input order.

        At most `depth` (default 2 x writers) images wait to be written, whatever the number of
        inputs. Images not yet renamed into place when this stops early (an error, the caller
        closing the generator) are removed: they have no record, so a later run redoes them.
        """
        pool = ThreadPoolExecutor(self.writers, thread_name_prefix="legitseg-write")
        queued: deque[Future] = deque()
        last = time.monotonic()
        try:
            for result in results:
                queued.append(pool.submit(self._stage, result))
                if len(queued) > self.depth or (queued[0].done() and time.monotonic() - last >= LINGER_S):
                    outcomes = self._commit(self._take(queued))
                    last = time.monotonic()
                    yield from outcomes
            while queued:
                yield from self._commit(self._take(queued))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            for future in queued:
                if future.done() and not future.cancelled() and future.exception() is None:
                    self.staging.discard(future.result().files)
            self.staging.close()
