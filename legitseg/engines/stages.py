"""The engine's stages, each with one public step: decode a source, compute a batch, finish an image.

    decode(source)        -> DecodedImage | ImageError      a decode worker (or a Ray task)
    Stages.compute(items) -> per-image model outputs         the thread that launches the device work
    Stages.finish(item)   -> ImageResult                     a postprocessing thread
    Stages.step(items)    -> ImageResults, in order          compute + finish inline (the Ray actors)

The local engine (engines/local.py) schedules these over threads; the Ray engine calls
`decode` in its tasks and `step` in its actors. Neither reaches into the other.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import cv2
import torch

from legitseg.engines.transfer import Pending, Transfer
from legitseg.errors import ImageError, RuntimeFailure
from legitseg.images.decode import load_image
from legitseg.images.decoded import DecodedImage, Prep
from legitseg.images.device_memory import free_memory, out_of_memory
from legitseg.images.naming import source_key
from legitseg.images.pixels import PixelSource
from legitseg.images.sources import Source
from legitseg.inference import postprocess, uncertainty
from legitseg.inference.quality_gate import quality_gate, spared
from legitseg.inference.runners import Runner
from legitseg.output.records import ImageResult, ModelOutput

log = logging.getLogger(__name__)
# The decoded photograph as it is: `pad` at 3 channels returns the oriented RGB uncopied.
PHOTO = Prep("pad", None, "linear", 3)


def decode(source: Source, preps: list[Prep], max_pixels: int, defer_jpeg: bool = False) -> DecodedImage | ImageError:
    """Read, check and decode one source for every Prep; an ImageError (returned) says why not.

    `defer_jpeg` leaves the JPEGs the GPU decodes encoded (images/device_decode.py).
    """
    try:
        if isinstance(source, PixelSource):  # pixels given in memory (the Python API)
            return source.load(preps, max_pixels)
        return load_image(source, preps, max_pixels, defer_jpeg=defer_jpeg)
    except ImageError as err:
        return err
    except Exception as err:  # noqa: BLE001 - one image must never stop the run
        # Whatever a decoder library raises for odd data is this image's failure, recorded as such.
        log.debug("unexpected error decoding %s", source.path, exc_info=True)
        return ImageError(f"could not decode: {type(err).__name__}: {err}")


def failed(source: Source, err: ImageError, runners: list) -> ImageResult:
    """The result of an image that could not be read or decoded: a failed output per model."""
    message = str(err)
    outputs = {r.name: ModelOutput.failed(message, "image") for r in runners}
    return ImageResult(source.display, source.name, source_key(source.path), err.sha256, None, outputs,
                       error=message)


def inadequate(item: DecodedImage, runners: list, keep_rgb: bool) -> ImageResult:
    """An image the quality policy skips: no model runs; recorded with its verdict, never as failed."""
    reasons = ", ".join(item.quality.reason_names)
    outputs = {r.name: ModelOutput.failed(f"not run: inadequate input ({reasons})", "inadequate") for r in runners}
    source = item.source
    return ImageResult(source.display, source.name, source_key(source.path), item.sha256, item.size, outputs,
                       rgb=item.inputs.get(PHOTO) if keep_rgb else None, quality=item.quality)


@dataclass
class Deferred:
    """A result computed on the device whose arrays arrive with the batch's one copy to the host."""

    mask: int  # index in the batch's Transfer (segmentation: the mask; severity: the probabilities)
    probabilities: int | None = None
    counts: int | None = None  # per-class pixel counts, computed on the device beside the mask
    pending: Pending | None = None  # set once the batch's transfer is launched
    members: dict | None = None  # the TTA views'/members' uncertainty measures (inference/uncertainty.py)


