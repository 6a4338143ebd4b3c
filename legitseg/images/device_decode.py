"""JPEG decode, orientation and resize on the GPU, for the photographs it handles exactly.

On a GPU the decode workers only read, hash and check a JPEG; the pixels are decoded
for a whole batch at once by nvJPEG (torchvision's `decode_jpeg(device=...)`), turned
upright by the file's EXIF orientation and resized on the device, so that only the
compressed bytes cross to the GPU. The CPU decoder (OpenCV) keeps everything else:
PNG, TIFF, WebP, HEIF, 16-bit, grey, CMYK and Adobe-RGB JPEGs, progressive and
arithmetic-coded JPEGs, and any JPEG that nvJPEG refuses.

What a user can rely on (docs/architecture.md, tests/test_cuda.py): nvJPEG's IDCT and
chroma upsampling are not libjpeg's, so decoded pixels differ from OpenCV's by a few
levels; the bilinear resize differs from OpenCV's by at most one level; nearest is
identical. Every decision here is made from the file's own header, so the same file
always takes the same path. `LEGITSEG_GPU_DECODE=0` turns the path off (options.Environment).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import cv2
import torch
import torch.nn.functional as F

from legitseg.errors import ImageError
from legitseg.images.decode import decode_rgb, prepared
from legitseg.images.decoded import DecodedImage, Prep
from legitseg.images.device_memory import free_memory, out_of_memory  # noqa: F401 - re-exported
from legitseg.images.jpeg_plan import ORIENTATION, Frame, jpeg_frame, orientation, plan  # noqa: F401 - the planning step, re-exported
from legitseg.images.naming import source_key
from legitseg.output.records import ImageResult, ModelOutput

log = logging.getLogger(__name__)
# Interpolations the device reproduces (bilinear within one level, nearest exactly).
_MODES = {"linear": "bilinear", "nearest": "nearest"}


def supports(preps: list[Prep]) -> bool:
    """Whether every model input can be made on the device from the decoded photograph."""
    return all(p.resize in ("stretch", "pad") and p.interpolation in _MODES and p.channels == 3 for p in preps)


def orient(image: torch.Tensor, turn: int) -> torch.Tensor:
    """A CHW image turned upright by its EXIF orientation (flips and transposes: exact)."""
    if turn in (5, 6, 7, 8):
        image = image.transpose(-2, -1)
    flips = {2: (-1,), 3: (-2, -1), 4: (-2,), 6: (-1,), 7: (-2, -1), 8: (-2,)}.get(turn)
    return (image.flip(flips) if flips else image).contiguous()


def prepare(image: torch.Tensor, prep: Prep) -> torch.Tensor:
    """CHW uint8 model input for one Prep (stretch: resized; pad: as it is), on the image's device."""
    if prep.resize == "stretch" and prep.size is not None and tuple(image.shape[-2:]) != tuple(prep.size):
        mode = _MODES[prep.interpolation]
        x = image[None].float()
        if mode == "nearest":
            return F.interpolate(x, size=prep.size, mode="nearest")[0].to(torch.uint8)
        y = F.interpolate(x, size=prep.size, mode="bilinear", align_corners=False)[0]
        return y.round_().clamp_(0, 255).to(torch.uint8)
    return image


class Streams:
    """How a device decode is ordered against the compute stream (torch.cuda's; tests pass a recorder).

    torchvision's `decode_jpeg(device=cuda)` allocates its outputs on the caller's current
    stream and has nvJPEG write them from a private stream that waits for nothing (and
    nvJPEG's hardware engine does not honour stream order anyway). Decoding on the compute
    stream hands nvJPEG blocks that kernels still queued there (the previous batch's
    forward and postprocessing) may read: pytorch/vision PR 9606 saw 199 of 200 batches
    corrupted on an H100 when the GPU ran behind the host. So the decode runs with a side
    stream current: its outputs come from that stream's pool, which holds only earlier
    decode outputs, and each of those was marked (`record_stream`) as used by the compute
    stream, so the allocator hands a block out again only once the compute stream's work
    on it has finished (an event query, not a host wait). The compute stream then waits
    for the side stream before it touches the new images.

    Cost: a few microseconds per batch (one `wait_stream`, one `record_stream` per image)
    and a pool of decode outputs the compute stream cannot borrow (about one batch of
    photographs, two while the GPU runs a batch behind). The alternative, synchronising the
    compute stream on the host before each decode, makes every decode wait for the whole
    previous batch to finish: decode and forward no longer overlap, a loss of the decode
    time per batch (docs/architecture.md; the device check measures both paths' results).
    """

    def __init__(self) -> None:
        self._side: dict[torch.device, torch.cuda.Stream] = {}

    def compute(self, device: torch.device):
        return torch.cuda.current_stream(device)

    def side(self, device: torch.device):
        if device not in self._side:
            self._side[device] = torch.cuda.Stream(device)
        return self._side[device]

    def current(self, stream):
        return torch.cuda.stream(stream)

    def wait(self, waiting, stream) -> None:
        waiting.wait_stream(stream)

    def used_by(self, tensor: torch.Tensor, stream) -> None:
        tensor.record_stream(stream)


