"""Putting a batch's inputs on the device (GPU decode on): decode ahead, orient and resize per group, upload.

Two public steps, on two threads:

    DeviceInputs.decode(batch)            the batch's JPEGs through nvJPEG, on the decode-ahead
                                          thread and its own stream, while the compute thread
                                          runs the batch before
    DeviceInputs.compute(batch, decoded)  on the compute thread: orientation and resize for each
                                          group of images of one size and turn (one kernel
                                          sequence per group, not per image), CPU-decoded
                                          images uploaded, then `Stages.compute`

Out of memory anywhere here is dropped, the cache emptied and tried again before anything
is given up (docs/architecture.md, "The GPU path").
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import cv2
import torch

from legitseg.errors import ImageError
from legitseg.images import device_decode
from legitseg.images.decode import decode_rgb, prepared
from legitseg.images.decoded import DecodedImage, Prep
from legitseg.images.device_memory import free_memory, out_of_memory
from legitseg.images.naming import source_key
from legitseg.output.records import ImageResult, ModelOutput

if TYPE_CHECKING:  # handed in by the engine: one floor less on the import path
    from legitseg.engines.stages import Stages

log = logging.getLogger(__name__)


@dataclass
class Decoded:
    """A batch's JPEGs as the device decoder left them: raw (not yet upright) images by item."""

    images: dict[int, torch.Tensor | None] = field(default_factory=dict)  # id(item) -> image, None: refused
    marker: object = None  # the decode stream's work, for `device_decode.ready`


