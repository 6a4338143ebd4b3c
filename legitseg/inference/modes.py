"""Accuracy modes around a backend's `logits`: TTA views, checkpoint ensembles, letterbox
crop-back and sliding-window tiling (docs/accuracy.md).

`ModeRunner` is a Runner built from one backend runner per ensemble member. It only
ever calls their `logits` on uint8 HWC arrays, so torch and ONNX Runtime share every
mode (and the parity gate, run on the members, covers them). What it returns is in
logit space like any runner's output:

- one view of one model: the member's logits, untouched (letterbox: cropped back);
- several views or members: the mean of their probabilities, written back as logits
  (log-odds for sigmoid, log for softmax, temperature x log for severity), so that the
  one postprocessing path (resize, activation, threshold/argmax) gives exactly that mean.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from legitseg.images.geometry import blend_window, content_slices, tile_boxes
from legitseg.inference.activation import activation
from legitseg.inference.uncertainty import MEMBERS_ATTR, MemberStats
from legitseg.manifest.referral import uncertainty_on

if TYPE_CHECKING:
    from legitseg.inference.runners import Runner
    from legitseg.manifest.spec import ModelSpec
    from legitseg.models.factory import LoadedModel

IDENTITY = "identity"
# Forward inputs (tiles x views) per call in tile mode: bounds memory whatever the image size.
TILE_BATCH = {"cpu": 8, "cuda": 32}
# Probabilities are clamped away from 0 (and 1 for sigmoid) before going back to logits.
_TINY = 1e-30
_EPS = float(torch.finfo(torch.float32).eps)


def needs_modes(spec: ModelSpec) -> bool:
    """Whether a model's runner must be wrapped in a ModeRunner."""
    return bool(spec.tta) or spec.is_ensemble or spec.resize in ("letterbox", "tile")


# -- views --------------------------------------------------------------------------------
def view_array(a: np.ndarray, view: str) -> np.ndarray:
    """One TTA view of a uint8 HWC array (exact: flips and quarter turns move pixels only)."""
    if view == IDENTITY:
        return a
    if view == "hflip":
        out = a[:, ::-1]
    elif view == "vflip":
        out = a[::-1]
    elif view == "rot180":
        out = a[::-1, ::-1]
    elif view == "rot90":  # a quarter turn counter-clockwise
        out = np.rot90(a, 1, axes=(0, 1))
    elif view == "rot270":
        out = np.rot90(a, 3, axes=(0, 1))
    else:
        raise ValueError(f"unknown view {view!r}")
    return np.ascontiguousarray(out)


def invert_view(y: torch.Tensor, view: str) -> torch.Tensor:
    """Undo `view` on one output (C, h, w); severity outputs (classes,) need no undoing."""
    if y.ndim < 3 or view == IDENTITY:
        return y
    if view == "hflip":
        return y.flip(-1)
    if view == "vflip":
        return y.flip(-2)
    if view == "rot180":
        return y.flip(-2, -1)
    if view == "rot90":
        return torch.rot90(y, -1, dims=(-2, -1))
    if view == "rot270":
        return torch.rot90(y, 1, dims=(-2, -1))
    raise ValueError(f"unknown view {view!r}")


