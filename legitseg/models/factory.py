"""Model spec -> nn.Module with verified weights (SPEC section 3).

The only module that calls smp. Nothing here reaches a hub: `legitseg/__init__`
sets HF_HUB_OFFLINE before smp is imported, encoders are built with
`encoder_weights=None`, and normalisation comes from the manifest or from the
encoder settings that ship inside smp and timm.
"""

from __future__ import annotations

import difflib
import logging
import time
import warnings
from dataclasses import dataclass

# HF_HUB_OFFLINE is set in legitseg/__init__.py, the one place, which Python runs
# before this module (and so before smp and huggingface_hub) is imported.
import segmentation_models_pytorch as smp
import torch
from segmentation_models_pytorch.base import ClassificationHead
from segmentation_models_pytorch.encoders._legacy_pretrained_settings import (
    pretrained_settings as _SMP_LOCAL_SETTINGS,
)
from torch import nn

from legitseg.errors import ManifestError, WeightsError
from legitseg.images.geometry import stride_padding
from legitseg.manifest.safe_yaml import clip, short
from legitseg.manifest.spec import ModelSpec
from legitseg.models.weights import (
    load_strict,
    parse_state_dict,
    read_pretrained_config,
    read_verified,
)

log = logging.getLogger(__name__)


class SeverityClassifier(nn.Module):
    """Encoder + smp ClassificationHead on the deepest feature map; returns logits (N, classes).

    Severity and quality models (a quality model's scalar head is classes: 1) share it."""

    def __init__(self, encoder: nn.Module, classes: int, pooling: str):
        super().__init__()
        self.encoder = encoder
        self.classification_head = ClassificationHead(
            encoder.out_channels[-1], classes, pooling=pooling, dropout=0
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classification_head(self.encoder(x)[-1])


@dataclass
class LoadedModel:
    """A model ready for inference plus what the pipeline needs to feed it."""

    spec: ModelSpec
    module: nn.Module
    mean: tuple[float, ...]
    std: tuple[float, ...]
    stride: int
    build_seconds: float
    parameters: int
    weight_bytes: int
    # Ensembles: every member, each with its single-file spec (`module` is the first one's).
    members: tuple[LoadedModel, ...] = ()

    def probe_input_size(self) -> tuple[int, int]:
        """(h, w) of a dummy input (models check, the ONNX export's example): the probe size,
        padded to the stride for `pad` models as a run pads them. A stretch model gets exactly
        its input_size: padding it would hide a size the model refuses."""
        h, w = self.spec.probe_size
        if self.spec.resize != "pad":
            return h, w
        ph, pw = stride_padding(h, w, self.stride)
        return h + ph, w + pw


def _check_timm_name(spec: ModelSpec) -> None:
    if not spec.encoder.startswith("tu-"):
        return
    import timm

    name = spec.encoder[3:]
    if not timm.is_model(name):
        # Spelling neighbours first (resnet51 -> resnet50); else names sharing the first word.
        stem = name.split(".")[0]
        close = difflib.get_close_matches(stem, timm.list_models(), n=8, cutoff=0.6)
        close = close or timm.list_models(f"*{stem.split('_')[0]}*")[:10]
        raise ManifestError(
            f"model {spec.name!r}: field 'encoder': unknown timm model {name!r} in {spec.encoder!r}"
            + (f"; similar: {', '.join(close)}" if close else "")
        )


def build_module(spec: ModelSpec) -> nn.Module:
    """Build the untrained architecture for `spec` (no weights, no network).

    Raises ManifestError when smp or timm refuse the combination.
    """
    _check_timm_name(spec)
    # smp's own deprecation notices are about its API, not the user's model: silenced around
    # the call only, so no filter is left installed in the caller's process. catch_warnings
    # swaps process-wide state; a run builds its models before its worker threads start.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="segmentation_models_pytorch")
        return _build(spec)


def _build(spec: ModelSpec) -> nn.Module:
    try:
        if spec.task != "segmentation":  # severity, quality: an encoder and a classification head
            encoder = smp.encoders.get_encoder(spec.encoder, in_channels=spec.in_channels, weights=None)
            return SeverityClassifier(encoder, spec.classes, spec.pooling)
        return smp.create_model(
            spec.arch,
            encoder_name=spec.encoder,
            encoder_weights=None,
            in_channels=spec.in_channels,
            classes=spec.classes,
            **spec.arch_params,
        )
    except (KeyError, ValueError, TypeError, AttributeError, RuntimeError) as err:
        what = f"{spec.arch} + {spec.encoder}" if spec.task == "segmentation" else spec.encoder
        raise ManifestError(
            f"model {spec.name!r}: smp cannot build {what} with arch_params {short(spec.arch_params)}: "
            f"{clip(str(err), 500)}"
        ) from err


def resolve_normalize(spec: ModelSpec) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """mean/std from the manifest, else from the encoder's settings shipped inside smp/timm.

    Never calls smp's get_preprocessing_params (it downloads a config from a hub).
    """
    if spec.normalize is not None:
        return spec.normalize.mean, spec.normalize.std
    settings = None
    if spec.encoder.startswith("tu-"):
        import timm

        try:
            cfg = timm.models.get_pretrained_cfg(spec.encoder[3:])
        except (RuntimeError, KeyError, ValueError):
            cfg = None
        if cfg is not None and cfg.mean and cfg.std:
            settings = {"mean": cfg.mean, "std": cfg.std}
    else:
        by_weights = _SMP_LOCAL_SETTINGS.get(spec.encoder, {})
        settings = by_weights.get("imagenet") or next(iter(by_weights.values()), None)
    if not settings or "mean" not in settings or "std" not in settings:
        raise ManifestError(
            f"model {spec.name!r}: field 'normalize': encoder {spec.encoder!r} has no local "
            "preprocessing settings; set normalize: {mean: [...], std: [...]} in the manifest"
        )
    mean, std = tuple(float(v) for v in settings["mean"]), tuple(float(v) for v in settings["std"])
    if spec.in_channels != len(mean):
        # A 1-channel model trained from an RGB encoder: use the mean of the RGB settings.
        mean, std = (sum(mean) / len(mean),), (sum(std) / len(std),)
    return mean, std


def model_stride(module: nn.Module) -> int:
    """Height and width must be multiples of this (the encoder's output stride)."""
    encoder = getattr(module, "encoder", None)
    return int(getattr(encoder, "output_stride", 32) or 32)


def check_input_size(spec: ModelSpec, module: nn.Module, stride: int) -> None:
    """A `stretch` model is fed exactly input_size: refuse a size the architecture cannot take.

    smp's own forward refuses height or width not divisible by the encoder's output
    stride for every architecture that sets `requires_divisible_input_shape` (Unet
    resizes inside its decoder and does not). Severity models pool globally and take
    any size; `pad` models are padded up to the stride at run time.
    Raises ManifestError naming the model, the size, the stride and the nearest valid sizes.
    """
    if spec.task != "segmentation" or spec.resize == "pad":
        return
    if not getattr(module, "requires_divisible_input_shape", True):
        return
    field = "tile_size" if spec.resize == "tile" else "input_size"
    h, w = spec.probe_size
    if h % stride == 0 and w % stride == 0:
        return
    down = [v - v % stride for v in (h, w)]
    up = [v + p for v, p in zip((h, w), stride_padding(h, w, stride), strict=True)]
    choices = " or ".join(str(c) for c in ([down] if min(down) > 0 else []) + [up])
    raise ManifestError(
        f"model {spec.name!r}, field '{field}': {[h, w]} is not divisible by {stride}, the output "
        f"stride of {spec.arch} + {spec.encoder}; with resize '{spec.resize}' the model is fed exactly this "
        f"size, so height and width must be multiples of {stride}: nearest valid sizes {choices}"
    )


def check_pretrained_config(spec: ModelSpec, config: dict) -> None:
    """A save_pretrained folder's config.json must describe the manifest's model."""
    expected = {
        "_model_class": spec.arch,
        "encoder_name": spec.encoder,
        "in_channels": spec.in_channels,
        "classes": spec.classes,
        **spec.arch_params,
    }
    diffs = []
    for key, want in expected.items():
        if key not in config:
            if key in spec.arch_params or key == "_model_class":
                diffs.append(f"{key}: manifest {want!r}, config.json has none")
            continue
        have = config[key]
        # Compared loosely (class name case, JSON list vs YAML list/tuple) but reported as written.
        have_cmp, want_cmp = have, want
        if key == "_model_class":
            have_cmp, want_cmp = str(have).lower(), str(want).lower()
        if isinstance(have, list):
            have_cmp = tuple(have)
            want_cmp = tuple(want) if isinstance(want, list | tuple) else want
        if have_cmp != want_cmp:
            diffs.append(f"{key}: manifest {want!r}, config.json {have!r}")
    if diffs:
        raise WeightsError(
            f"model {spec.name!r}: {spec.weights}/config.json disagrees with the manifest: " + "; ".join(diffs)
        )


def load_model(spec: ModelSpec) -> LoadedModel:
    """Verify the sha256, build the architecture, load the weights strictly, set eval mode.

    An ensemble loads each member in turn (one file's bytes in memory at a time) and
    returns them in `members`. The bytes that are hashed are the bytes that are parsed.
    Raises WeightsError or ManifestError (both exit 3).
    """
    if not spec.is_ensemble:
        return _load_one(spec)
    members = tuple(_load_one(spec.member(i)) for i in range(len(spec.weight_files)))
    first = members[0]
    return LoadedModel(spec, first.module, first.mean, first.std, first.stride,
                       sum(m.build_seconds for m in members), sum(m.parameters for m in members),
                       sum(m.weight_bytes for m in members), members)


def _load_one(spec: ModelSpec) -> LoadedModel:
    started = time.perf_counter()
    data = read_verified(spec.weights, spec.sha256, spec.name)
    if spec.weights.is_dir():
        if spec.task != "segmentation":
            raise WeightsError(
                f"model {spec.name!r}: save_pretrained folders hold segmentation models; "
                "save severity and quality classifiers as .safetensors"
            )
        check_pretrained_config(spec, read_pretrained_config(spec.weights, spec.name))
    state = parse_state_dict(data, spec.weights, spec.name)
    del data
    module = build_module(spec)
    stride = model_stride(module)
    check_input_size(spec, module, stride)
    load_strict(module, state, spec.name, spec.weights, spec.ignore_keys)
    module.eval()
    mean, std = resolve_normalize(spec)
    params = sum(p.numel() for p in module.parameters())
    weight_bytes = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    elapsed = time.perf_counter() - started
    log.debug("built %s in %.2fs (%d parameters)", spec.name, elapsed, params)
    return LoadedModel(spec, module, mean, std, stride, elapsed, params, weight_bytes)