class DeviceInputs:
    """The device half of the engine's input stage; `compute` ends in `Stages.compute`."""

    def __init__(self, stages: Stages, preps: list[Prep], *, device_decode: bool):
        self.stages = stages
        self.preps = preps
        self.device = stages.device
        self.device_decode = device_decode  # JPEGs decoded by nvJPEG (off for the run once it refuses a batch)
        self.upload_limit: int | None = None  # images moved to the device at once, after an out of memory

    # -- decode ahead -------------------------------------------------------------------------
    def decode(self, batch: list) -> Decoded:
        """nvJPEG's raw images for the batch's JPEGs left encoded (none if the decoder is off).

        Runs on the decode-ahead thread; the images become usable on the compute stream in `compute`.
        """
        deferred = [b for b in batch if isinstance(b, DecodedImage) and b.encoded is not None]
        if not deferred or not self.device_decode:
            return Decoded()
        images, marker = self._device_decoded([b.encoded for b in deferred])
        return Decoded({id(b): image for b, image in zip(deferred, images, strict=True)}, marker)

    def _device_decoded(self, encoded: list) -> tuple[list, object]:
        """nvJPEG's images, None where it refused one (or all, when it ran out of memory twice)."""
        images: list = []
        marker = None
        for attempt in (1, 2):
            oom = False
            try:
                images, marker = device_decode.decode_ahead(encoded, self.device)
            except RuntimeError as err:
                if not out_of_memory(err):
                    raise
                oom = True  # handled once the traceback (and what it holds) is released
            if not oom:
                break
            free_memory(self.device)
            if attempt == 2:
                # Not a refusal: the next batch is decoded on the device again.
                log.warning("out of memory decoding %d JPEGs on %s, also after emptying the cache; "
                            "this batch is decoded on the CPU", len(encoded), self.device)
                return [None] * len(encoded), None
        if len(images) > 1 and all(image is None for image in images):
            # nvJPEG missing or broken here: not worth trying per batch; the CPU decodes from now on
            self.device_decode = False
            log.warning("the GPU JPEG decoder refused a whole batch on %s; JPEGs are decoded on the CPU "
                        "for the rest of this run", self.device)
        return images, marker

    # -- on the compute thread ------------------------------------------------------------------
    def compute(self, batch: list, decoded: Decoded | None = None,
                pool: ThreadPoolExecutor | None = None) -> list[dict[str, ModelOutput]]:
        """Every model's outputs for the decoded images of `batch`, in order (inputs moved to the device first).

        `decoded`: the batch's `decode`, made ahead (made here if None). `pool`: where JPEGs the
        device did not decode are decoded by OpenCV (this thread without one). Out of memory
        moving inputs (orientation, resize, pinning, upload): the cache is emptied and the part
        tried again, then it is done in halves as a forward pass is, the size that fits kept
        for the run; an image that does not fit alone fails alone (in its place in `batch`).
        """
        if decoded is None:
            decoded = self.decode(batch)
        device_decode.ready(list(decoded.images.values()), decoded.marker, self.device)
        outputs: list[dict[str, ModelOutput]] = []
        start, retried = 0, False
        while start < len(batch):
            size = min(len(batch) - start, self.upload_limit or len(batch))
            part, oom = batch[start:start + size], False
            try:
                self._to_device(part, decoded, pool)
            except RuntimeError as err:
                if not out_of_memory(err):
                    raise
                oom = True  # handled once the traceback is released
            batch[start:start + size] = part  # CPU fallbacks are kept either way
            if not oom:
                done = [b for b in part if isinstance(b, DecodedImage)]
                for b in done:
                    decoded.images.pop(id(b), None)  # the raw decode, needed no more
                outputs += self.stages.compute(done) if done else []
                for item in done if not self.stages.keep_rgb else ():
                    item.inputs = {}  # device memory, needed no more: the next part may use it
                start, retried = start + size, False
                continue
            free_memory(self.device)
            if not retried:
                retried = True
            elif size == 1:
                item = part[0]
                message = f"out of memory on {self.device} moving this image to it, even alone"
                batch[start] = ImageResult(item.source.display, item.source.name, source_key(item.source.path),
                                           item.sha256, item.size,
                                           {r.name: ModelOutput.failed(message, "oom") for r in self.stages.runners})
                decoded.images.pop(id(item), None)
                start, retried = start + 1, False
            else:
                self.upload_limit, retried = size // 2, False
                log.warning("out of memory moving a batch of %d to %s; retrying with batches of %d",
                            size, self.device, size // 2)
        return outputs

    def _to_device(self, batch: list, decoded: Decoded, pool: ThreadPoolExecutor | None) -> None:
        """Every decoded image's inputs as CHW uint8 tensors on the device.

        The device-decoded JPEGs are grouped by decoded size and EXIF turn; each group is
        stacked, turned upright and resized as one batch. A JPEG the device decoder refused,
        or whose decoded size is not the one its header planned, is decoded on the CPU; one
        that fails there too takes its place in `batch` as a failed result; the rest, decoded
        on the CPU, are uploaded as they are. Device tensors are assigned only once the whole
        of `batch` is on the device, so an out-of-memory error (raised) leaves the images as
        they were, to be tried again.
        """
        groups: dict[tuple, list[tuple[int, DecodedImage, torch.Tensor]]] = {}
        fallback = []
        for k, item in enumerate(batch):
            if not (isinstance(item, DecodedImage) and item.encoded is not None):
                continue
            image = decoded.images.get(id(item))
            if image is None:
                fallback.append(k)
            else:
                groups.setdefault((tuple(image.shape), item.orientation), []).append((k, item, image))
        staged: dict[int, dict] = {}
        for (_, turn), members in groups.items():
            stacked = members[0][2][None] if len(members) == 1 else torch.stack([m[2] for m in members])
            upright = device_decode.orient(stacked, turn)
            del stacked
            inputs = {p: device_decode.prepare(upright, p) for p in self.preps}
            for j, (k, item, _) in enumerate(members):
                if tuple(upright.shape[-2:]) != tuple(item.size):
                    log.warning("%s: the GPU decoder gave %s pixels where the header says %s; decoded on the CPU",
                                item.source.display, tuple(upright.shape[-2:]), tuple(item.size))
                    fallback.append(k)
                else:
                    staged[k] = {p: x[j] for p, x in inputs.items()}
        for k, done in zip(fallback, self._on_cpu([batch[k] for k in fallback], pool), strict=True):
            batch[k] = done  # host pixels: kept even if the upload below runs out of memory
        for k, item in enumerate(batch):
            if isinstance(item, DecodedImage) and k not in staged:
                staged[k] = {p: a if isinstance(a, torch.Tensor) else self._upload(a) for p, a in item.inputs.items()}
        for k, inputs in staged.items():
            batch[k].inputs, batch[k].encoded = inputs, None

    def _upload(self, array) -> torch.Tensor:
        t = torch.from_numpy(array)
        if self.device.type == "cuda":  # staged in page-locked memory: no device sync
            t = t.pin_memory().to(self.device, non_blocking=True)
        return t.permute(2, 0, 1)

    def _on_cpu(self, items: list[DecodedImage], pool: ThreadPoolExecutor | None) -> list[DecodedImage | ImageResult]:
        """JPEGs the device did not decode, decoded by OpenCV in the decode pool (on this thread without one)."""
        if pool is None or len(items) < 2:
            return [self.decode_on_cpu(item) for item in items]
        return [f.result() for f in [pool.submit(self.decode_on_cpu, item) for item in items]]

    def decode_on_cpu(self, item: DecodedImage) -> DecodedImage | ImageResult:
        """A JPEG the device decoder refused, decoded by OpenCV; failed if it refuses too."""
        data = item.encoded.numpy().tobytes()
        try:
            return prepared(item.source, item.sha256, decode_rgb(data, "JPEG"), self.preps)
        except ImageError as err:
            return self.stages.failed(item.source, ImageError(str(err), sha256=item.sha256))
        except cv2.error as err:
            message = str(err).strip().splitlines()[-1]
            return self.stages.failed(item.source,
                                      ImageError(f"OpenCV could not decode it: {message}", sha256=item.sha256))