def to_logits_(p: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """Mean probabilities -> logits whose activation gives them back; in place."""
    if spec.task != "severity" and spec.classes == 1:  # segmentation, or a quality model's scalar head
        p.clamp_(_EPS, 1.0 - _EPS)
        p.div_(1.0 - p).log_()  # log(p / (1 - p))
        return p.mul_(spec.temperature) if spec.task == "quality" else p
    p.clamp_(min=_TINY).log_()
    return p.mul_(spec.temperature) if spec.task != "segmentation" else p


# -- the runner ----------------------------------------------------------------------------
class ModeRunner:
    """A Runner that applies a model's accuracy modes around its members' `logits`."""

    def __init__(self, loaded: LoadedModel, members: Sequence[Runner]):
        self.loaded = loaded
        self.members = list(members)
        first = self.members[0]
        self.device, self.precision, self.prep = first.device, first.precision, first.prep
        self.backend = "+".join(dict.fromkeys(m.backend for m in self.members))
        figures = [m.parity for m in self.members if m.parity is not None]
        self.parity = max(figures) if figures else None
        # run.json's parity_gate: the one member's gate (TTA, letterbox, tile) or one per ensemble member.
        gates = [getattr(m, "parity_gate", None) for m in self.members]
        self.parity_gate = gates[0] if len(gates) == 1 else ({"members": gates} if any(gates) else None)
        self.image_errors = tuple(dict.fromkeys(e for m in self.members for e in m.image_errors))
        spec = loaded.spec
        self.views = (IDENTITY, *spec.tta)
        self.averaged = len(self.views) * len(self.members)
        self.canvas = spec.input_size if spec.resize == "letterbox" else (
            spec.tile_size if spec.resize == "tile" else None)
        self.tile_batch = TILE_BATCH.get(self.device.type, 8)

    @property
    def name(self) -> str:
        return self.loaded.spec.name

    def batch_key(self, array: np.ndarray) -> tuple:
        """Images that may share a batch: all of them when the runner puts each on its own
        canvas (letterbox, tile), else those of one shape."""
        return () if self.canvas is not None else array.shape

    @torch.inference_mode()
    def logits(self, arrays: list[np.ndarray]) -> list[torch.Tensor] | torch.Tensor:
        """One output per array, in logit space (see the module docstring)."""
        if self.loaded.spec.resize == "tile":
            return self._tiled(arrays)
        if self.averaged == 1 and self.canvas is None:
            return self.members[0].logits(arrays)
        jobs = [(i, v, view_array(a, v)) for i, a in enumerate(arrays) for v in self.views]
        total: list[torch.Tensor | None] = [None] * len(arrays)
        # With uncertainty on, the views' spread and disagreement (docs/uncertainty.md).
        stats = ([MemberStats(self.loaded.spec) for _ in arrays]
                 if self.averaged > 1 and uncertainty_on(self.loaded.spec) else None)
        for k, y in self._outputs([x for _, _, x in jobs], len(arrays)):
            i, v, _ = jobs[k]
            y = invert_view(y, v)
            if self.averaged == 1:
                total[i] = y
                continue
            p = activation(y.float(), self.loaded.spec, dim=0)
            if stats is not None:
                stats[i].add(p)
            total[i] = p if total[i] is None else total[i].add_(p)
        if self.averaged == 1:
            return total  # type: ignore[return-value]
        out = [to_logits_(p.div_(self.averaged), self.loaded.spec) for p in total]  # type: ignore[union-attr]
        for y, s in zip(out, stats or (), strict=False):
            setattr(y, MEMBERS_ATTR, s.result())  # read by postprocessing: uncertainty.members_of
        return out

    def _outputs(self, inputs: list[np.ndarray], chunk: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(index into inputs, output cropped to the input's content) for every member in turn.

        Inputs of one shape (all of them, on a canvas) go through a member in calls of at most
        `chunk` inputs: the batch the engine asked for, so TTA views do not make the forward
        batch larger (on a CPU a batch of 8 costs more per image than two batches of 4).
        """
        groups: dict[tuple, list[int]] = {}
        for k, x in enumerate(inputs):
            groups.setdefault(self.batch_key(x), []).append(k)
        chunk = max(1, chunk)
        for member in self.members:
            for group in groups.values():
                for start in range(0, len(group), chunk):
                    idx = group[start:start + chunk]
                    out = member.logits([inputs[k] for k in idx])
                    for j, k in enumerate(idx):
                        yield k, self._crop(out[j], inputs[k].shape[:2])

    def _crop(self, y: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        if self.canvas is None or y.ndim < 3:
            return y
        rows, cols = content_slices(*shape, *y.shape[-2:], centred=self.loaded.spec.resize == "letterbox")
        return y[..., rows, cols]

    def _tiled(self, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        """Sliding window: tiles of all `arrays` in bounded chunks, blended per image.

        Each image holds one (C, H, W) sum of weighted probabilities and one (H, W) sum of
        weights; the sum becomes the mean in place and then logits in place.
        """
        spec = self.loaded.spec
        th, tw = spec.tile_size  # type: ignore[misc]
        window = torch.from_numpy(blend_window(th, tw, spec.blend)).to(self.device)
        acc = [torch.zeros((spec.classes, *a.shape[:2]), device=self.device) for a in arrays]
        weight = [torch.zeros(a.shape[:2], device=self.device) for a in arrays]
        tiles = [(i, box) for i, a in enumerate(arrays) for box in tile_boxes(*a.shape[:2], th, tw, spec.overlap)]
        per_call = max(1, self.tile_batch // len(self.views))
        for start in range(0, len(tiles), per_call):
            chunk = tiles[start:start + per_call]
            jobs = [(n, v, view_array(arrays[i][y0:y1, x0:x1], v))
                    for n, (i, (y0, x0, y1, x1)) in enumerate(chunk) for v in self.views]
            probs: list[torch.Tensor | None] = [None] * len(chunk)
            for k, y in self._outputs([x for _, _, x in jobs], len(jobs)):
                n, v, _ = jobs[k]
                p = activation(invert_view(y, v).float(), spec, dim=0)
                probs[n] = p if probs[n] is None else probs[n].add_(p)
            for n, (i, (y0, x0, y1, x1)) in enumerate(chunk):
                w = window[: y1 - y0, : x1 - x0]
                acc[i][:, y0:y1, x0:x1].add_(probs[n].mul_(w / self.averaged))  # type: ignore[union-attr]
                weight[i][y0:y1, x0:x1].add_(w)
            del probs, jobs
        out = []
        for p, w in zip(acc, weight, strict=True):
            out.append(to_logits_(p.div_(w), spec))
        acc.clear()
        return out


def tile_count(h: int, w: int, spec: ModelSpec) -> int:
    """Forward inputs one h x w image costs in tile mode (tiles x views), for docs and logs."""
    th, tw = spec.tile_size  # type: ignore[misc]
    return len(tile_boxes(h, w, th, tw, spec.overlap)) * (1 + len(spec.tta)) * len(spec.weight_files)


def forward_cost(spec: ModelSpec) -> int:
    """Forward inputs per image relative to the plain model (views x members), tiles aside."""
    return math.prod((1 + len(spec.tta), len(spec.weight_files)))
