"""The streaming pipeline: decode workers -> batches -> forward passes -> writers.

Three stages overlap, each bounded so memory does not grow with the number of
images: a decode pool with a fixed window of images in flight, the forward
passes on the calling thread, and a small writer pool with a fixed number of
queued images. One decode serves every selected model (SPEC 4.5).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import torch

from legitseg import __version__
from legitseg.errors import ImageError, RuntimeFailure
from legitseg.pipeline import postprocess
from legitseg.pipeline.decode import DecodedImage, load_image
from legitseg.pipeline.infer import TorchRunner
from legitseg.pipeline.sources import Source
from legitseg.writers import (
    ImageOutcome,
    atomic_write,
    encode_npz,
    encode_png,
    mask_path,
    probability_path,
    read_record,
    record_rows,
    write_record,
)

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    """Model outputs for one image, waiting for a writer. Values: logits (CPU path),
    finished results (GPU path), or an error message."""

    item: DecodedImage
    outputs: dict[str, Any] = field(default_factory=dict)


def _failed_entry(runner: TorchRunner, error: str) -> dict[str, Any]:
    return {"task": runner.loaded.spec.task, "weights_sha256": runner.loaded.spec.sha256,
            "status": "failed", "error": error}


class Engine:
    """Runs a list of Sources through the models and writes their outputs under `out`."""

    def __init__(self, runners: list[TorchRunner], out: Path, *, batch_size: int, workers: int,
                 writers: int, save_probabilities: bool, max_pixels: int,
                 stop: threading.Event, run_id: str):
        self.runners = runners
        self.out = out
        self.batch_size = max(1, batch_size)
        self.workers = workers
        self.writers = max(1, writers)
        self.save_probabilities = save_probabilities
        self.max_pixels = max_pixels
        self.stop = stop
        self.run_id = run_id
        self.preps = list(dict.fromkeys(r.prep for r in runners))
        device = runners[0].device
        # On the GPU postprocessing is cheap and runs on the calling thread; on the CPU it
        # is the costly part of an image, so it runs in the writer threads beside the next forward.
        self.post_on_device = device.type == "cuda"

    # -- stage 1: decode ---------------------------------------------------------------
    def _decode(self, source: Source) -> DecodedImage | ImageError:
        try:
            return load_image(source, self.preps, self.max_pixels)
        except ImageError as err:
            return err
        except Exception as err:  # noqa: BLE001 - one image must never stop the run
            # Anything a decoder library raises for odd data is this image's failure, recorded as such.
            log.debug("unexpected error decoding %s", source.path, exc_info=True)
            return ImageError(f"could not decode: {type(err).__name__}: {err}")

    def _decoded(self, sources: list[Source]) -> Iterator[tuple[Source, DecodedImage | ImageError]]:
        """Decoded images in input order, at most `window` in flight."""
        if self.workers == 0:
            for s in sources:
                if self.stop.is_set():
                    return
                yield s, self._decode(s)
            return
        window = max(2 * self.workers, self.batch_size + self.workers)
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="legitseg-decode")
        queue: deque[tuple[Source, Future]] = deque()
        it = iter(sources)
        try:
            while True:
                while len(queue) < window and not self.stop.is_set():
                    s = next(it, None)
                    if s is None:
                        break
                    queue.append((s, pool.submit(self._decode, s)))
                if not queue or self.stop.is_set():
                    return
                s, fut = queue.popleft()
                yield s, fut.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    # -- stage 2: forward ----------------------------------------------------------------
    def _forward(self, runner: TorchRunner, items: list[DecodedImage]) -> list[Any]:
        """Per item: logits on the device, or an error message. Same-shape inputs share a batch."""
        groups: dict[tuple, list[int]] = {}
        for i, it in enumerate(items):
            groups.setdefault(it.inputs[runner.prep].shape, []).append(i)
        out: list[Any] = [None] * len(items)
        for idx in groups.values():
            try:
                logits = runner.logits([items[i].inputs[runner.prep] for i in idx])
                for j, i in enumerate(idx):
                    out[i] = logits[j]
            except torch.OutOfMemoryError:
                log.warning("%s: out of memory on a batch of %d; retrying image by image", runner.name, len(idx))
                if runner.device.type == "cuda":
                    torch.cuda.empty_cache()
                for i in idx:
                    try:
                        out[i] = runner.logits([items[i].inputs[runner.prep]])[0]
                    except torch.OutOfMemoryError:
                        if runner.device.type == "cuda":
                            torch.cuda.empty_cache()
                        out[i] = f"out of memory on {runner.device} even as a batch of one"
        return out

    def _postprocess(self, runner: TorchRunner, value: Any, item: DecodedImage) -> Any:
        if isinstance(value, str):
            return value
        spec = runner.loaded.spec
        if spec.task == "severity":
            return postprocess.severity(value, spec)
        return postprocess.segmentation(value, item.size, spec, self.save_probabilities)

    def _run_batch(self, items: list[DecodedImage]) -> list[_Pending]:
        pending = [_Pending(it) for it in items]
        for runner in self.runners:
            try:
                results = self._forward(runner, items)
            except RuntimeError as err:
                raise RuntimeFailure(f"{runner.name}: forward pass failed on {runner.device}: {err}") from err
            for p, value in zip(pending, results, strict=True):
                if self.post_on_device or runner.loaded.spec.task == "severity":
                    value = self._postprocess(runner, value, p.item)
                elif not isinstance(value, str):
                    value = value.cpu()
                p.outputs[runner.name] = value
        return pending

    # -- stage 3: write ------------------------------------------------------------------
    def _entry(self, runner: TorchRunner, value: Any, item: DecodedImage) -> dict[str, Any]:
        if isinstance(value, torch.Tensor):
            value = self._postprocess(runner, value, item)
        if isinstance(value, str):
            return _failed_entry(runner, value)
        spec = runner.loaded.spec
        entry: dict[str, Any] = {"task": spec.task, "weights_sha256": spec.sha256, "status": "ok",
                                 "backend": runner.backend, "parity": runner.parity}
        if isinstance(value, postprocess.SeverityResult):
            entry.update(score=value.score, grade=value.grade, probabilities=value.probabilities)
            return entry
        name = item.source.name
        rel = mask_path(name, spec.name)
        atomic_write(self.out / rel, encode_png(value.mask))
        entry["mask"] = rel
        if value.probabilities is not None:
            prel = probability_path(name, spec.name)
            atomic_write(self.out / prel, encode_npz(value.probabilities))
            entry["probability_map"] = prel
        entry.update(area_fraction=value.area_fraction, components=value.components)
        return entry

    def _record(self, source: Source, sha256: str | None, size, entries: dict[str, Any],
                error: str | None) -> ImageOutcome:
        models: dict[str, Any] = {}
        previous = read_record(self.out, source.name)
        if previous and previous.get("sha256") == sha256:
            # Results of models not selected in this run stay valid for the same image bytes.
            models.update({k: v for k, v in previous.get("models", {}).items() if k not in entries})
        models.update(entries)
        failed = [f"{m}: {e['error']}" for m, e in entries.items() if e["status"] != "ok"]
        record = {
            "image": str(source.path),
            "name": source.name,
            "sha256": sha256,
            "size": list(size) if size else None,
            "status": "failed" if failed else "ok",
            "error": error or ("; ".join(failed) if failed else None),
            "models": models,
            "legitseg": __version__,
            "run_id": self.run_id,
            "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_record(self.out, source.name, record)
        selected = {r.name for r in self.runners}
        rows = [r for r in record_rows(record) if r["model"] in selected]
        return ImageOutcome(source, record, rows)

    def _write_image(self, p: _Pending) -> ImageOutcome:
        entries = {}
        for runner in self.runners:
            try:
                entries[runner.name] = self._entry(runner, p.outputs[runner.name], p.item)
            except (ValueError, cv2.error) as err:
                entries[runner.name] = _failed_entry(runner, f"postprocessing failed: {err}")
        return self._record(p.item.source, p.item.sha256, p.item.size, entries, None)

    def _write_failed(self, source: Source, err: ImageError) -> ImageOutcome:
        message = str(err)
        entries = {r.name: _failed_entry(r, message) for r in self.runners}
        return self._record(source, getattr(err, "sha256", None), None, entries, message)

    # -- the whole stream ----------------------------------------------------------------
    def process(self, sources: list[Source]) -> Iterator[ImageOutcome]:
        """Yield one ImageOutcome per source, in input order, until done or `stop` is set.

        Raises RuntimeFailure when the device or the output folder fails.
        """
        pool = ThreadPoolExecutor(self.writers, thread_name_prefix="legitseg-write")
        queued: deque[Future] = deque()
        max_queued = 2 * self.writers
        batch: list[DecodedImage] = []

        def drain(limit: int) -> Iterator[ImageOutcome]:
            while len(queued) > limit:
                yield queued.popleft().result()

        def flush() -> Iterator[ImageOutcome]:
            for p in self._run_batch(batch):
                queued.append(pool.submit(self._write_image, p))
                yield from drain(max_queued)
            batch.clear()

        try:
            for source, decoded in self._decoded(sources):
                if isinstance(decoded, ImageError):
                    queued.append(pool.submit(self._write_failed, source, decoded))
                    yield from drain(max_queued)
                    continue
                batch.append(decoded)
                if len(batch) >= self.batch_size:
                    yield from flush()
                if self.stop.is_set():
                    break
            if batch and not self.stop.is_set():
                yield from flush()
            yield from drain(0)
        finally:
            batch.clear()
            pool.shutdown(wait=True, cancel_futures=True)

