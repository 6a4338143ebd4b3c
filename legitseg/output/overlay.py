"""Drawing results on photographs: the overlays of `run --overlay` and the report's thumbnails.

One drawing for both, so a thumbnail in the report and the overlay file of the same
image agree: each non-background class of a mask filled semi-transparently in its
colour and outlined; a severity result written as text in the top-left corner.
Colours come from the manifest's `colors:` per label, else from Okabe and Ito's
colour-blind-safe palette by class index.

Pure pixels: no file layout (that is `writers.Sink`'s), no torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:
    from legitseg.manifest.spec import ModelSpec

RGB = tuple[int, int, int]
# Okabe & Ito's colour-blind-safe palette, class 1 first (RGB).
PALETTE: tuple[RGB, ...] = ((230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66),
                            (0, 114, 178), (213, 94, 0), (204, 121, 167))
ALPHA = 0.45
JPEG_QUALITY = 90
# Outline width in pixels per 1000 pixels of the photograph's longer side (at least 1):
# 4 px on a 4000 px photograph, visible at full size without hiding the lesion's edge.
OUTLINE_PER_1000 = 1.0


def colour(label_index: int) -> RGB:
    """Default colour of class `label_index` (>= 1)."""
    return PALETTE[(label_index - 1) % len(PALETTE)]


def hex_colour(rgb: Sequence[int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def outline_width(shape: Sequence[int]) -> int:
    """Outline thickness for a photograph of `shape` (h, w, ...)."""
    return max(1, round(max(shape[0], shape[1]) * OUTLINE_PER_1000 / 1000))


@dataclass(frozen=True)
class Style:
    """How one model's results are drawn: its task, label names and a colour per class >= 1."""

    model: str
    task: str
    labels: tuple[str, ...]  # class 0 (background) first
    colours: tuple[RGB, ...]  # class 1 first

    @classmethod
    def of(cls, spec: ModelSpec) -> Style:
        return cls.from_labels(spec.name, spec.task, spec.label_names, spec.colors or {})

    @classmethod
    def from_labels(cls, model: str, task: str, labels: Sequence[str],
                    colors: Mapping[str, Sequence[int]] | None = None) -> Style:
        colors = colors or {}
        drawn = tuple((tuple(colors[name]) if name in colors else colour(i))  # type: ignore[misc]
                      for i, name in enumerate(labels[1:], 1))
        return cls(model, task, tuple(labels), drawn)

    def hex_colours(self) -> dict[str, str]:
        """Label name -> "#rrggbb", background excluded (for run.json and the report's legend)."""
        return {label: hex_colour(c) for label, c in zip(self.labels[1:], self.colours, strict=True)}

    def colour_of(self, class_index: int) -> RGB:
        if 1 <= class_index <= len(self.colours):
            return self.colours[class_index - 1]
        return colour(class_index)


def tint(rgb: np.ndarray, mask: np.ndarray, alpha: float = ALPHA, colours: Sequence[RGB] | None = None,
         thickness: int = 1) -> np.ndarray:
    """The photograph with every non-zero class filled semi-transparently and outlined.

    `mask` must have the photograph's height and width; class c takes `colours[c - 1]`
    (default: the palette). The outline (`thickness` px, centred on the region's edge)
    is drawn after every fill. Returns a new uint8 RGB array; raises ValueError on a
    size mismatch.
    """
    if rgb.shape[:2] != mask.shape[:2]:
        raise ValueError(f"mask {mask.shape[:2]} and photograph {rgb.shape[:2]} differ in size")

    small = mask.dtype == np.uint8
    # Whole-image OpenCV passes (SIMD; no float copy and no boolean indexing of a 4000x3000
    # photograph): several times faster on 12 MP (docs/benchmarks.md, "Numbers behind the defaults").
    present = (cv2.calcHist([mask], [0], None, [256], [0, 256]).ravel() if small
               else np.bincount(mask.ravel(), minlength=2))
    labels = [int(v) for v in np.flatnonzero(present) if v != 0]
    table = np.zeros((max(256, len(present)), 3), np.uint8)
    for v in labels:
        table[v] = tuple(colours[v - 1]) if colours and v <= len(colours) else colour(v)
    if small:
        paint = cv2.merge([cv2.LUT(mask, np.ascontiguousarray(table[:256, c])) for c in range(3)])
    else:
        paint = table[mask]
    blended = cv2.addWeighted(np.ascontiguousarray(rgb, np.uint8), 1 - alpha, paint, alpha, 0.0)
    out = np.array(rgb, dtype=np.uint8, copy=True)
    cv2.copyTo(blended, (mask != 0).view(np.uint8), out)
    for v in labels:
        contours, _ = cv2.findContours((mask == v).view(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, tuple(int(c) for c in table[v]), thickness)
    return out


def caption(rgb: np.ndarray, text: str) -> np.ndarray:
    """`text` in white on a dark box in the top-left corner, sized to the photograph. In place."""
    h, w = rgb.shape[:2]
    scale = max(0.4, min(h, w) / 700)
    thick = max(1, round(scale * 2))
    font = cv2.FONT_HERSHEY_SIMPLEX
    (tw, th), base = cv2.getTextSize(text, font, scale, thick)
    pad = max(2, round(th * 0.4))
    cv2.rectangle(rgb, (0, 0), (min(w - 1, tw + 2 * pad), min(h - 1, th + base + 2 * pad)), (0, 0, 0), cv2.FILLED)
    cv2.putText(rgb, text, (pad, pad + th), font, scale, (255, 255, 255), thick, cv2.LINE_AA)
    return rgb


def severity_text(model: str, grade: int, score: float) -> str:
    return f"{model}: grade {grade}, score {score:.2f}"


def segmentation_overlay(rgb: np.ndarray, mask: np.ndarray, style: Style) -> np.ndarray:
    return tint(rgb, mask, colours=style.colours, thickness=outline_width(rgb.shape))


def severity_overlay(rgb: np.ndarray, style: Style, grade: int, score: float) -> np.ndarray:
    return caption(np.array(rgb, dtype=np.uint8, copy=True), severity_text(style.model, grade, score))


def encode_jpeg(rgb: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """RGB -> JPEG bytes. Raises ValueError when OpenCV cannot encode it."""
    # Full-resolution colour (4:4:4): with the usual 4:2:0 a 1-4 px coloured outline smears
    # into its neighbours (measured: mean error 22 vs 5 levels on a fragmented 96x128 mask).
    params = [cv2.IMWRITE_JPEG_QUALITY, quality, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise ValueError(f"OpenCV could not encode a {rgb.shape} image as JPEG")
    return buf.tobytes()