STREAMS = Streams()


def decode(encoded: list[torch.Tensor], device: torch.device,
           streams: Streams | None = None) -> list[torch.Tensor | None]:
    """RGB CHW uint8 images on `device`, one per encoded JPEG; None where the decoder refused one.

    One batched call; if it fails, each file is tried alone so one bad file costs only itself.
    On CUDA (or with `streams` given) the decode is isolated from queued work (`Streams`).
    Raises the decoder's RuntimeError when it ran out of memory (`device_decode.out_of_memory`):
    the caller empties the cache and retries, or decodes on the CPU.
    """
    if streams is None:
        if device.type != "cuda":
            return _decode(encoded, device)
        streams = STREAMS
    compute, side = streams.compute(device), streams.side(device)
    with streams.current(side):
        images = _decode(encoded, device)
    streams.wait(compute, side)
    for image in images:
        if image is not None:
            streams.used_by(image, compute)
    return images


def _decode(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device))
    except RuntimeError as err:
        if out_of_memory(err):
            raise
        log.debug("batched JPEG decode on %s failed (%s); decoding one by one", device, err)
    out: list[torch.Tensor | None] = []
    for data in encoded:
        try:
            out.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
        except RuntimeError as err:
            if out_of_memory(err):
                raise
            log.debug("JPEG decode on %s failed: %s", device, err)
            out.append(None)
    return out


