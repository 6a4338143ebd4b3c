"""Synthetic dermatology-like photographs with ground truth, for the bundled demo experts.

Not part of the installed package. Every sample is a pure function of (seed, index):
`make_sample(np.random.default_rng([seed, stream, index]), ...)` always draws the
same picture, so the demo weights and example images can be regenerated exactly.

A sample is a skin photograph (Fitzpatrick I-VI base tone, low-frequency tone
variation, pores, grain, lighting gradient, vignette, white-balance drift, sensor
noise, defocus) with
  * pigmented lesions with irregular borders and inner texture,
  * erythema: diffuse reddish regions (halos around lesions and free patches) whose
    blend strength is the "redness intensity",
  * hair strands (drawn over everything; they do not change the ground truth),
  * partial occlusions (dermatoscope field stop, ruler, cloth): occluded pixels are
    background in the ground truth,
and its ground truth:
  * mask: uint8, 0 background, 1 lesion, 2 erythema (erythema excludes lesion pixels);
  * burden = sum over visible erythema pixels of the local redness strength, divided
    by the number of image pixels (an area fraction weighted by intensity, 0..~0.4);
  * grade = min(9, floor(burden / GRADE_STEP)), the severity 0..9.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

LABELS = ("background", "lesion", "erythema")
BACKGROUND, LESION, ERYTHEMA = 0, 1, 2
GRADES = 10
GRADE_STEP = 0.03  # burden per grade: grade 9 means burden >= 0.27

# Base skin colours (sRGB) for Fitzpatrick types I..VI; a sample interpolates between
# neighbours so tones are continuous across the range.
FITZPATRICK_RGB = np.array(
    [
        (244, 212, 194),
        (230, 188, 158),
        (206, 158, 120),
        (172, 120, 86),
        (122, 82, 57),
        (80, 54, 40),
    ],
    dtype=np.float32,
)


@dataclass
class Sample:
    image: np.ndarray  # (H, W, 3) uint8 RGB
    mask: np.ndarray  # (H, W) uint8 class indices, see LABELS
    burden: float
    grade: int
    fitzpatrick: int  # 1..6


def grade_of(burden: float) -> int:
    return int(min(GRADES - 1, np.floor(burden / GRADE_STEP)))


# -- small building blocks -------------------------------------------------------------


def smooth_noise(rng: np.random.Generator, h: int, w: int, cells: float) -> np.ndarray:
    """Zero-mean, unit-std noise with features about min(h, w)/cells pixels wide."""
    gh = max(2, int(round(cells * h / min(h, w))))
    gw = max(2, int(round(cells * w / min(h, w))))
    small = rng.standard_normal((gh, gw), dtype=np.float32)
    big = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    return (big - big.mean()) / (big.std() + 1e-6)


def blob_points(rng: np.random.Generator, irregularity: float, harmonics: int = 9) -> np.ndarray:
    """Unit-radius irregular closed contour (radial Fourier series), shape (n, 2)."""
    theta = np.linspace(0, 2 * np.pi, 180, endpoint=False)
    r = np.ones_like(theta)
    for k in range(2, harmonics + 1):
        amp = irregularity * rng.uniform(0, 1) / k**0.9
        r += amp * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    r = np.clip(r, 0.45, None)
    aspect = rng.uniform(0.65, 1.0)
    rot = rng.uniform(0, np.pi)
    x, y = r * np.cos(theta), aspect * r * np.sin(theta)
    return np.stack([x * np.cos(rot) - y * np.sin(rot), x * np.sin(rot) + y * np.cos(rot)], 1)


def fill_shape(h: int, w: int, pts: np.ndarray, cx: float, cy: float, radius: float, scale: int = 1) -> np.ndarray:
    """Binary (float32) mask of the contour placed at (cx, cy) with the given radius."""
    canvas = np.zeros((h, w), np.uint8)
    poly = np.round((pts * radius + (cx, cy)) * 4 / scale).astype(np.int32)
    cv2.fillPoly(canvas, [poly], 1, lineType=cv2.LINE_8, shift=2)
    return canvas.astype(np.float32)


def soften(mask: np.ndarray, sigma: float) -> np.ndarray:
    if sigma < 0.3:
        return mask
    return cv2.GaussianBlur(mask, (0, 0), sigma)


# -- the picture -----------------------------------------------------------------------


@dataclass
class _Shape:
    pts: np.ndarray
    cx: float
    cy: float
    radius: float


def _skin(rng: np.random.Generator, h: int, w: int, fitzpatrick: int | None) -> tuple[np.ndarray, int]:
    # Continuous Fitzpatrick position, 0 = type I, 5 = type VI.
    tone = rng.uniform(0, 5)
    if fitzpatrick is not None:
        tone = float(np.clip(fitzpatrick - 1 + rng.uniform(-0.4, 0.4), 0, 5))
    lo = int(np.floor(tone))
    hi = min(lo + 1, 5)
    base = FITZPATRICK_RGB[lo] * (1 - (tone - lo)) + FITZPATRICK_RGB[hi] * (tone - lo)
    base = base * rng.normal(1.0, 0.035, 3).astype(np.float32)
    img = np.broadcast_to(base, (h, w, 3)).astype(np.float32).copy()
    # Uneven pigmentation, mostly luminance, a little chroma.
    lum = 0.05 * smooth_noise(rng, h, w, rng.uniform(2, 5)) + 0.025 * smooth_noise(rng, h, w, rng.uniform(8, 16))
    img *= (1 + lum)[..., None]
    for c in range(3):
        img[..., c] *= 1 + 0.012 * smooth_noise(rng, h, w, 3)
    # Skin grain and pores: fine multiplicative noise and sparse dark dots.
    grain = cv2.GaussianBlur(rng.standard_normal((h, w), dtype=np.float32), (0, 0), 0.8)
    img *= (1 + rng.uniform(0.02, 0.05) * grain)[..., None]
    pores = np.zeros((h, w), np.float32)
    n_pores = int(h * w / rng.uniform(120, 400))
    ys, xs = rng.integers(0, h, n_pores), rng.integers(0, w, n_pores)
    pores[ys, xs] = rng.uniform(0.3, 1.0, n_pores)
    pores = cv2.GaussianBlur(pores, (0, 0), rng.uniform(0.6, 1.1))
    img *= (1 - rng.uniform(0.25, 0.5) * np.clip(pores * 3, 0, 1))[..., None]
    return img, int(round(tone)) + 1


def _erythema_shapes(rng: np.random.Generator, h: int, w: int, lesions: list[_Shape]) -> list[_Shape]:
    shapes = []
    for les in lesions:
        if rng.uniform() < 0.8:  # halo around the lesion
            jitter = les.radius * rng.uniform(0, 0.3, 2) * rng.choice([-1, 1], 2)
            shapes.append(_Shape(blob_points(rng, rng.uniform(0.3, 0.8)), les.cx + jitter[0], les.cy + jitter[1], les.radius * rng.uniform(1.6, 2.8)))
    n_free = rng.integers(0 if shapes else 1, 3)
    m = min(h, w)
    for _ in range(n_free):
        shapes.append(
            _Shape(blob_points(rng, rng.uniform(0.3, 0.9)), rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h, m * rng.uniform(0.12, 0.3))
        )
    return shapes


def _union(h: int, w: int, shapes: list[_Shape], factor: float, scale: int = 1) -> np.ndarray:
    out = np.zeros((h, w), np.float32)
    for s in shapes:
        out = np.maximum(out, fill_shape(h, w, s.pts, s.cx, s.cy, s.radius * factor, scale))
    return out


def _fit_area(h: int, w: int, shapes: list[_Shape], lesion: np.ndarray, target: float) -> float:
    """Radius factor so the erythema (outside lesions) covers about `target` of the image."""
    sh, sw = max(8, h // 4), max(8, w // 4)
    small_lesion = cv2.resize(lesion, (sw, sh), interpolation=cv2.INTER_NEAREST)

    def area(f: float) -> float:
        return float((_union(sh, sw, shapes, f, scale=4) * (1 - small_lesion)).mean())

    lo, hi = 0.05, 6.0
    for _ in range(14):
        mid = (lo + hi) / 2
        if area(mid) < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _lesion_texture(rng: np.random.Generator, h: int, w: int, skin_mean: np.ndarray) -> np.ndarray:
    brown = skin_mean * np.array([0.52, 0.40, 0.36], np.float32) * rng.uniform(0.6, 1.05)
    brown = brown * rng.normal(1.0, 0.05, 3).astype(np.float32)
    tex = 1 + 0.15 * smooth_noise(rng, h, w, rng.uniform(10, 25)) + 0.08 * smooth_noise(rng, h, w, 40)
    img = brown[None, None, :] * tex[..., None]
    # Darker globules.
    glob = np.zeros((h, w), np.float32)
    n = int(h * w / 900)
    glob[rng.integers(0, h, n), rng.integers(0, w, n)] = 1.0
    glob = cv2.GaussianBlur(glob, (0, 0), max(1.0, min(h, w) / 250))
    glob /= glob.max() + 1e-6
    return img * (1 - 0.35 * glob)[..., None]


def _hair(rng: np.random.Generator, img: np.ndarray, fitz: int) -> None:
    h, w = img.shape[:2]
    if rng.uniform() < 0.4:
        return
    n = int(rng.integers(1, 30))
    layer = np.zeros((h, w), np.uint8)  # anti-aliased drawing needs 8-bit
    m = min(h, w)
    for _ in range(n):
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        ang = rng.uniform(0, 2 * np.pi)
        curl = rng.normal(0, 0.05)
        length = rng.uniform(0.1, 0.6) * m
        steps = 24
        pts = []
        for _ in range(steps):
            pts.append((x, y))
            ang += curl + rng.normal(0, 0.03)
            x += np.cos(ang) * length / steps
            y += np.sin(ang) * length / steps
        thick = max(1, int(round(rng.uniform(0.6, 1.6) * m / 400)))
        poly = np.round(np.array(pts) * 16).astype(np.int32)
        cv2.polylines(layer, [poly], False, int(rng.uniform(150, 245)), thick, cv2.LINE_AA, shift=4)
    color = np.array([30, 22, 18], np.float32) * rng.uniform(0.6, 2.0 if fitz <= 2 else 1.2)
    layer = (layer.astype(np.float32) / 255)[..., None]
    img[:] = img * (1 - layer) + color * layer


def _occlude(rng: np.random.Generator, img: np.ndarray, visible: np.ndarray) -> np.ndarray:
    """Draw occluders; returns a float (H, W) 'field stop' multiplier applied after lighting."""
    h, w = img.shape[:2]
    m = min(h, w)
    stop = np.ones((h, w), np.float32)
    u = rng.uniform()
    if u < 0.12:  # dermatoscope: circular field of view, black outside
        cy, cx = h / 2 + rng.normal(0, 0.05) * h, w / 2 + rng.normal(0, 0.05) * w
        r = rng.uniform(0.5, 0.62) * np.hypot(h, w) * 0.9
        yy, xx = np.ogrid[0:h, 0:w]
        inside = (np.hypot(yy - cy, xx - cx) < r).astype(np.float32)
        visible *= inside
        stop = soften(inside, 2.0) * 0.95 + 0.05
    elif u < 0.27:  # ruler along one edge
        width = int(rng.uniform(0.07, 0.13) * m)
        strip = np.zeros((h, w), np.uint8)
        side = rng.integers(4)
        tilt = rng.uniform(-0.08, 0.08)
        if side in (0, 1):
            y0 = 0 if side == 0 else h - width
            pts = np.array([(0, y0), (w, y0 + tilt * w), (w, y0 + tilt * w + width), (0, y0 + width)])
        else:
            x0 = 0 if side == 2 else w - width
            pts = np.array([(x0, 0), (x0 + tilt * h, h), (x0 + tilt * h + width, h), (x0 + width, 0)])
        cv2.fillPoly(strip, [np.round(pts).astype(np.int32)], 1)
        strip_f = strip.astype(np.float32)
        ruler = np.array([232, 228, 205], np.float32) * rng.uniform(0.85, 1.05)
        img[strip > 0] = ruler
        ticks = np.zeros((h, w), np.uint8)
        step = max(4, m // 40)
        for t in range(0, max(h, w), step):
            if side in (0, 1):
                cv2.line(ticks, (t, 0), (t, h), 1, 1)
            else:
                cv2.line(ticks, (0, t), (w, t), 1, 1)
        tick_mask = (ticks > 0) & (strip > 0)
        img[tick_mask] = 40
        visible *= 1 - strip_f
    elif u < 0.45:  # cloth or gauze entering from an edge
        cloth = np.zeros((h, w), np.uint8)
        side = rng.integers(4)
        depth = rng.uniform(0.08, 0.3)
        n = 7
        if side == 0:
            edge = [(x, rng.uniform(0.4, 1.0) * depth * h) for x in np.linspace(0, w, n)]
            pts = [(0, 0)] + edge + [(w, 0)]
        elif side == 1:
            edge = [(x, h - rng.uniform(0.4, 1.0) * depth * h) for x in np.linspace(0, w, n)]
            pts = [(0, h)] + edge + [(w, h)]
        elif side == 2:
            edge = [(rng.uniform(0.4, 1.0) * depth * w, y) for y in np.linspace(0, h, n)]
            pts = [(0, 0)] + edge + [(0, h)]
        else:
            edge = [(w - rng.uniform(0.4, 1.0) * depth * w, y) for y in np.linspace(0, h, n)]
            pts = [(w, 0)] + edge + [(w, h)]
        cv2.fillPoly(cloth, [np.round(np.array(pts)).astype(np.int32)], 1)
        palette = np.array([(60, 90, 160), (70, 140, 120), (235, 235, 235), (120, 120, 125), (30, 30, 40)], np.float32)
        color = palette[rng.integers(len(palette))] * rng.uniform(0.8, 1.1)
        weave = 1 + 0.08 * np.sin(np.arange(w)[None, :] * rng.uniform(0.8, 1.6)) * np.sin(np.arange(h)[:, None] * rng.uniform(0.8, 1.6))
        weave = weave + 0.05 * smooth_noise(rng, h, w, 12)
        sel = cloth > 0
        img[sel] = (color[None, None, :] * weave[..., None])[sel]
        visible *= 1 - cloth.astype(np.float32)
    return stop


def make_sample(
    rng: np.random.Generator,
    height: int,
    width: int,
    target_grade: int | None = None,
    fitzpatrick: int | None = None,
) -> Sample:
    """Draw one photograph of size (height, width) and its ground truth.

    `target_grade` steers the erythema burden towards that grade (the returned grade is
    measured from the drawn picture and may differ, e.g. after occlusion);
    `fitzpatrick` (1..6) fixes the skin type.
    """
    h, w = height, width
    m = min(h, w)
    img, fitz = _skin(rng, h, w, fitzpatrick)
    skin_mean = img.reshape(-1, 3).mean(0)

    # Lesions.
    lesions = []
    n_les = rng.choice([0, 1, 1, 1, 2, 3], p=[0.12, 0.3, 0.2, 0.18, 0.14, 0.06])
    for i in range(n_les):
        r = m * (rng.uniform(0.05, 0.16) if i == 0 else rng.uniform(0.035, 0.09))
        lesions.append(_Shape(blob_points(rng, rng.uniform(0.3, 0.9), 12), rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h, r))
    lesion_bin = np.zeros((h, w), np.float32)
    for s in lesions:
        lesion_bin = np.maximum(lesion_bin, fill_shape(h, w, s.pts, s.cx, s.cy, s.radius))

    # Erythema: pick a burden in the target grade's band, an intensity, then the area.
    g = int(rng.integers(GRADES)) if target_grade is None else target_grade
    burden = rng.uniform(g * GRADE_STEP, (g + 1) * GRADE_STEP if g < GRADES - 1 else 0.33)
    intensity = rng.uniform(max(0.4, burden / 0.45 / 0.85), 1.0)
    area = burden / (0.85 * intensity)
    shapes = _erythema_shapes(rng, h, w, lesions)
    ery_alpha = np.zeros((h, w), np.float32)
    ery_bin = np.zeros((h, w), np.float32)
    if area > 0.004:
        factor = _fit_area(h, w, shapes, lesion_bin, area)
        for s in shapes:
            b = fill_shape(h, w, s.pts, s.cx, s.cy, s.radius * factor)
            ery_bin = np.maximum(ery_bin, b)
            # Diffuse border: the half-strength contour is the annotated border.
            ery_alpha = np.maximum(ery_alpha, soften(b, max(1.0, 0.07 * s.radius * factor)))
        mottle = np.clip(1 + 0.12 * smooth_noise(rng, h, w, rng.uniform(6, 14)), 0.7, 1.2)
        ery_alpha = np.clip(ery_alpha * intensity * mottle, 0, 1)
        t = (fitz - 1) / 5
        shift = np.array([-0.06 + 0.08 * t, 0.46 - 0.10 * t, 0.38 - 0.08 * t], np.float32)
        img *= 1 - ery_alpha[..., None] * shift

    # Lesions on top: sharp-ish border, opaque.
    if lesions:
        les_soft = soften(lesion_bin, max(0.5, m / 500)) * rng.uniform(0.88, 1.0)
        tex = _lesion_texture(rng, h, w, skin_mean)
        img = img * (1 - les_soft[..., None]) + tex * les_soft[..., None]

    _hair(rng, img, fitz)
    visible = np.ones((h, w), np.float32)
    stop = _occlude(rng, img, visible)

    # Lighting: gradient, vignette, exposure, white balance; then optics and sensor.
    xx = (np.arange(w, dtype=np.float32) / w - 0.5)[None, :]
    yy = (np.arange(h, dtype=np.float32) / h - 0.5)[:, None]
    ang = rng.uniform(0, 2 * np.pi)
    light = 1 + rng.uniform(0.0, 0.25) * 2 * (xx * np.float32(np.cos(ang)) + yy * np.float32(np.sin(ang)))
    light = light * (1 - np.float32(rng.uniform(0, 0.3)) * 2 * (xx**2 + yy**2))
    light = light * np.float32(rng.uniform(0.85, 1.12)) * stop
    img *= light[..., None]
    img *= rng.normal(1.0, 0.025, 3).astype(np.float32)
    blur = rng.uniform(0, 1.0) * m / 400
    if blur > 0.35:
        img = cv2.GaussianBlur(img, (0, 0), blur)
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(rng.uniform(1.0, 4.0))
    image = np.clip(np.round(img), 0, 255).astype(np.uint8)

    mask = np.zeros((h, w), np.uint8)
    ery_vis = (ery_bin > 0.5) & (lesion_bin < 0.5) & (visible > 0.5)
    mask[ery_vis] = ERYTHEMA
    mask[(lesion_bin > 0.5) & (visible > 0.5)] = LESION
    measured = float(ery_alpha[ery_vis].sum() / (h * w))
    return Sample(image, mask, measured, grade_of(measured), fitz)


def random_size(rng: np.random.Generator) -> tuple[int, int]:
    """A photograph size: long side 256-640 px, aspect 1.0-1.6, either orientation."""
    long = int(rng.integers(256, 641))
    short = int(round(long / rng.uniform(1.0, 1.6)))
    return (long, short) if rng.uniform() < 0.35 else (short, long)


def recompress(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Round-trip through the lossy codecs the example images use (JPEG mostly, WebP)."""
    u = rng.uniform()
    if u < 0.2:
        return image
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    if u < 0.9:
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(70, 96))])
    else:
        ok, buf = cv2.imencode(".webp", bgr, [cv2.IMWRITE_WEBP_QUALITY, int(rng.integers(70, 96))])
    assert ok
    return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
