"""The local engine: the scheduler that runs the stages (engines/stages.py) over threads.

Yields one `ImageResult` per source, in input order; what becomes of it (files,
records) is a sink's business. The stages overlap, each bounded so memory does
not grow with the number of images: a decode pool with a fixed window of images
in flight; on a GPU with nvJPEG, a decode-ahead thread that decodes the next batch's
JPEGs while this one computes; the forward passes on the calling thread; and a small
postprocessing pool with a fixed number of queued images. One decode serves every
selected model.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from legitseg.engines.device_inputs import Decoded, DeviceInputs
from legitseg.engines.profile import Profile
from legitseg.engines.stages import PHOTO, Stages, decode, inadequate
from legitseg.errors import ImageError
from legitseg.images import device_decode as device_decode_module
from legitseg.images.decoded import DecodedImage
from legitseg.images.sources import Source
from legitseg.inference.runners import Runner
from legitseg.output.records import ImageResult, ModelOutput

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads set to `threads` while the stream runs, the caller's afterwards."""
    if threads is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Engine:
    """Runs Sources through the models; `process` yields ImageResults."""

    def __init__(self, runners: list[Runner], *, batch_size: int, workers: int, post_threads: int,
                 save_probabilities: bool, max_pixels: int, stop: threading.Event, keep_rgb: bool = False,
                 batched_post: bool | None = None, device_decode: bool | None = None, quality=None,
                 gpu_decode: bool = True, profile: Path | None = None, quiet_torch: bool = False):
        self.runners = runners
        # `quiet_torch` (a run, not a Predictor: it changes a process-wide setting while the stream
        # runs): torch at one intra-op thread when every model runs on ONNX Runtime on the CPU.
        self.quiet_torch = quiet_torch
        # The `quality:` policy (manifest.quality.QualityPolicy): measured on the decoded photograph
        # in the decode worker (images/quality.py), so the photograph must be on the host.
        self.quality = quality
        self.batch_size = max(1, batch_size)
        self.workers = workers
        self.post_threads = max(1, post_threads)
        self.max_pixels = max_pixels
        self.stop = stop
        self.profile = profile  # options.Environment.profile: where the run's time went ($LEGITSEG_PROFILE)
        self.preps = list(dict.fromkeys([r.prep for r in runners] + ([PHOTO] if keep_rgb or quality else [])))
        # With a policy only (no overlay, no model taking the photograph as is), PHOTO is dropped once measured.
        self.measure_only = quality is not None and not keep_rgb and PHOTO not in [r.prep for r in runners]
        self.keep_rgb = keep_rgb
        # On the GPU the resize to the original size, threshold, counts and activation run on the
        # device right after the forward pass, and a batch's masks come back in one copy that the
        # postprocessing pool waits for (docs/architecture.md). On the CPU postprocessing is the
        # costly part of an image and runs in the pool beside the next forward. `batched_post`
        # forces the GPU's way on the CPU (tests).
        self.stages = Stages(runners, save_probabilities=save_probabilities, keep_rgb=keep_rgb,
                             batched_post=batched_post, quality=quality)
        device = runners[0].device
        # Images between the forward pass and the sink: two batches on the GPU, so that the next
        # batch is launched while the last one's results are copied, counted and written.
        self.depth = 2 * max(self.post_threads, self.batch_size if self.batched_post else 0)
        # JPEGs decoded on the GPU in batches, when every model takes a plain input the device can
        # make (images/device_decode.py) and `gpu_decode` ($LEGITSEG_GPU_DECODE) allows it;
        # `device_decode=True` forces it on the CPU (tests).
        if device_decode is None:
            from legitseg.inference.torch_runner import TorchRunner

            device_decode = (device.type == "cuda" and not keep_rgb and quality is None and gpu_decode
                             and device_decode_module.supports(self.preps)
                             and all(type(r) is TorchRunner for r in runners))
        # With it on, model inputs are device tensors for the whole run (`inputs` moves them there).
        self.inputs = DeviceInputs(self.stages, self.preps, device_decode=device_decode) if device_decode else None
        self._pool: ThreadPoolExecutor | None = None  # the decode pool, while `process` runs

    # What callers and tests read of the stages.
    @property
    def batched_post(self) -> bool:
        return self.stages.batched_post

    @property
    def batch_limit(self) -> dict[str, int]:
        return self.stages.batch_limit

    @property
    def device_inputs(self) -> bool:
        return self.inputs is not None

    @property
    def device_decode(self) -> bool:
        """Whether decode workers leave JPEGs encoded for nvJPEG (turned off for the run if it refuses a batch)."""
        return self.inputs is not None and self.inputs.device_decode

    @property
    def upload_limit(self) -> int | None:
        return self.inputs.upload_limit if self.inputs is not None else None

    def _onnx_only_cpu(self) -> int | None:
        """1 when every model runs on ONNX Runtime on the CPU, else None (torch's threads as they are).

        torch then only normalises inputs, small element-wise work; with its default OpenMP
        team the team's threads spin after each such call, on the cores ONNX Runtime's forward
        pass needs (3.4% of a 1024x768 run's CPU in perf; +4% images/s, docs/benchmarks.md).
        """
        on_cpu = self.runners[0].device.type == "cpu"
        onnx_only = all(r.backend == "onnxruntime" for r in self.runners)
        return 1 if self.quiet_torch and on_cpu and onnx_only else None

    # -- decode pool -----------------------------------------------------------------------
    def _decode(self, source: Source) -> DecodedImage | ImageError:
        item = decode(source, self.preps, self.max_pixels, defer_jpeg=self.device_decode)
        if self.quality is not None and isinstance(item, DecodedImage):
            from legitseg.images.quality import assess

            item.quality = assess(item.inputs[PHOTO], self.quality)
            if self.measure_only:
                del item.inputs[PHOTO]
        return item

    def _decoded(self, sources: Iterable[Source], pool: ThreadPoolExecutor | None
                 ) -> Iterator[tuple[Source, DecodedImage | ImageError]]:
        """Decoded images in input order, at most `window` in flight (inline without a pool)."""
        if pool is None:
            for s in sources:
                if self.stop.is_set():
                    return
                yield s, self._decode(s)
            return
        window = max(2 * self.workers, self.batch_size + self.workers)
        queue: deque[tuple[Source, Future]] = deque()
        it = iter(sources)
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

    def _compute(self, batch: list[DecodedImage | ImageResult], decoded: Decoded | None) -> list[dict[str, ModelOutput]]:
        """The batch's model outputs (device inputs first, with the GPU decoder on)."""
        if self.inputs is not None:
            return self.inputs.compute(batch, decoded, self._pool)
        items = [b for b in batch if isinstance(b, DecodedImage)]
        return self.stages.compute(items) if items else []

    # -- the whole stream ----------------------------------------------------------------
    def process(self, sources: Iterable[Source]) -> Iterator[ImageResult]:
        """Yield one ImageResult per source, in input order, until done or `stop` is set.

        `sources` is read lazily (at most a decode window ahead), so a generator streams.

        Raises RuntimeFailure when the device fails.
        """
        profile = Profile(self.profile, self.runners[0].device) if self.profile else None
        with profile or contextlib.nullcontext(), _torch_threads(self._onnx_only_cpu()):
            for result in self._process(sources, profile):
                if profile is not None:
                    profile.done()
                yield result

    def _process(self, sources: Iterable[Source], profile: Profile | None) -> Iterator[ImageResult]:
        pool = ThreadPoolExecutor(self.post_threads, thread_name_prefix="legitseg-post")
        # The decode pool lives as long as the stream: it also decodes what the GPU decoder refused.
        decoders = self._pool = (ThreadPoolExecutor(self.workers, thread_name_prefix="legitseg-decode")
                                 if self.workers > 0 else None)
        # nvJPEG runs one batch ahead on a thread (and stream) of its own, so the calling thread
        # only launches work and the decode overlaps the previous batch's forward pass.
        ahead = (ThreadPoolExecutor(1, thread_name_prefix="legitseg-nvjpeg")
                 if self.inputs is not None and self.workers > 0 else None)
        queued: deque[Future] = deque()
        max_queued = self.depth
        # Decoded images wait here for a full batch; an image that failed to decode waits in its
        # place too, so results leave in input order.
        batch: list[DecodedImage | ImageResult] = []
        waiting = 0  # decoded images in `batch`
        held: tuple[list, int, Future | None] | None = None  # a batch whose device decode runs ahead

        def drain(limit: int) -> Iterator[ImageResult]:
            while len(queued) > limit:
                yield queued.popleft().result()

        def launch(entries: list, count: int, decoding: Future | None) -> Iterator[ImageResult]:
            with profile.batch(count) if profile else contextlib.nullcontext():
                outputs = iter(self._compute(entries, decoding.result() if decoding else None))
            for item in entries:
                if isinstance(item, DecodedImage):
                    if not self.keep_rgb:  # the inputs are done with (on the GPU they hold device memory)
                        item.inputs = {}
                    queued.append(pool.submit(self.stages.finish, item, next(outputs)))
                else:
                    done: Future = Future()
                    done.set_result(item)
                    queued.append(done)
                yield from drain(max_queued)

        def flush() -> Iterator[ImageResult]:
            nonlocal waiting, held
            entries, count = list(batch), waiting
            batch.clear()
            waiting = 0
            if ahead is None:
                yield from launch(entries, count, None)
                return
            previous, held = held, (entries, count, ahead.submit(self.inputs.decode, entries))
            if previous is not None:
                yield from launch(*previous)

        try:
            for source, decoded in self._decoded(sources, decoders):
                if isinstance(decoded, ImageError):
                    batch.append(self.stages.failed(source, decoded))
                elif decoded.quality is not None and decoded.quality.skipped:
                    batch.append(inadequate(decoded, self.runners, self.keep_rgb))
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
            if held is not None:  # a batch already taken (decoding ahead) is finished, as it was without
                previous, held = held, None
                yield from launch(*previous)
            yield from drain(0)
        finally:
            batch.clear()
            if ahead is not None:
                ahead.shutdown(wait=True, cancel_futures=True)
            if decoders is not None:
                self._pool = None
                decoders.shutdown(wait=True, cancel_futures=True)
            pool.shutdown(wait=True, cancel_futures=True)
