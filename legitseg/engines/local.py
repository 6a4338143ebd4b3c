"""The local engine: decode workers -> batches -> forward passes -> postprocessing.

Yields one `ImageResult` per source, in input order; what becomes of it (files,
records) is a sink's business. Three stages overlap, each bounded so memory does
not grow with the number of images: a decode pool with a fixed window of images
in flight, the forward passes on the calling thread, and a small postprocessing
pool with a fixed number of queued images. One decode serves every selected
model (SPEC 4.5).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import cv2
import torch

from legitseg.engines.profile import Profile
from legitseg.engines.transfer import Pending, Transfer
from legitseg.errors import ImageError, RuntimeFailure
from legitseg.images import device_decode as device_decode_module
from legitseg.images.decode import load_image
from legitseg.images.decoded import DecodedImage, Prep
from legitseg.images.device_memory import free_memory, out_of_memory
from legitseg.images.naming import source_key
from legitseg.images.pixels import PixelSource
from legitseg.images.sources import Source
from legitseg.inference import postprocess
from legitseg.inference.quality_gate import quality_gate, spared
from legitseg.inference.runners import Runner
from legitseg.output.records import ImageResult, ModelOutput

log = logging.getLogger(__name__)
# The decoded photograph as it is: `pad` at 3 channels returns the oriented RGB uncopied.
PHOTO = Prep("pad", None, "linear", 3)


@dataclass
class Deferred:
    """A result computed on the device whose arrays arrive with the batch's one copy to the host."""

    mask: int  # index in the batch's Transfer (segmentation: the mask; severity: the probabilities)
    probabilities: int | None = None
    pending: Pending | None = None  # set once the batch's transfer is launched


