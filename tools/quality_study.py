"""Degradation study of the input-adequacy measures on real photographs (docs/quality.md).

    pip install scikit-image   # the study's photographs: `pip install -e .[study]`
    python tools/quality_study.py [--markdown]

Photographs: scikit-image's bundled real ones (astronaut, coffee, chelsea, rocket,
immunohistochemistry, camera), nothing downloaded. Each is degraded at increasing
strength (Gaussian blur, darkening by gain and gamma, over-exposure, loss of contrast,
downscaling, JPEG quality, colour casts) and measured by legitseg's own code. Printed:
the median of each family's measure per level, whether it moves monotonically on every
photograph, the AUROC of each reason (undegraded photographs and the demo images against
the two heaviest levels), and how the default limits of `quality:` judge them.
"""

from __future__ import annotations

import argparse
import glob
import statistics
import sys
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from legitseg.images.decode import check_header, decode_rgb  # noqa: E402
from legitseg.images.quality import measures  # noqa: E402
from legitseg.manifest.quality import LIMITS, QualityPolicy, judge  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "camera")


def photographs() -> dict[str, np.ndarray]:
    import skimage.data

    out = {}
    for name in PHOTOS:
        img = getattr(skimage.data, name)()
        out[name] = np.ascontiguousarray(np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img[..., :3])
    return out


def demo_images() -> dict[str, np.ndarray]:
    out = {}
    for path in sorted(glob.glob(str(ROOT / "examples" / "images" / "*"))):
        data = Path(path).read_bytes()
        out[Path(path).name] = decode_rgb(data, check_header(data, 10**9))
    return out


def _lut(fn) -> np.ndarray:
    x = np.arange(256, dtype=np.float64)
    return np.clip(np.rint(fn(x)), 0, 255).astype(np.uint8)


def blur(img, sigma):
    return img if sigma == 0 else cv2.GaussianBlur(img, (0, 0), sigma)


def gain(img, g):
    return cv2.LUT(img, _lut(lambda x: x * g))


def gamma(img, g):
    return cv2.LUT(img, _lut(lambda x: 255.0 * (x / 255.0) ** g))


def contrast(img, alpha):
    mean = img.reshape(-1, 3).mean(axis=0)
    return np.clip(np.rint(mean + alpha * (img.astype(np.float64) - mean)), 0, 255).astype(np.uint8)


def downscale(img, f):
    if f == 1:
        return img
    h, w = img.shape[:2]
    return cv2.resize(img, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)


def jpeg(img, q):
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, q])
    assert ok
    return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def cast(img, s):
    out = img.astype(np.float64) * np.array([1 + s, 1.0, 1 - s])
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# family: (degrade, levels from none to heaviest, measure, reason it should raise, measure falls?)
FAMILIES = {
    "gaussian blur (sigma px)": (blur, [0, 1, 2, 4, 8], "sharpness", "blurry", True),
    "darker, gain": (gain, [1, 0.6, 0.35, 0.2, 0.1], "mean_luminance", "too_dark", True),
    "darker, gamma": (gamma, [1, 1.5, 2.2, 3.5, 5], "mean_luminance", "too_dark", True),
    "brighter, gain (clipped)": (gain, [1, 1.5, 2.2, 3.5, 5], "mean_luminance", "overexposed", False),
    "less contrast (alpha)": (contrast, [1, 0.6, 0.35, 0.15, 0.08], "contrast", "low_contrast", True),
    "downscaled (factor)": (downscale, [1, 0.75, 0.5, 0.3, 0.2], "short_side", "low_resolution", True),
    "JPEG quality": (jpeg, [95, 30, 15, 10, 5], "blockiness", "compressed", False),
    "colour cast (R+s, B-s)": (cast, [0, 0.15, 0.3, 0.6, 0.85], "colour_cast", "colour_cast", False),
}


def auroc(negatives: list[float], positives: list[float]) -> float:
    """P(a positive scores above a negative), ties counting one half (Mann-Whitney)."""
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


def monotonic(values: list[float], falls: bool) -> bool:
    pairs = list(zip(values, values[1:], strict=False))
    return all(b <= a for a, b in pairs) if falls else all(b >= a for a, b in pairs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    args = parser.parse_args()
    policy = QualityPolicy()
    photos, demos = photographs(), demo_images()
    clean = [measures(img) for img in photos.values()] + [measures(img) for img in demos.values()]
    bar = "|" if args.markdown else ""
    print(f"{bar} degradation {bar} levels {bar} measure: median over {len(photos)} photographs {bar} "
          f"monotonic on every photograph {bar} reason {bar} AUROC {bar} flagged (2 heaviest) {bar}")
    if args.markdown:
        print("|---|---|---|---|---|---:|---:|")
    for family, (degrade, levels, measure, reason, falls) in FAMILIES.items():
        per_photo = {name: [measures(degrade(img, level)) for level in levels] for name, img in photos.items()}
        medians = [statistics.median(per_photo[n][i][measure] for n in photos) for i in range(len(levels))]
        mono = all(monotonic([m[measure] for m in series], falls) for series in per_photo.values())
        sign = -1.0 if falls else 1.0
        heavy = [m for series in per_photo.values() for m in series[-2:]]
        score = auroc([sign * m[measure] for m in clean], [sign * m[measure] for m in heavy])
        flagged = sum(reason in judge(m, policy).reason_names for m in heavy)
        print(f"{bar} {family} {bar} {', '.join(map(str, levels))} {bar} {measure}: "
              f"{', '.join(f'{v:.4g}' for v in medians)} {bar} {'yes' if mono else 'NO'} {bar} {reason} {bar} "
              f"{score:.3f} {bar} {flagged}/{len(heavy)} {bar}")
    print()
    limits = ", ".join(f"{k}={getattr(policy, k)}" for k in LIMITS)
    print(f"default limits: {limits}")
    for label, group in (("undegraded photographs", dict(zip(photos, clean, strict=False))),
                         ("demo images", dict(zip(demos, clean[len(photos):], strict=True)))):
        verdicts = {n: judge(m, policy) for n, m in group.items()}
        bad = {n: v.reason_names for n, v in verdicts.items() if not v.adequate}
        print(f"{label}: {len(group) - len(bad)}/{len(group)} adequate" + (f"; flagged: {bad}" if bad else ""))
    for name, m in {**dict(zip(photos, clean, strict=False)),
                    **dict(zip(demos, clean[len(photos):], strict=True))}.items():
        print(f"  {name}: " + ", ".join(f"{k} {v:.4g}" for k, v in m.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