class DeviceInputs:
    """The engine's step that puts a batch's inputs on the device (`pipeline.engine.Engine` only).

    A part of Engine kept here, beside the decoder it drives, so that each module stays
    readable; it uses the engine's runners, preps, decode pool, `_run_batch` and `_failed`.
    """

    runners: list
    preps: list[Prep]
    device_decode: bool
    device_inputs: bool
    keep_rgb: bool
    upload_limit: int | None
    _pool: ThreadPoolExecutor | None

    def _to_device(self, batch: list[DecodedImage | ImageResult]) -> None:
        """Every decoded image's inputs as CHW uint8 tensors on the device (device decode on).

        The JPEGs left encoded are decoded in one batch on the device, turned upright and
        resized there; the rest, decoded on the CPU, are uploaded as they are. A JPEG the
        device decoder refuses, or whose decoded size is not the one its header planned, is
        decoded on the CPU; one that fails there too takes its place in `batch` as a failed
        result. Device tensors are assigned only once the whole of `batch` is on the device,
        so an out-of-memory error (raised) leaves the images as they were, to be tried again.
        """
        device = self.runners[0].device
        deferred = [(k, b) for k, b in enumerate(batch) if isinstance(b, DecodedImage) and b.encoded is not None]
        images: list = [None] * len(deferred)
        if deferred and self.device_decode:
            images = self._device_decoded([b.encoded for _, b in deferred], device)
        staged: dict[int, dict] = {}
        fallback = []
        for (k, item), image in zip(deferred, images, strict=True):
            upright = None if image is None else orient(image, item.orientation)
            if upright is not None and tuple(upright.shape[-2:]) != tuple(item.size):
                log.warning("%s: the GPU decoder gave %s pixels where the header says %s; decoded on the CPU",
                            item.source.display, tuple(upright.shape[-2:]), tuple(item.size))
                upright = None
            if upright is None:
                fallback.append(k)
            else:
                staged[k] = {p: prepare(upright, p) for p in self.preps}
        for k, done in zip(fallback, self._on_cpu([batch[k] for k in fallback]), strict=True):
            batch[k] = done  # host pixels: kept even if the upload below runs out of memory
        for k, item in enumerate(batch):
            if isinstance(item, DecodedImage) and k not in staged:
                staged[k] = {p: a if isinstance(a, torch.Tensor) else self._upload(a, device)
                             for p, a in item.inputs.items()}
        for k, inputs in staged.items():
            batch[k].inputs, batch[k].encoded = inputs, None

    @staticmethod
    def _upload(array, device: torch.device) -> torch.Tensor:
        t = torch.from_numpy(array)
        if device.type == "cuda":  # staged in page-locked memory: no device sync
            t = t.pin_memory().to(device, non_blocking=True)
        return t.permute(2, 0, 1)

    def _device_decoded(self, encoded: list, device: torch.device) -> list:
        """nvJPEG's images, None where it refused one (or all, when it ran out of memory twice)."""
        for attempt in (1, 2):
            oom = False
            try:
                images = decode(encoded, device)
            except RuntimeError as err:
                if not out_of_memory(err):
                    raise
                oom = True  # handled once the traceback (and what it holds) is released
            if not oom:
                break
            free_memory(device)
            if attempt == 2:
                # Not a refusal: the next batch is decoded on the device again.
                log.warning("out of memory decoding %d JPEGs on %s, also after emptying the cache; "
                            "this batch is decoded on the CPU", len(encoded), device)
                return [None] * len(encoded)
        if len(images) > 1 and all(image is None for image in images):
            # nvJPEG missing or broken here: not worth trying per batch; the CPU decodes from now on
            self.device_decode = False
            log.warning("the GPU JPEG decoder refused a whole batch on %s; JPEGs are decoded on the CPU "
                        "for the rest of this run", device)
        return images

    def _on_cpu(self, items: list[DecodedImage]) -> list[DecodedImage | ImageResult]:
        """JPEGs the device did not decode, decoded by OpenCV in the decode pool (on this thread without one)."""
        pool = self._pool
        if pool is None or len(items) < 2:
            return [self._decode_on_cpu(item) for item in items]
        return [f.result() for f in [pool.submit(self._decode_on_cpu, item) for item in items]]

    def _decode_on_cpu(self, item: DecodedImage) -> DecodedImage | ImageResult:
        """A JPEG the device decoder refused, decoded by OpenCV; failed if it refuses too."""
        data = item.encoded.numpy().tobytes()
        try:
            return prepared(item.source, item.sha256, decode_rgb(data, "JPEG"), self.preps)
        except ImageError as err:
            return self._failed(item.source, ImageError(str(err), sha256=item.sha256))
        except cv2.error as err:
            message = str(err).strip().splitlines()[-1]
            return self._failed(item.source, ImageError(f"OpenCV could not decode it: {message}", sha256=item.sha256))

    def _compute(self, batch: list[DecodedImage | ImageResult]) -> list[dict[str, ModelOutput]]:
        """Every model's outputs for the decoded images of `batch`, in order (inputs moved to the device first).

        Out of memory moving inputs (orientation, resize, pinning, upload): the cache is emptied
        and the part tried again, then it is done in halves as a forward pass is, the size that
        fits kept for the run; an image that does not fit alone fails alone.
        """
        if not self.device_inputs:
            decoded = [b for b in batch if isinstance(b, DecodedImage)]
            return self._run_batch(decoded) if decoded else []
        device = self.runners[0].device
        outputs: list[dict[str, ModelOutput]] = []
        start, retried = 0, False
        while start < len(batch):
            size = min(len(batch) - start, self.upload_limit or len(batch))
            part, oom = batch[start:start + size], False
            try:
                self._to_device(part)
            except RuntimeError as err:
                if not out_of_memory(err):
                    raise
                oom = True  # handled once the traceback is released
            batch[start:start + size] = part  # CPU fallbacks are kept either way
            if not oom:
                decoded = [b for b in part if isinstance(b, DecodedImage)]
                outputs += self._run_batch(decoded) if decoded else []
                for item in decoded if not self.keep_rgb else ():
                    item.inputs = {}  # device memory, needed no more: the next part may use it
                start, retried = start + size, False
                continue
            free_memory(device)
            if not retried:
                retried = True
            elif size == 1:
                message = f"out of memory on {device} moving this image to it, even alone"
                batch[start] = ImageResult(part[0].source.display, part[0].source.name,
                                           source_key(part[0].source.path), part[0].sha256, part[0].size,
                                           {r.name: ModelOutput.failed(message, "oom") for r in self.runners})
                start, retried = start + 1, False
            else:
                self.upload_limit, retried = size // 2, False
                log.warning("out of memory moving a batch of %d to %s; retrying with batches of %d",
                            size, device, size // 2)
        return outputs
