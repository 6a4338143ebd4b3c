"""Device tensors back to the host in one copy per batch, waited for by whoever needs them.

On a GPU the per-image results of a batch (masks, probability maps, severity
probabilities) are copied into one page-locked host buffer per dtype on a copy
stream of their own, and one event marks the end of all those copies. The thread
that launched them goes on to the next batch; the postprocessing thread that
needs an image's arrays waits for the event (one device synchronisation per batch,
off the main thread). Page-locked buffers come from PyTorch's caching host
allocator, so after the first batches they are reused rather than allocated.

The same code runs with CPU tensors (plain copies, no stream, no event), which is
how the tests exercise the batching and slicing without a GPU.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class Pending:
    """The host side of one launched transfer: `arrays` waits for it once, then slices."""

    buffers: dict[torch.dtype, torch.Tensor]
    slots: list[tuple[torch.dtype, int, tuple[int, ...]]]
    event: torch.cuda.Event | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _done: bool = False

    def wait(self) -> None:
        with self._lock:
            if not self._done:
                if self.event is not None:
                    self.event.synchronize()  # releases the GIL while it waits
                self._done = True

    def array(self, index: int) -> np.ndarray:
        """The host copy of the `index`-th tensor added, as a numpy array of its shape.

        A view of the batch's buffer (which it keeps alive), not a copy.
        """
        self.wait()
        dtype, offset, shape = self.slots[index]
        n = int(np.prod(shape, dtype=np.int64))
        return self.buffers[dtype][offset:offset + n].view(shape).numpy()


class Transfer:
    """Collects device tensors of one batch, then `launch` copies them all to the host."""

    def __init__(self, device: torch.device, copy_stream: torch.cuda.Stream | None = None):
        self.device = device
        self.copy_stream = copy_stream
        self.tensors: list[torch.Tensor] = []

    def add(self, tensor: torch.Tensor) -> int:
        """Queue one tensor (any shape, on `device`); returns its index for `Pending.array`."""
        self.tensors.append(tensor)
        return len(self.tensors) - 1

    def launch(self) -> Pending:
        """Start every copy; returns at once on a GPU (the copies run on the copy stream)."""
        sizes: dict[torch.dtype, int] = {}
        slots = []
        for t in self.tensors:
            offset = sizes.get(t.dtype, 0)
            slots.append((t.dtype, offset, tuple(t.shape)))
            sizes[t.dtype] = offset + t.numel()
        cuda = self.device.type == "cuda"
        buffers = {dtype: torch.empty(n, dtype=dtype, pin_memory=cuda) for dtype, n in sizes.items()}
        stream = event = None
        if cuda:
            stream = self.copy_stream or torch.cuda.current_stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))  # the results are computed first
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for t, (dtype, offset, _) in zip(self.tensors, slots, strict=True):
                buffers[dtype][offset:offset + t.numel()].copy_(t.reshape(-1), non_blocking=cuda)
                if stream is not None:
                    t.record_stream(stream)  # not reused by the allocator before the copy is done
            if stream is not None:
                # blocking: the postprocessing thread that waits sleeps in the driver instead of spinning a core
                event = torch.cuda.Event(blocking=True)
                event.record(stream)
        self.tensors.clear()
        return Pending(buffers, slots, event)