class Engine(device_decode_module.DeviceInputs):
    """Runs Sources through the models; `process` yields ImageResults."""

    def __init__(self, runners: list[Runner], *, batch_size: int, workers: int, post_threads: int,
                 save_probabilities: bool, max_pixels: int, stop: threading.Event, keep_rgb: bool = False,
                 batched_post: bool | None = None, device_decode: bool | None = None, quality=None):
        self.runners = runners
        # The `quality:` policy (manifest.quality.QualityPolicy): measured on the decoded photograph
        # in the decode worker (images/quality.py), so the photograph must be on the host.
        self.quality = quality
        self.measure_only = quality is not None and not keep_rgb  # PHOTO is dropped once measured
        self.batch_size = max(1, batch_size)
        self.workers = workers
        self.post_threads = max(1, post_threads)
        self.save_probabilities = save_probabilities
        self.max_pixels = max_pixels
        self.stop = stop
        self.preps = list(dict.fromkeys([r.prep for r in runners] + ([PHOTO] if keep_rgb or quality else [])))
        self.measure_only = self.measure_only and PHOTO not in [r.prep for r in runners]
        self.keep_rgb = keep_rgb  # ImageResult.rgb carries the photograph (for overlays)
        # Largest batch known to fit, per model, once a batch ran out of memory.
        self.batch_limit: dict[str, int] = {}
        # On the GPU the resize to the original size, threshold and activation run on the device
        # right after the forward pass, and a batch's masks come back in one copy that the
        # postprocessing pool waits for (docs/architecture.md). On the CPU postprocessing is the
        # costly part of an image and runs in the pool beside the next forward. `batched_post`
        # forces the GPU's way on the CPU (tests).
        device = runners[0].device
        self.batched_post = device.type == "cuda" if batched_post is None else batched_post
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        # Images between the forward pass and the sink: two batches on the GPU, so that the next
        # batch is launched while the last one's results are copied, counted and written.
        self.depth = 2 * max(self.post_threads, self.batch_size if self.batched_post else 0)
        # JPEGs decoded on the GPU in batches, when every model takes a plain input the device can
        # make (images/device_decode.py); `device_decode=True` forces it on the CPU (tests).
        if device_decode is None:
            from legitseg.inference.torch_runner import TorchRunner

            device_decode = (device.type == "cuda" and not keep_rgb and quality is None and device_decode_module.enabled()
                             and device_decode_module.supports(self.preps)
                             and all(type(r) is TorchRunner for r in runners))
        self.device_decode = device_decode  # decode workers leave these JPEGs encoded
        self.device_inputs = device_decode  # model inputs are device tensors (for the whole run)
        self.upload_limit: int | None = None  # images moved to the device at once, after an out of memory
        self._pool: ThreadPoolExecutor | None = None  # the decode pool, while `_decoded` runs

    # -- stage 1: decode ---------------------------------------------------------------
    def _decode(self, source: Source) -> DecodedImage | ImageError:
        try:
            if isinstance(source, PixelSource):  # pixels given in memory (the Python API)
                item = source.load(self.preps, self.max_pixels)
            else:
                item = load_image(source, self.preps, self.max_pixels, defer_jpeg=self.device_decode)
            if self.quality is not None:
                from legitseg.images.quality import assess

                item.quality = assess(item.inputs[PHOTO], self.quality)
                if self.measure_only:
                    del item.inputs[PHOTO]
            return item
        except ImageError as err:
            return err
        except Exception as err:  # noqa: BLE001 - one image must never stop the run
            # Whatever a decoder library raises for odd data is this image's failure, recorded as such.
            log.debug("unexpected error decoding %s", source.path, exc_info=True)
            return ImageError(f"could not decode: {type(err).__name__}: {err}")

    def _decoded(self, sources: Iterable[Source]) -> Iterator[tuple[Source, DecodedImage | ImageError]]:
        """Decoded images in input order, at most `window` in flight."""
        if self.workers == 0:
            for s in sources:
                if self.stop.is_set():
                    return
                yield s, self._decode(s)
            return
        window = max(2 * self.workers, self.batch_size + self.workers)
        pool = self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="legitseg-decode")
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
            self._pool = None
            pool.shutdown(wait=True, cancel_futures=True)

    # -- stage 2: forward ----------------------------------------------------------------
    def _forward(self, runner: Runner, items: list[DecodedImage]) -> list[ModelOutput]:
        """Logits per item (on the device). Same-shape inputs share a batch.

        A batch that runs out of memory (`device_memory.out_of_memory`: torch's error, cuBLAS or
        cuDNN failing to allocate) is dropped entirely (no reference to it survives the
        retry) and the cache emptied; it is tried once more, then in halves; the size that
        fits is kept for the rest of the run. Only an image that does not fit alone fails.
        """
        groups: dict[tuple, list[int]] = {}
        # A runner that puts inputs on a canvas of its own (letterbox, tiles) batches any shapes.
        key = getattr(runner, "batch_key", None) or (lambda a: (type(a), tuple(a.shape)))
        for i, it in enumerate(items):
            groups.setdefault(key(it.inputs[runner.prep]), []).append(i)
        out: list[ModelOutput] = [ModelOutput()] * len(items)
        for idx in groups.values():
            pending, retried = list(idx), False
            while pending:
                size = min(len(pending), self.batch_limit.get(runner.name, len(pending)))
                chunk, oom = pending[:size], False
                try:
                    logits = runner.logits([items[i].inputs[runner.prep] for i in chunk])
                except Exception as err:
                    if out_of_memory(err):
                        oom = True  # handled outside the except block, once the traceback is released
                    elif isinstance(err, runner.image_errors):
                        for i in chunk:
                            out[i] = ModelOutput.failed(f"forward pass failed: {err}", "forward")
                        pending = pending[size:]
                        continue
                    else:
                        raise
                if not oom:
                    for j, i in enumerate(chunk):
                        out[i] = ModelOutput(logits=logits[j])
                    pending, retried = pending[size:], False
                    continue
                free_memory(runner.device)
                if not retried:
                    retried = True
                elif size == 1:
                    out[chunk[0]] = ModelOutput.failed(
                        f"out of memory on {runner.device} even as a batch of one", "oom")
                    pending, retried = pending[1:], False
                else:
                    self.batch_limit[runner.name], retried = size // 2, False
                    log.warning("%s: out of memory on a batch of %d; retrying with batches of %d",
                                runner.name, size, size // 2)
        return out

    def _on_device(self, runner: Runner, output: ModelOutput, item: DecodedImage, transfer: Transfer) -> ModelOutput:
        """Start one result's device half (resize, threshold, activation); its arrays join the batch's copy.

        Out of device memory here (twice, the cache emptied between), the logits go to the
        host and are postprocessed there.
        """
        spec, logits = runner.loaded.spec, output.logits
        for _ in (1, 2):
            oom = False
            try:
                if spec.task != "segmentation":
                    return ModelOutput(logits=Deferred(transfer.add(postprocess.severity_on_device(logits, spec))))
                mask, probs = postprocess.segmentation_on_device(logits, item.size, spec, self.save_probabilities)
                return ModelOutput(logits=Deferred(transfer.add(mask), None if probs is None else transfer.add(probs)))
            except ValueError as err:
                return ModelOutput.failed(f"postprocessing failed: {err}", "postprocess")
            except RuntimeError as err:
                if not out_of_memory(err):
                    raise
                oom = True  # handled once the traceback (and what it holds) is released
            assert oom
            free_memory(runner.device)
        log.warning("%s: out of memory postprocessing %s on %s; finishing it on the CPU",
                    runner.name, item.source.display, runner.device)
        return ModelOutput(logits=logits.cpu())

    def _postprocess(self, runner: Runner, output: ModelOutput, item: DecodedImage) -> ModelOutput:
        if output.logits is None:
            return output
        spec = runner.loaded.spec
        try:
            if isinstance(output.logits, Deferred):
                d = output.logits
                assert d.pending is not None
                if spec.task != "segmentation":
                    return ModelOutput(result=postprocess.finish_severity(d.pending.array(d.mask), spec))
                probs = None if d.probabilities is None else d.pending.array(d.probabilities)
                return ModelOutput(result=postprocess.finish_segmentation(d.pending.array(d.mask), probs,
                                                                          item.size, spec))
            if spec.task != "segmentation":
                return ModelOutput(result=postprocess.severity(output.logits, spec))
            return ModelOutput(result=postprocess.segmentation(output.logits, item.size, spec,
                                                               self.save_probabilities))
        except (ValueError, cv2.error) as err:
            return ModelOutput.failed(f"postprocessing failed: {err}", "postprocess")

    def _run_batch(self, items: list[DecodedImage]) -> list[dict[str, ModelOutput]]:
        """Forward passes of every model on a batch; on the GPU returns before the results are on the host."""
        outputs: list[dict[str, ModelOutput]] = [{} for _ in items]
        transfer = Transfer(self.runners[0].device, self.copy_stream) if self.batched_post else None
        todo = list(range(len(items)))  # images the next model runs on
        # A task: quality model runs first: its verdict may spare the others (docs/quality.md).
        for runner in sorted(self.runners, key=lambda r: r.loaded.spec.task != "quality"):
            gate = runner.loaded.spec.task == "quality"
            try:
                results = self._forward(runner, [items[i] for i in todo]) if todo else []
            except Exception as err:
                raise RuntimeFailure(f"{runner.name}: forward pass failed on {runner.device}: "
                                     f"{type(err).__name__}: {err}") from err
            for i, value in zip(todo, results, strict=True):
                item, per_image = items[i], outputs[i]
                if value.logits is not None:
                    if transfer is not None and not gate:  # the gate's score is needed on the host now
                        value = self._on_device(runner, value, item, transfer)
                    elif runner.loaded.spec.task != "segmentation":
                        value = self._postprocess(runner, value, item)
                    else:
                        value = ModelOutput(logits=value.logits.cpu())
                per_image[runner.name] = value
            if gate and self.quality is not None:
                todo = quality_gate(runner.name, self.quality, [items[i] for i in todo], todo, outputs)
        for item, per_image in zip(items, outputs, strict=True):  # models a quality model's verdict spared
            for runner in self.runners:
                if runner.name not in per_image:
                    per_image[runner.name] = spared(item)
        if transfer is not None:
            pending = transfer.launch()
            for per_image in outputs:
                for value in per_image.values():
                    if isinstance(value.logits, Deferred):
                        value.logits.pending = pending
        return outputs

    # -- stage 3: finish on the CPU --------------------------------------------------------
    def _finish(self, item: DecodedImage, outputs: dict[str, ModelOutput]) -> ImageResult:
        done = {r.name: self._postprocess(r, outputs[r.name], item) for r in self.runners}
        source = item.source
        return ImageResult(source.display, source.name, source_key(source.path), item.sha256, item.size, done,
                           rgb=item.inputs.get(PHOTO) if self.keep_rgb else None, quality=item.quality)

    def _inadequate(self, item: DecodedImage) -> ImageResult:
        """An image the quality policy skips: no model runs; recorded with its verdict, never as failed."""
        reasons = ", ".join(item.quality.reason_names)
        outputs = {r.name: ModelOutput.failed(f"not run: inadequate input ({reasons})", "inadequate")
                   for r in self.runners}
        source = item.source
        return ImageResult(source.display, source.name, source_key(source.path), item.sha256, item.size, outputs,
                           rgb=item.inputs.get(PHOTO) if self.keep_rgb else None, quality=item.quality)

    def _failed(self, source: Source, err: ImageError) -> ImageResult:
        message = str(err)
        outputs = {r.name: ModelOutput.failed(message, "image") for r in self.runners}
        return ImageResult(source.display, source.name, source_key(source.path), err.sha256, None, outputs,
                           error=message)

    # -- the whole stream ----------------------------------------------------------------
    def process(self, sources: Iterable[Source]) -> Iterator[ImageResult]:
        """Yield one ImageResult per source, in input order, until done or `stop` is set.

        `sources` is read lazily (at most a decode window ahead), so a generator streams.

        Raises RuntimeFailure when the device fails.
        """
        profile = Profile.from_env(self.runners[0].device)
        with profile or contextlib.nullcontext():
            yield from self._process(sources, profile)

    def _process(self, sources: Iterable[Source], profile: Profile | None) -> Iterator[ImageResult]:
        pool = ThreadPoolExecutor(self.post_threads, thread_name_prefix="legitseg-post")
        queued: deque[Future] = deque()
        max_queued = self.depth
        # Decoded images wait here for a full batch; an image that failed to decode waits in its
        # place too, so results leave in input order.
        batch: list[DecodedImage | ImageResult] = []
        waiting = 0  # decoded images in `batch`

        def drain(limit: int) -> Iterator[ImageResult]:
            while len(queued) > limit:
                yield queued.popleft().result()

        def flush() -> Iterator[ImageResult]:
            nonlocal waiting
            with profile.batch(waiting) if profile else contextlib.nullcontext():
                outputs = iter(self._compute(batch))
                decoded = [b for b in batch if isinstance(b, DecodedImage)]
            if not self.keep_rgb:  # the inputs are done with (on the GPU they hold device memory)
                for item in decoded:
                    item.inputs = {}
            for item in batch:
                if isinstance(item, DecodedImage):
                    queued.append(pool.submit(self._finish, item, next(outputs)))
                else:
                    done: Future = Future()
                    done.set_result(item)
                    queued.append(done)
                yield from drain(max_queued)
            batch.clear()
            waiting = 0

        try:
            for source, decoded in self._decoded(sources):
                if isinstance(decoded, ImageError):
                    batch.append(self._failed(source, decoded))
                elif decoded.quality is not None and decoded.quality.skipped:
                    batch.append(self._inadequate(decoded))
                else:
                    batch.append(decoded)
                    waiting += 1
                # Many failures between two decoded images flush a short batch: memory stays bounded.
                if waiting >= self.batch_size or len(batch) >= 4 * self.batch_size:
                    yield from flush()
                if self.stop.is_set():
                    break
            if batch and not self.stop.is_set():
                yield from flush()
            yield from drain(0)
        finally:
            batch.clear()
            pool.shutdown(wait=True, cancel_futures=True)
