"""An independent implementation of SPEC section 4, for checking legitseg's outputs.

Written from the SPEC text with plain Pillow, numpy, torch and smp, and none of
legitseg's code: images are decoded by Pillow (OpenCV decodes them in legitseg),
EXIF orientation comes from `ImageOps.exif_transpose`, 16-bit PNGs are read by
the small decoder below, models are built with `smp.create_model` /
`smp.encoders.get_encoder` and loaded from the safetensors file the manifest
names, and connected regions are counted by label propagation in numpy. Only the
`stretch` resize uses cv2.resize, because SPEC 4.2 prescribes it.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from safetensors.torch import load_file
from segmentation_models_pytorch.base import ClassificationHead
from torch import nn

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CV_INTERPOLATION = {"linear": cv2.INTER_LINEAR, "area": cv2.INTER_AREA,
                    "cubic": cv2.INTER_CUBIC, "nearest": cv2.INTER_NEAREST}


# -- 4.1 decoding ------------------------------------------------------------------------
def _png_header(data: bytes) -> tuple[int, int, int, int, int]:
    w, h, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", data[16:29])
    return w, h, depth, color, interlace


def decode_png16(data: bytes) -> np.ndarray:
    """A non-interlaced 16-bit grayscale or RGB PNG -> (h, w) or (h, w, 3) uint16."""
    w, h, depth, color, interlace = _png_header(data)
    if depth != 16 or color not in (0, 2) or interlace:
        raise ValueError(f"decode_png16 reads 16-bit gray/RGB PNGs only (depth {depth}, color {color})")
    idat, pos = b"", 8
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        if kind == b"IDAT":
            idat += data[pos + 8:pos + 8 + length]
        pos += 12 + length
    channels = 1 if color == 0 else 3
    bpp = 2 * channels
    stride = w * bpp
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, stride + 1)
    out = np.zeros((h, stride), np.int64)
    prev = np.zeros(stride, np.int64)
    for r in range(h):
        kind, line = raw[r, 0], raw[r, 1:].astype(np.int64)
        cur = np.zeros(stride, np.int64)
        for i in range(stride):
            left = cur[i - bpp] if i >= bpp else 0
            up = prev[i]
            upleft = prev[i - bpp] if i >= bpp else 0
            if kind == 0:
                pred = 0
            elif kind == 1:
                pred = left
            elif kind == 2:
                pred = up
            elif kind == 3:
                pred = (left + up) // 2
            else:
                p = left + up - upleft
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - upleft)
                pred = left if pa <= pb and pa <= pc else up if pb <= pc else upleft
            cur[i] = (line[i] + pred) & 0xFF
        out[r], prev = cur, cur
    samples = out.astype(np.uint8).reshape(h, w * channels, 2)
    values = samples[..., 0].astype(np.uint16) * 256 + samples[..., 1]
    return values.reshape(h, w) if channels == 1 else values.reshape(h, w, 3)


def to8(values: np.ndarray) -> np.ndarray:
    """16-bit -> 8-bit by value/257, rounded (SPEC 4.1)."""
    return np.round(values.astype(np.float64) / 257.0).astype(np.uint8)


def decode(path: Path) -> np.ndarray:
    """The oriented 8-bit RGB picture of an image file, (H, W, 3) uint8."""
    data = Path(path).read_bytes()
    if data[:8] == PNG_SIGNATURE and _png_header(data)[2] == 16:
        v = to8(decode_png16(data))
        return np.repeat(v[..., None], 3, axis=2) if v.ndim == 2 else v
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode.startswith("I;16") or im.mode == "I":
            v = to8(np.asarray(im))
            return np.repeat(v[..., None], 3, axis=2)
        return np.asarray(im.convert("RGB")).copy()


# -- models (SPEC 3) ---------------------------------------------------------------------
class Severity(nn.Module):
    def __init__(self, encoder: str, classes: int, pooling: str):
        super().__init__()
        self.encoder = smp.encoders.get_encoder(encoder, in_channels=3, weights=None)
        self.classification_head = ClassificationHead(self.encoder.out_channels[-1], classes,
                                                      pooling=pooling, dropout=0)

    def forward(self, x):
        return self.classification_head(self.encoder(x)[-1])


def build(entry: dict, manifest_dir: Path) -> nn.Module:
    """The model of one manifest entry (a dict as written to models.yaml), weights loaded strictly."""
    if entry["task"] == "severity":
        module = Severity(entry["encoder"], entry["classes"], entry.get("pooling", "avg"))
    else:
        module = smp.create_model(entry["arch"], encoder_name=entry["encoder"], encoder_weights=None,
                                  in_channels=3, classes=entry["classes"], **entry.get("arch_params", {}))
    module.load_state_dict(load_file(str(manifest_dir / entry["weights"])), strict=True)
    return module.eval()


def mean_std(entry: dict) -> tuple[np.ndarray, np.ndarray]:
    norm = entry.get("normalize")
    if norm:
        return np.asarray(norm["mean"], np.float32), np.asarray(norm["std"], np.float32)
    import timm  # the encoder's own settings, as the pretrained config timm ships says

    cfg = timm.get_pretrained_cfg(entry["encoder"].removeprefix("tu-"))
    return np.asarray(cfg.mean, np.float32), np.asarray(cfg.std, np.float32)


# -- 4.2 - 4.4 ---------------------------------------------------------------------------
@dataclass
class Segmentation:
    probabilities: np.ndarray  # (C, H, W) float32
    mask: np.ndarray  # (H, W)
    ambiguous: np.ndarray  # (H, W) bool: within `tie` of the threshold / of a tie


@dataclass
class Severity_:
    probabilities: np.ndarray
    grade: int
    score: float


def model_input(rgb: np.ndarray, entry: dict) -> tuple[torch.Tensor, tuple[int, int]]:
    img = rgb
    if entry.get("resize", "stretch") == "stretch":
        h, w = entry["input_size"]
        img = cv2.resize(rgb, (w, h), interpolation=CV_INTERPOLATION[entry.get("interpolation", "linear")])
    mean, std = mean_std(entry)
    x = (img.astype(np.float32) / 255.0 - mean) / std
    t = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]
    size = t.shape[-2:]
    if entry.get("resize", "stretch") == "pad":
        stride = 32  # 2 ** encoder depth 5: what smp's Unet needs
        t = F.pad(t, (0, -size[1] % stride, 0, -size[0] % stride))
    return t, (int(size[0]), int(size[1]))


def predict(module: nn.Module, entry: dict, rgb: np.ndarray, tie: float = 1e-3):
    """SPEC 4.2-4.4 for one image and one model."""
    x, (h, w) = model_input(rgb, entry)
    with torch.no_grad():
        y = module(x).double()
    if entry["task"] == "severity":
        p = torch.softmax(y[0] / entry.get("temperature", 1.0), dim=0).numpy()
        values = np.asarray(entry.get("class_values") or range(entry["classes"]), np.float64)
        return Severity_(p, int(p.argmax()), float((p * values).sum()))
    y = y[..., :h, :w]
    up = F.interpolate(y, size=rgb.shape[:2], mode="bilinear", align_corners=False)[0]
    if entry["classes"] == 1:
        p = torch.sigmoid(up).numpy()
        threshold = entry.get("threshold", 0.5)
        mask = (p[0] > threshold).astype(np.uint8)
        ambiguous = np.abs(p[0] - threshold) < tie
    else:
        p = torch.softmax(up, dim=0).numpy()
        mask = p.argmax(axis=0).astype(np.uint8)
        top2 = np.sort(p, axis=0)[-2:]
        ambiguous = (top2[1] - top2[0]) < tie
    return Segmentation(p.astype(np.float32), mask, ambiguous)


def count_regions(binary: np.ndarray) -> int:
    """Connected regions of True pixels, 8-connectivity, by propagating the largest label."""
    h, w = binary.shape
    labels = np.where(binary, np.arange(1, h * w + 1).reshape(h, w), 0)
    while True:
        padded = np.pad(labels, 1)
        neighbours = np.max([padded[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
                             for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=0)
        grown = np.where(binary, neighbours, 0)
        if np.array_equal(grown, labels):
            return len(np.unique(labels[binary]))
        labels = grown


def label_names(entry: dict, name: str) -> list[str]:
    if entry.get("labels"):
        return list(entry["labels"])
    if entry["classes"] == 1:
        return ["background", name]
    return ["background"] + [f"class_{i}" for i in range(1, entry["classes"])]


def mask_stats(mask: np.ndarray, labels: list[str]) -> tuple[dict[str, float], dict[str, int]]:
    """area_fraction and components per non-background label (SPEC 5)."""
    area = {labels[i]: float((mask == i).sum()) / mask.size for i in range(1, len(labels))}
    components = {labels[i]: count_regions(mask == i) for i in range(1, len(labels))}
    return area, components
