"""Device choice, batched normalisation and forward passes (SPEC 4.2, 4.5).

A `TorchRunner` wraps one loaded model on one device. Input arrays arrive as
uint8 HWC from the decode workers; normalisation runs on the model's device so
that only uint8 crosses the host-to-device copy.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from legitseg.errors import RuntimeFailure, UsageError
from legitseg.pipeline.decode import Prep

if TYPE_CHECKING:
    from legitseg.factory import LoadedModel

log = logging.getLogger(__name__)
PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def choose_device(requested: str) -> torch.device:
    """`auto` picks the first CUDA device if there is one, else the CPU. Raises UsageError/RuntimeFailure."""
    if requested == "auto":
        device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
        log.info("device auto: using %s%s", device,
                 f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else " (no CUDA device found)")
        return device
    try:
        device = torch.device(requested)
    except RuntimeError as err:
        raise UsageError(f"--device {requested!r} is not a device; use auto, cpu, cuda or cuda:N") from err
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {requested!r}: only auto, cpu, cuda and cuda:N are supported")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeFailure(f"--device {requested}: no CUDA device is available on this machine")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise RuntimeFailure(
                f"--device {requested}: only {torch.cuda.device_count()} CUDA device(s) present"
            )
        device = torch.device("cuda", index)
    return device


def check_precision(precision: str, device: torch.device) -> None:
    if precision not in PRECISIONS:
        raise UsageError(f"--precision {precision!r}: choose fp32, fp16 or bf16")
    if precision == "fp16" and device.type != "cuda":
        raise UsageError("--precision fp16 needs a CUDA device; on the CPU use fp32 or bf16")


def prep_for(loaded: LoadedModel) -> Prep:
    spec = loaded.spec
    return Prep(spec.resize, spec.input_size if spec.resize == "stretch" else None,
                spec.interpolation, spec.in_channels)


@dataclass
class TorchRunner:
    """Forward passes of one model on one device."""

    loaded: LoadedModel
    device: torch.device
    precision: str = "fp32"
    channels_last: bool = True
    backend: str = "torch"
    parity: float | None = None

    def __post_init__(self) -> None:
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        self.module = self.loaded.module.to(self.device, memory_format=fmt)
        c = self.loaded.spec.in_channels
        self.mean = torch.tensor(self.loaded.mean, device=self.device).view(1, c, 1, 1) * 255.0
        self.std = torch.tensor(self.loaded.std, device=self.device).view(1, c, 1, 1) * 255.0
        self.prep = prep_for(self.loaded)

    @property
    def name(self) -> str:
        return self.loaded.spec.name

    def to_tensor(self, arrays: list[np.ndarray]) -> torch.Tensor:
        """Stack same-shape uint8 HWC arrays, move them to the device, normalise: (x/255 - mean)/std."""
        batch = torch.from_numpy(np.stack(arrays))
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        x = batch.permute(0, 3, 1, 2).float()
        # (x/255 - m)/s == (x - 255m)/(255s): one subtraction and one division per pixel.
        return ((x - self.mean) / self.std).contiguous(
            memory_format=torch.channels_last if self.channels_last else torch.contiguous_format
        )

    def pad(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Zero-pad the normalised batch bottom/right to the model's stride (SPEC 4.2 `pad`)."""
        h, w = x.shape[-2:]
        s = self.loaded.stride
        ph, pw = (-h) % s, (-w) % s
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        return x, (h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits as float32 on the device."""
        dtype = PRECISIONS[self.precision]
        ctx = (torch.autocast(self.device.type, dtype=dtype) if dtype is not None
               else contextlib.nullcontext())
        with torch.inference_mode(), ctx:
            y = self.module(x)
        return y.float()

    def logits(self, arrays: list[np.ndarray]) -> torch.Tensor:
        """Logits for a batch of same-shape inputs; padding (pad models) already cropped off."""
        with torch.inference_mode():
            x = self.to_tensor(arrays)
            if self.prep.resize == "pad":
                x, (h, w) = self.pad(x)
                y = self.forward(x)
                return y[..., :h, :w] if y.ndim == 4 else y
            return self.forward(x)