class Stages:
    """The forward passes and postprocessing of every model, for a batch of decoded images.

    `batched_post` (the GPU's way; default on CUDA): each image's logits are resized,
    thresholded, counted and activated on the device right after the forward pass, and the
    batch's arrays come back in one copy that `finish` waits for. Otherwise the logits go to
    the host and `finish` postprocesses them (on the CPU, beside the next forward pass).
    """

    def __init__(self, runners: list[Runner], *, save_probabilities: bool, keep_rgb: bool = False,
                 batched_post: bool | None = None, quality=None):
        self.runners = runners
        self.quality = quality  # the `quality:` policy a task: quality model's score is judged by
        self.save_probabilities = save_probabilities
        self.keep_rgb = keep_rgb  # ImageResult.rgb carries the photograph (for overlays)
        device = runners[0].device
        self.device = device
        self.batched_post = device.type == "cuda" if batched_post is None else batched_post
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        # Largest batch known to fit, per model, once a batch ran out of memory.
        self.batch_limit: dict[str, int] = {}

    # -- the public steps ------------------------------------------------------------------
    def compute(self, items: list[DecodedImage]) -> list[dict[str, ModelOutput]]:
        """Every model's outputs for `items`, in order; on the GPU returns before they are on the host.

        Raises RuntimeFailure when a forward pass fails for another reason than the image or memory.
        """
        outputs: list[dict[str, ModelOutput]] = [{} for _ in items]
        transfer = Transfer(self.device, self.copy_stream) if self.batched_post else None
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
                    if value.device_copy is not None:
                        value.device_copy.pending = pending
        return outputs

    def finish(self, item: DecodedImage, outputs: dict[str, ModelOutput]) -> ImageResult:
        """One image's result on the host: areas, scores (waits for its batch's copy). Its regions are
        counted where the result is first read (`SegmentationResult.components`): the Sink's writer thread."""
        done = {r.name: self._postprocess(r, outputs[r.name], item) for r in self.runners}
        source = item.source
        return ImageResult(source.display, source.name, source_key(source.path), item.sha256, item.size, done,
                           rgb=item.inputs.get(PHOTO) if self.keep_rgb else None, quality=item.quality)

    def failed(self, source: Source, err: ImageError) -> ImageResult:
        return failed(source, err, self.runners)

    def step(self, batch: list[DecodedImage | ImageResult]) -> list[ImageResult]:
        """The whole batch step on this thread: a result per entry, in order (failed ones pass through)."""
        decoded = [b for b in batch if isinstance(b, DecodedImage)]
        outputs = iter(self.compute(decoded) if decoded else [])
        return [self.finish(b, next(outputs)) if isinstance(b, DecodedImage) else b for b in batch]

    # -- forward ---------------------------------------------------------------------------
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

    # -- postprocessing --------------------------------------------------------------------
    def _on_device(self, runner: Runner, output: ModelOutput, item: DecodedImage, transfer: Transfer) -> ModelOutput:
        """Start one result's device half (resize, threshold, counts, activation); its arrays join the batch's copy.

        Out of device memory here (twice, the cache emptied between), the logits go to the
        host and are postprocessed there.
        """
        spec, logits = runner.loaded.spec, output.logits
        members = uncertainty.members_of(logits)
        for _ in (1, 2):
            oom = False
            try:
                if spec.task != "segmentation":
                    return ModelOutput(device_copy=Deferred(transfer.add(postprocess.severity_on_device(logits, spec)),
                                                            members=members))
                mask, probs = postprocess.segmentation_on_device(logits, item.size, spec, self.save_probabilities)
                counts = postprocess.counts_on_device(mask, spec)
                return ModelOutput(device_copy=Deferred(transfer.add(mask), None if probs is None else transfer.add(probs),
                                                        transfer.add(counts), members=members))
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
        if output.logits is None and output.device_copy is None:
            return output
        spec = runner.loaded.spec
        try:
            if output.device_copy is not None:
                d = output.device_copy
                assert d.pending is not None
                if spec.task != "segmentation":
                    return ModelOutput(result=postprocess.finish_severity(d.pending.array(d.mask), spec, d.members))
                probs = None if d.probabilities is None else d.pending.array(d.probabilities)
                counts = None if d.counts is None else d.pending.array(d.counts)
                return ModelOutput(result=postprocess.finish_segmentation(d.pending.array(d.mask), probs,
                                                                          item.size, spec, d.members, counts=counts))
            if spec.task != "segmentation":
                return ModelOutput(result=postprocess.severity(output.logits, spec))
            return ModelOutput(result=postprocess.segmentation(output.logits, item.size, spec,
                                                               self.save_probabilities))
        except (ValueError, cv2.error) as err:
            return ModelOutput.failed(f"postprocessing failed: {err}", "postprocess")
