"""Device choice, the TF32 switch and the torch backend (SPEC 4.2, 4.5).

A `TorchRunner` wraps one loaded model on one device. Input arrays arrive as
uint8 HWC from the decode workers; normalisation runs on the model's device so
that only uint8 crosses the host-to-device copy.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from legitseg.errors import RuntimeFailure, UsageError
from legitseg.images.decoded import Prep
from legitseg.inference.precision import LAYOUTS, autocast_dtype
from legitseg.inference.runners import Preprocessor, prep_for

if TYPE_CHECKING:
    from legitseg.models.factory import LoadedModel

log = logging.getLogger(__name__)


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


# Where TensorFloat-32 is switched: (torch.backends path, legacy flag object). torch >= 2.9 spells it
# `fp32_precision` ("ieee" | "tf32") on cuda.matmul and cudnn.conv; older torch only has `allow_tf32`.
_TF32 = ((("cuda", "matmul"), ("cuda", "matmul")), (("cudnn", "conv"), ("cudnn",)))


def _backend(path: tuple[str, ...]):
    obj = torch.backends
    for part in path:
        obj = getattr(obj, part, None)
    return obj


def _new_api() -> bool:
    return all(hasattr(_backend(new), "fp32_precision") for new, _ in _TF32)


@contextlib.contextmanager
def tf32_switch(precision: str) -> Iterator[None]:
    """TensorFloat-32 off for fp32 (IEEE fp32 math on every device), on for tf32; restored after.

    PyTorch lets cuDNN use TF32 for convolutions by default, so without this an
    "fp32" run on an Ampere-or-newer GPU is not fp32. On torch >= 2.9 the switch goes
    through `fp32_precision`: reading the legacy `allow_tf32` flags raises once a
    caller has used that API ("mix of the legacy and new APIs"), so they are read only
    where they answer (as provenance.math_mode, which reports the effective math, does) and written back only where the
    restore left them reading differently, which keeps a caller on either API readable.
    Half precisions leave the flags as they are.
    """
    from legitseg.provenance import _legacy

    if precision not in ("fp32", "tf32"):
        yield
        return
    new = _new_api()
    legacy = [(_backend(old), _legacy(lambda o=_backend(old): o.allow_tf32)) for _, old in _TF32]
    saved = [(_backend(path), _backend(path).fp32_precision) for path, _ in _TF32] if new else []
    allow = precision == "tf32"
    try:
        for obj, _ in saved:
            obj.fp32_precision = "tf32" if allow else "ieee"
        if not new:
            for obj, _ in legacy:
                obj.allow_tf32 = allow
        yield
    finally:
        for obj, value in saved:
            obj.fp32_precision = value
        for obj, value in legacy:
            if value is not None and _legacy(lambda o=obj: o.allow_tf32) != value:
                obj.allow_tf32 = value


def half_weights(loaded: LoadedModel, precision: str) -> torch.dtype | None:
    """The half type a model's weights are cast to: its manifest asks (`half_weights`) and the run is fp16/bf16."""
    return autocast_dtype(precision) if getattr(loaded.spec, "half_weights", False) else None


@dataclass
class TorchRunner:
    """Forward passes of one model on one device, in torch.

    Works on its own copy of the module when the device or memory format differs,
    so the loaded module (which the ONNX export and the parity gate also use) is never changed.
    On a GPU the first batch chooses the fastest variant (`tune`).
    """

    loaded: LoadedModel
    device: torch.device
    precision: str = "fp32"
    channels_last: bool = True
    backend: str = "torch"
    parity: float | None = None
    parity_gate: dict | None = None  # after a failed ONNX Runtime gate: its figures (parity_rule.py)
    image_errors: tuple[type[BaseException], ...] = field(default=())
    tune_layout: bool | None = None  # None: on CUDA
    cache_dir: Path | None = None  # the layout chosen is remembered under it (layouts.json); None: not remembered

    def __post_init__(self) -> None:
        self.prep: Prep = prep_for(self.loaded)
        self.use_variant("channels_last" if self.channels_last else "contiguous")
        self.tuned = not (self.device.type == "cuda" if self.tune_layout is None else self.tune_layout)

    def use_variant(self, variant: str) -> None:
        """Module copy and input layout for one variant (a key of `precision.LAYOUTS`); the weight type is the model's."""
        fmt = LAYOUTS[variant]
        module = copy.deepcopy(self.loaded.module).to(self.device, memory_format=fmt)
        self.half = half_weights(self.loaded, self.precision)
        self.module = module.to(self.half) if self.half is not None else module
        self.channels_last = variant == "channels_last"
        self.pre = Preprocessor.for_model(self.loaded, self.device, self.channels_last)
        # run.json's models.<name>.variant: the layout, "+half" where the weights are in the half type
        self.variant = variant + ("+half" if self.half is not None else "")
        self.layout = variant

    @property
    def name(self) -> str:
        return self.loaded.spec.name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits as float32 on the device."""
        dtype = autocast_dtype(self.precision)
        if self.half is not None:  # weights in the half type already: the input follows, no autocast
            x, ctx = x.to(self.half), contextlib.nullcontext()
        else:
            ctx = (torch.autocast(self.device.type, dtype=dtype) if dtype is not None
                   else contextlib.nullcontext())
        # TF32 is switched around each forward call, never held across a caller's yield:
        # two generators of different precisions may interleave in one thread (api.Predictor.predict).
        with tf32_switch(self.precision), torch.inference_mode(), ctx:
            y = self.module(x)
        return y.float()

    def logits(self, arrays: list[np.ndarray]) -> torch.Tensor:
        """Logits for a batch of same-shape inputs; padding (pad models) already cropped off."""
        if not self.tuned:
            from legitseg.inference.layout_tuning import tune

            tune(self, arrays)
            self.tuned = True
        return self.pre.run(self.forward, arrays)
