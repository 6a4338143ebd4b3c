"""What every backend shares (SPEC 4.2, 4.5): the Runner protocol, the Preprocessor, the parity probes.

A runner turns a batch of same-shape uint8 HWC arrays into logits. Backends are
siblings: each holds a `Preprocessor` (normalisation, stride padding, crop) and
implements only `forward`. Which backend runs a model is decided in `registry.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from legitseg.images.decoded import Prep
from legitseg.images.geometry import content_slices, stride_padding

if TYPE_CHECKING:
    from legitseg.manifest.spec import ModelSpec
    from legitseg.models.factory import LoadedModel


class Runner(Protocol):
    """Forward passes of one model on one device."""

    loaded: LoadedModel
    device: torch.device
    precision: str
    backend: str
    parity: float | None
    prep: Prep
    # Exceptions of `logits` that mean "this batch failed" rather than "the run failed".
    image_errors: tuple[type[BaseException], ...]

    @property
    def name(self) -> str: ...

    def logits(self, arrays: list[np.ndarray]) -> torch.Tensor | Sequence[torch.Tensor]:
        """One output per array (indexable): logits (C, h, w) or (classes,)."""


def prep_for(loaded: LoadedModel) -> Prep:
    spec = loaded.spec
    return Prep(spec.resize, spec.input_size if spec.resize in ("stretch", "letterbox") else None,
                spec.interpolation, spec.in_channels, spec.decode == "reduced")


@dataclass
class Preprocessor:
    """uint8 HWC arrays -> the normalised NCHW batch a model takes, and back to unpadded logits."""

    mean: torch.Tensor  # (1, C, 1, 1), already x255
    std: torch.Tensor
    stride: int
    pad_to_stride: bool
    device: torch.device
    channels_last: bool
    # letterbox and tile: every input is put on a canvas of this (h, w), zeros after
    # normalisation around it; centred (letterbox) or at the top left (tiles).
    canvas: tuple[int, int] | None = None
    centred: bool = False

    @classmethod
    def for_model(cls, loaded: LoadedModel, device: torch.device, channels_last: bool) -> Preprocessor:
        spec = loaded.spec
        c = spec.in_channels
        mean = torch.tensor(loaded.mean, device=device).view(1, c, 1, 1) * 255.0
        std = torch.tensor(loaded.std, device=device).view(1, c, 1, 1) * 255.0
        canvas = spec.probe_size if spec.resize in ("letterbox", "tile") else None
        return cls(mean, std, loaded.stride, spec.resize == "pad", device, channels_last,
                   canvas, spec.resize == "letterbox")

    def tensor(self, arrays: list[np.ndarray]) -> torch.Tensor:
        """Stack, move to the device, normalise: (x/255 - mean)/std; on the canvas if any."""
        if self.canvas is not None:
            return self._on_canvas(arrays)
        if isinstance(arrays[0], torch.Tensor):  # decoded on the device already: CHW uint8
            x = torch.stack(arrays).float()
        else:
            if self.device.type == "cuda":  # stacked straight into page-locked memory, copied async
                staged = torch.empty((len(arrays), *arrays[0].shape), dtype=torch.uint8, pin_memory=True)
                np.stack(arrays, out=staged.numpy())
                batch = staged.to(self.device, non_blocking=True)
            else:
                batch = torch.from_numpy(np.stack(arrays))
            x = batch.permute(0, 3, 1, 2).float()
        # (x/255 - m)/s == (x - 255m)/(255s): one subtraction and one division per pixel.
        return ((x - self.mean) / self.std).contiguous(
            memory_format=torch.channels_last if self.channels_last else torch.contiguous_format
        )

    def _on_canvas(self, arrays: list[np.ndarray]) -> torch.Tensor:
        ch, cw = self.canvas  # type: ignore[misc]
        x = torch.zeros((len(arrays), self.mean.shape[1], ch, cw), device=self.device)
        for k, a in enumerate(arrays):
            rows, cols = content_slices(a.shape[0], a.shape[1], ch, cw, self.centred)
            t = torch.from_numpy(a).to(self.device).permute(2, 0, 1).float()
            x[k, :, rows, cols] = (t - self.mean[0]) / self.std[0]
        return x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)

    def pad(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Zero-pad bottom/right to the model's stride (`pad` models); returns the unpadded size."""
        h, w = x.shape[-2:]
        if self.pad_to_stride:
            ph, pw = stride_padding(h, w, self.stride)
            if ph or pw:
                x = F.pad(x, (0, pw, 0, ph))
        return x, (h, w)

    def run(self, forward: Callable[[torch.Tensor], torch.Tensor], arrays: list[np.ndarray]) -> torch.Tensor:
        """Logits for a batch, padding cropped off."""
        with torch.inference_mode():
            x, (h, w) = self.pad(self.tensor(arrays))
            y = forward(x)
            if self.pad_to_stride and y.ndim == 4:
                y = y[..., :h, :w]
            return y


# -- parity gate (the rule: parity_rule.py) ------------------------------------------------------------------------
PROBE_SEED = 0


def probe_arrays(spec: ModelSpec) -> list[list[np.ndarray]]:
    """Seeded random uint8 HWC batches of 2 at the probe size; pad models also get an odd size."""
    rng = np.random.default_rng(PROBE_SEED)
    h, w = spec.probe_size
    sizes = [(h, w)]
    if spec.resize == "pad":
        # A size off the stride grid exercises padding, cropping and the dynamic axes.
        sizes.append((max(8, h * 3 // 4 + 5), max(8, w // 2 + 3)))
    return [[rng.integers(0, 256, (sh, sw, spec.in_channels), dtype=np.uint8) for _ in range(2)]
            for sh, sw in sizes]
