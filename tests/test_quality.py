"""Input-adequacy measures against an independent implementation of docs/quality.md's formulas,
and the policy's verdict."""

from __future__ import annotations

import io
import math

import cv2
import numpy as np
import pytest
from PIL import Image

from legitseg.errors import ManifestError
from legitseg.images.decode import check_header, decode_rgb
from legitseg.images.quality import measures
from legitseg.manifest.quality import Quality, QualityPolicy, judge
from legitseg.manifest.spec import parse_manifest


def reference(rgb: np.ndarray) -> dict[str, float]:
    """docs/quality.md written out again: integer block sums, Python loops for the Laplacian."""
    rgb = np.asarray(rgb)
    H, W = rgb.shape[:2]
    k = max(1, min(H, W, math.ceil(max(H, W) / 512)))
    h, w = H // k, W // k
    work = rgb[: h * k, : w * k].astype(np.int64).reshape(h, k, w, k, 3).sum(axis=(1, 3)) / (k * k)
    y = 0.299 * work[:, :, 0] + 0.587 * work[:, :, 1] + 0.114 * work[:, :, 2]
    laps = [y[i - 1, j] + y[i + 1, j] + y[i, j - 1] + y[i, j + 1] - 4 * y[i, j]
            for i in range(1, h - 1) for j in range(1, w - 1)]
    sharp = 0.0
    if laps:
        m = sum(laps) / len(laps)
        sharp = sum((v - m) ** 2 for v in laps) / len(laps)
    flat = y.ravel().tolist()
    mean = sum(flat) / len(flat)
    std = math.sqrt(sum((v - mean) ** 2 for v in flat) / len(flat))
    ch = [float(work[:, :, c].sum()) / (h * w) for c in range(3)]
    grey = sum(ch) / 3
    return {"sharpness": sharp, "mean_luminance": mean / 255, "dark_fraction": sum(v <= 5 for v in flat) / len(flat),
            "bright_fraction": sum(v >= 250 for v in flat) / len(flat), "contrast": std,
            "short_side": float(min(H, W)), "colour_cast": (max(ch) - min(ch)) / max(grey, 1.0),
            "blockiness": reference_blockiness(rgb)}


def reference_blockiness(rgb: np.ndarray) -> float:
    """docs/quality.md's blockiness in plain Python: the central 512 crop, steps per phase, Python loops."""
    H, W = rgb.shape[:2]
    h, w = min(H, 512), min(W, 512)
    top, left = (H - h) // 2, (W - w) // 2
    y = [[0.299 * r + 0.587 * g + 0.114 * b for r, g, b in row]
         for row in rgb[top:top + h, left:left + w].astype(np.float64).tolist()]
    grid, inside = [], []
    directions = ((h, w, lambda k, j: abs(y[k + 1][j] - y[k][j])),  # between rows k and k+1
                  (w, h, lambda k, i: abs(y[i][k + 1] - y[i][k])))  # between columns k and k+1
    for n, across, step in directions:
        if n < 16:
            continue
        sums, counts = [0.0] * 8, [0] * 8
        for k in range(n - 1):
            phase = (k + 1) % 8
            sums[phase] += sum(step(k, j) for j in range(across))
            counts[phase] += across
        means = sorted(s / c for s, c in zip(sums, counts, strict=True))
        grid.append(means[-1])
        inside.append(sum(means[:-1]) / 7)
    if not grid:
        return 1.0
    return (sum(grid) / len(grid) + 1.0) / (sum(inside) / len(inside) + 1.0)


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth gradient with texture and a few clipped pixels: every measure away from its edge case."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([yy * 200 / max(h, 1), xx * 180 / max(w, 1), (yy + xx) * 100 / max(h + w, 1)], axis=2)
    img = np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
    img[:2, :2] = 255
    img[-2:, -2:] = 0
    return img


