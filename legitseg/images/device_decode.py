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

import torch
import torch.nn.functional as F

from legitseg.images.decoded import Prep
from legitseg.images.device_memory import free_memory, out_of_memory  # noqa: F401 - re-exported
from legitseg.images.jpeg_plan import ORIENTATION, Frame, jpeg_frame, orientation, plan  # noqa: F401 - the planning step, re-exported

log = logging.getLogger(__name__)
# Interpolations the device reproduces (bilinear within one level, nearest exactly).
_MODES = {"linear": "bilinear", "nearest": "nearest"}


def supports(preps: list[Prep]) -> bool:
    """Whether every model input can be made on the device from the decoded photograph."""
    return all(p.resize in ("stretch", "pad") and p.interpolation in _MODES and p.channels == 3 for p in preps)


def orient(image: torch.Tensor, turn: int) -> torch.Tensor:
    """A CHW image (or an NCHW batch of images with the same turn) upright by its EXIF orientation.

    Flips and transposes only: exact.
    """
    if turn in (5, 6, 7, 8):
        image = image.transpose(-2, -1)
    flips = {2: (-1,), 3: (-2, -1), 4: (-2,), 6: (-1,), 7: (-2, -1), 8: (-2,)}.get(turn)
    return (image.flip(flips) if flips else image).contiguous()


def prepare(image: torch.Tensor, prep: Prep) -> torch.Tensor:
    """uint8 model input for one Prep (stretch: resized; pad: as it is), on the image's device.

    `image` is CHW, or NCHW for a group of images of one size: one kernel sequence for all.
    """
    if prep.resize == "stretch" and prep.size is not None and tuple(image.shape[-2:]) != tuple(prep.size):
        mode = _MODES[prep.interpolation]
        x = (image if image.ndim == 4 else image[None]).float()
        if mode == "nearest":
            y = F.interpolate(x, size=prep.size, mode="nearest").to(torch.uint8)
        else:
            y = F.interpolate(x, size=prep.size, mode="bilinear", align_corners=False).round_().clamp_(0, 255)
            y = y.to(torch.uint8)
        return y if image.ndim == 4 else y[0]
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

    def mark(self, stream):
        """An event at the end of the work queued on `stream` so far."""
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def wait(self, waiting, event) -> None:
        waiting.wait_event(event)

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
    images, marker = decode_ahead(encoded, device, streams)
    ready(images, marker, device, streams)
    return images


def decode_ahead(encoded: list[torch.Tensor], device: torch.device,
                 streams: Streams | None = None) -> tuple[list[torch.Tensor | None], object]:
    """The decoding half of `decode`, for a thread of its own running a batch ahead of the compute stream.

    Returns the images and a marker of the side stream's work (None off CUDA without `streams`);
    the images may be used only after `ready` has been called on the thread that computes.
    Raises as `decode`.
    """
    if streams is None:
        if device.type != "cuda":
            return _decode(encoded, device), None
        streams = STREAMS
    side = streams.side(device)
    with streams.current(side):
        images = _decode(encoded, device)
    return images, streams.mark(side)


def ready(images: list[torch.Tensor | None], marker: object, device: torch.device,
          streams: Streams | None = None) -> None:
    """Order the compute stream after a `decode_ahead` and hand it the images (no host wait).

    Called from the thread that queues the compute work, when it is about to use the images:
    a wait queued from the decoding thread would land between the kernels of the batch
    being launched and hold them up for the decode.
    """
    if marker is None:
        return
    streams = streams or STREAMS
    compute = streams.compute(device)
    streams.wait(compute, marker)
    for image in images:
        if image is not None:
            streams.used_by(image, compute)


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
