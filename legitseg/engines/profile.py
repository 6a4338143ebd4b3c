"""Where a run's time goes, for the benchmark: `LEGITSEG_PROFILE=FILE legitseg run ...`.

Written as JSON when the engine finishes: images and batches; wall time of the engine;
CPU seconds of the thread that launches the batches (the main thread) and of the whole
process; on a GPU the time the device spent on the batches (CUDA events around each
batch's decode, forward passes and postprocessing, so idle gaps between batches are
not counted) and the number of synchronising CUDA calls the engine's thread made
(PyTorch's sync debug mode). Off unless the variable is set; not a user-facing feature.
"""

from __future__ import annotations

import contextlib
import json
import resource
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from legitseg.timeline import marks


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Profile:
    """Measures one `Engine.process`; use as a context manager around it, `batch()` around each batch."""

    def __init__(self, path: Path, device: torch.device):
        self.path, self.device = path, device
        self.cuda = device.type == "cuda"
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.batches = self.images = 0
        self.finished: list[float] = []  # when each result left the engine (epoch seconds)
        self._warnings = warnings.catch_warnings(record=True)
        self.caught: list[warnings.WarningMessage] = []

    def __enter__(self) -> Profile:
        self.wall0, self.thread0, self.process0 = time.perf_counter(), time.thread_time(), _cpu_seconds()
        self.started = time.time()  # the engine's start (models built), for the benchmark's rate
        self.caught = self._warnings.__enter__() or []
        warnings.simplefilter("always")
        if self.cuda:
            torch.cuda.set_sync_debug_mode("warn")
        return self

    @contextlib.contextmanager
    def batch(self, images: int) -> Iterator[None]:
        self.batches += 1
        self.images += images
        if not self.cuda:
            yield
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        self.events.append((start, end))

    def done(self) -> None:
        """One result handed on to the sink. Records become durable a group at a time, so their
        file times cluster; these times say when each image was finished."""
        self.finished.append(time.time())

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            torch.cuda.set_sync_debug_mode("default")
            torch.cuda.synchronize(self.device)
        wall = time.perf_counter() - self.wall0
        thread = time.thread_time() - self.thread0
        process = _cpu_seconds() - self.process0
        self._warnings.__exit__(None, None, None)
        syncs = sum("synchroniz" in str(w.message) for w in self.caught)
        busy = sum(s.elapsed_time(e) for s, e in self.events) / 1000 if self.cuda else None
        data = {
            "device": str(self.device), "images": self.images, "batches": self.batches, "wall_s": wall,
            "main_thread_cpu_s": thread, "main_thread_cpu_share": thread / wall if wall else None,
            "process_cpu_s": process, "process_cpu_s_per_image": process / self.images if self.images else None,
            "gpu_busy_s": busy, "gpu_busy_share": busy / wall if busy is not None and wall else None,
            "syncs": syncs if self.cuda else None,
            "syncs_per_batch": syncs / self.batches if self.cuda and self.batches else None,
            "started_at": self.started, "finished_at": self.finished,
            # The start-up steps before the engine (legitseg/timeline.py): [name, wall-clock time].
            "marks": [[name, at] for name, at in marks()],
        }
        self.path.write_text(json.dumps(data, indent=1) + "\n")