def _png(arr: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", arr)
    assert ok
    return buf.tobytes()


def _exif_jpeg(rgb: np.ndarray, orientation: int) -> bytes:
    im = Image.fromarray(rgb)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def _jpeg(rgb: np.ndarray, quality: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", rgb[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.tobytes()


def _plain(data: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]


def _decoded(data: bytes) -> np.ndarray:
    return decode_rgb(data, check_header(data, 10**9))


def _cases() -> dict[str, tuple[bytes, np.ndarray]]:
    """name -> (file bytes, the upright 8-bit RGB expected, made without legitseg's decoder)."""
    rgb = _photo(40, 56)
    grey = _photo(33, 47)[:, :, 1]
    deep = (_photo(30, 20).astype(np.uint16) * 257 + np.arange(30 * 20 * 3, dtype=np.uint16).reshape(30, 20, 3) % 200)
    rgba = np.dstack([rgb[:, :, ::-1], np.full(rgb.shape[:2], 77, np.uint8)])  # BGRA for OpenCV
    jpeg = _exif_jpeg(_photo(24, 36), 6)
    plain = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)[:, :, ::-1]
    return {
        "rgb": (_png(rgb[:, :, ::-1]), rgb),
        "grey": (_png(grey), np.repeat(grey[:, :, None], 3, axis=2)),
        "16-bit": (_png(deep[:, :, ::-1]), ((deep.astype(np.uint32) + 128) // 257).astype(np.uint8)),
        "rgba": (_png(rgba), rgb),
        "exif-rotated": (jpeg, np.rot90(plain, k=-1)),  # orientation 6: turn 90 degrees clockwise
        "1x1": (_png(np.array([[[10, 200, 30]]], np.uint8)), np.array([[[30, 200, 10]]], np.uint8)),
        "3x3": (_png(_photo(3, 3)[:, :, ::-1]), _photo(3, 3)),
        "15x40 (one direction for blockiness)": (_png(_photo(15, 40)[:, :, ::-1]), _photo(15, 40)),
        "jpeg quality 5": (_jpeg(_photo(70, 90), 5), _plain(_jpeg(_photo(70, 90), 5))),
        "1100x700 (blocks of 3)": (_png(_photo(700, 1100, 3)[:, :, ::-1]), _photo(700, 1100, 3)),
    }


CASES = _cases()


@pytest.mark.parametrize("name", list(CASES))
def test_each_measure_matches_an_independent_implementation(name):
    data, expected = CASES[name]
    decoded = _decoded(data)
    assert decoded.shape == expected.shape and np.array_equal(decoded, expected), "decoded as expected"
    got, want = measures(decoded), reference(expected)
    assert set(got) == set(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-6, rel=0), key


def test_tiny_images_measure_without_error_and_have_no_sharpness():
    one = measures(np.zeros((1, 1, 3), np.uint8))
    assert one["sharpness"] == 0.0 and one["short_side"] == 1.0 and one["dark_fraction"] == 1.0
    assert measures(np.full((3, 3, 3), 255, np.uint8))["bright_fraction"] == 1.0


def test_each_measure_moves_with_its_degradation():
    img = _photo(200, 300)
    m = measures(img)
    assert measures(cv2.GaussianBlur(img, (0, 0), 3))["sharpness"] < m["sharpness"] / 4
    assert measures((img // 4).astype(np.uint8))["mean_luminance"] < m["mean_luminance"] / 3
    low = (img.astype(np.float64) * 0.2 + 100).astype(np.uint8)
    assert measures(low)["contrast"] < m["contrast"] / 3
    cast = np.clip(img * np.array([1.6, 1.0, 0.4]), 0, 255).astype(np.uint8)
    assert measures(cast)["colour_cast"] > m["colour_cast"] + 0.3


def test_blockiness_finds_the_jpeg_grid_wherever_it_lies_and_reads_1_without_one():
    img = _photo(200, 240)
    assert measures(img)["blockiness"] < 1.2 < 1.7 < measures(_plain(_jpeg(img, 5)))["blockiness"]
    # Cropped by 3 pixels (as a rotation or a crop moves it), the grid is still found.
    assert measures(np.ascontiguousarray(_plain(_jpeg(img, 5))[3:, 5:]))["blockiness"] > 1.7
    for shape in ((1, 1, 3), (3, 3, 3), (15, 15, 3), (300, 300, 3)):
        assert measures(np.full(shape, 90, np.uint8))["blockiness"] == 1.0, shape
    blocks = np.kron(np.random.default_rng(2).integers(0, 256, (8, 8, 3)), np.ones((8, 8, 1))).astype(np.uint8)
    assert measures(blocks)["blockiness"] > 10  # flat blocks, steps only on the grid


def test_verdict_names_each_reason_with_value_and_limit():
    policy = QualityPolicy(min_sharpness=100, min_short_side=500, max_colour_cast=None)
    q = judge({"sharpness": 12.5, "mean_luminance": 0.5, "dark_fraction": 0, "bright_fraction": 0,
               "contrast": 40, "short_side": 300, "colour_cast": 9.0}, policy)
    assert not q.adequate
    assert [r.to_json() for r in q.reasons] == [
        {"reason": "blurry", "measure": "sharpness", "value": 12.5, "limit": 100.0},
        {"reason": "low_resolution", "measure": "short_side", "value": 300, "limit": 500.0}]
    assert q.policy == policy.digest() and not q.skipped
    back = Quality.from_json(q.to_json())
    assert back is not None and back.reasons == q.reasons and back.adequate is False


def test_defaults_pass_a_clean_photo_and_flag_each_heavy_degradation():
    policy = QualityPolicy(on_inadequate="skip")
    img = _photo(300, 400)
    assert judge(measures(img), policy).adequate
    heavy = {"blurry": cv2.GaussianBlur(img, (0, 0), 8), "too_dark": (img * 0.08).astype(np.uint8),
             "overexposed": np.clip(img.astype(np.int32) * 5, 0, 255).astype(np.uint8),
             "low_resolution": cv2.resize(img, (80, 60), interpolation=cv2.INTER_AREA),
             "low_contrast": (img * 0.05 + 120).astype(np.uint8),
             "colour_cast": np.clip(img * np.array([1.9, 1.0, 0.1]), 0, 255).astype(np.uint8),
             "compressed": _plain(_jpeg(img, 5))}
    for reason, degraded in heavy.items():
        q = judge(measures(np.ascontiguousarray(degraded)), policy)
        assert reason in q.reason_names and q.skipped, (reason, q.reasons)


def test_policy_digest_changes_with_a_limit_only():
    assert QualityPolicy().digest() == QualityPolicy().digest()
    assert QualityPolicy(min_sharpness=6).digest() != QualityPolicy().digest()


MANIFEST = """version: 1
models:
  m:
    task: severity
    encoder: resnet18
    classes: 2
    input_size: [64, 64]
    weights: w.safetensors
    sha256: "{sha}"
"""


@pytest.mark.parametrize(("section", "message"), [
    ("quality:\n  min_sharpnes: 3\n", "field 'quality.min_sharpnes': unknown field"),
    ("quality:\n  on_inadequate: drop\n", "field 'quality.on_inadequate': invalid value 'drop'"),
    ("quality:\n  max_dark_fraction: 2\n", "field 'quality.max_dark_fraction'"),
])
def test_manifest_policy_is_validated(tmp_path, section, message):
    (tmp_path / "w.safetensors").write_bytes(b"x")
    with pytest.raises(ManifestError, match=message.replace("(", r"\(").replace(".", r"\.")):
        parse_manifest(MANIFEST.format(sha="0" * 64) + section, tmp_path / "models.yaml")


def test_manifest_without_policy_has_none_and_with_one_reads_it(tmp_path):
    (tmp_path / "w.safetensors").write_bytes(b"x")
    text = MANIFEST.format(sha="0" * 64)
    assert parse_manifest(text, tmp_path / "models.yaml").quality is None
    policy = parse_manifest(text + "quality:\n  on_inadequate: skip\n  min_contrast: null\n",
                            tmp_path / "models.yaml").quality
    assert policy is not None and policy.on_inadequate == "skip" and policy.min_contrast is None
