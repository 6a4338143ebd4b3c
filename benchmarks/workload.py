"""What the benchmark runs on: production-shaped models with random weights, and photo-like JPEGs.

Everything lands in a work folder (default `bench-data/`, git-ignored) and is
reused by later runs: weights files are rebuilt only when missing, image folders
only when they hold fewer images than asked for.
"""

from __future__ import annotations

import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import yaml

JPEG_QUALITY = 90


@dataclass(frozen=True)
class BenchModel:
    """One manifest entry of the benchmark; `name` is also its models.yaml key."""

    name: str
    task: str  # segmentation | severity
    encoder: str
    size: tuple[int, int]  # input_size (h, w)
    arch: str | None = None
    classes: int = 1
    tta: tuple[str, ...] = ()
    decode: str = "full"  # "reduced": the manifest's `decode: reduced` (issue 26)

    @property
    def label(self) -> str:
        what = f"{self.arch}+{self.encoder}" if self.arch else f"{self.encoder} severity"
        at = f"@{self.size[0]}" if self.size[0] == self.size[1] else f"@{self.size[0]}x{self.size[1]}"
        return (f"{what} {at}" + (f" tta {'+'.join(self.tta)}" if self.tta else "")
                + (" decode reduced" if self.decode == "reduced" else ""))

    def manifest_fields(self) -> dict:
        fields = {"task": self.task, "encoder": self.encoder, "classes": self.classes,
                  "input_size": list(self.size)}
        if self.arch:
            fields["arch"] = self.arch
        if self.tta:
            fields["tta"] = list(self.tta)
        if self.decode != "full":
            fields["decode"] = self.decode
        return fields


PRODUCTION = {
    m.name: m
    for m in (
        BenchModel("dlv3p_b2_384", "segmentation", "efficientnet-b2", (384, 384), arch="DeepLabV3Plus"),
        BenchModel("dlv3p_b2_512", "segmentation", "efficientnet-b2", (512, 512), arch="DeepLabV3Plus"),
        BenchModel("unet_r101_512", "segmentation", "resnet101", (512, 512), arch="Unet"),
        BenchModel("severity_b2_384", "severity", "efficientnet-b2", (384, 384), classes=10),
        BenchModel("dlv3p_b2_384_hflip", "segmentation", "efficientnet-b2", (384, 384), arch="DeepLabV3Plus",
                   tta=("hflip",)),
        BenchModel("dlv3p_b2_384_reduced", "segmentation", "efficientnet-b2", (384, 384), arch="DeepLabV3Plus",
                   decode="reduced"),
    )
}
TINY_ENCODER = "tu-test_resnet.r160_in1k"  # smp's own test encoder, ~0.4M parameters
TINY = {
    m.name: m
    for m in (
        BenchModel("tiny_seg_64", "segmentation", TINY_ENCODER, (64, 64), arch="Unet"),
        BenchModel("tiny_seg_96", "segmentation", TINY_ENCODER, (96, 96), arch="Unet"),
        BenchModel("tiny_sev_64", "severity", TINY_ENCODER, (64, 64), classes=10),
        BenchModel("tiny_seg_64_hflip", "segmentation", TINY_ENCODER, (64, 64), arch="Unet", tta=("hflip",)),
        BenchModel("tiny_seg_64_reduced", "segmentation", TINY_ENCODER, (64, 64), arch="Unet", decode="reduced"),
    )
}


def spec_for(model: BenchModel, weights: Path, sha256: str = "0" * 64):
    """The legitseg ModelSpec of `model`; the sha256 is a placeholder until the weights exist."""
    from legitseg.manifest.spec import ModelSpec

    return ModelSpec(name=model.name, weights=weights, sha256=sha256, **{
        k: tuple(v) if isinstance(v, list) else v for k, v in model.manifest_fields().items()})


# Logit spread of the calibrated segmentation head (issue 26): a trained network's logits on
# skin photos reach tens; a random head's are near-constant, so its masks mark every pixel or none.
SHARP_STD = 8.0
CALIBRATION_PHOTOS = 4


def calibration_photos(work: Path, model: BenchModel, count: int = CALIBRATION_PHOTOS) -> list[np.ndarray]:
    """RGB bench photos (1024x768, the same JPEGs the rows read) stretched to the model's input."""
    paths = image_pool(work, 1024, 768, count)[:count]
    h, w = model.size
    return [cv2.resize(cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB), (w, h), interpolation=cv2.INTER_LINEAR)
            for p in paths]


def head_logits(module, model: BenchModel, photos: list[np.ndarray]):
    """The model's logits on `photos`, normalised as legitseg does (the encoder's mean/std)."""
    import torch

    from legitseg.models.factory import resolve_normalize

    mean, std = resolve_normalize(spec_for(model, Path("unused")))
    x = torch.from_numpy(np.stack(photos)).permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    with torch.inference_mode():
        return module.eval()(x)


def calibrate_head(module, model: BenchModel, photos: list[np.ndarray], target_std: float = SHARP_STD) -> dict:
    """Centre and sharpen a random segmentation head on the bench photos, in place.

    The head's last convolution is affine in the logits (upsampling after it is linear),
    so w' = w * s, b' = (b - median) * s with s = target_std / std gives logits whose
    median over the photos' pixels is 0 (mask area ~0.5) and whose std is `target_std`:
    content-dependent masks with realistic boundaries, like a trained model's. Returns
    what was measured: {"scale", "median", "std", "area_fraction", "max_abs_logit"}.
    """
    import torch

    conv = module.segmentation_head[0]
    z = head_logits(module, model, photos).flatten()
    median, spread = float(z.median()), float(z.std())
    scale = target_std / max(spread, 1e-12)
    with torch.no_grad():
        conv.weight.mul_(scale)
        conv.bias.sub_(median).mul_(scale)
    z = head_logits(module, model, photos)
    return {"scale": scale, "median": median, "std": float(z.std()),
            "area_fraction": float((z > 0).float().mean()), "max_abs_logit": float(z.abs().max())}


def build_weights(model: BenchModel, folder: Path, seed: int = 0, work: Path | None = None) -> tuple[Path, str]:
    """Random weights for `model` through legitseg's own factory, saved as safetensors.

    Segmentation models (single class) get the calibrated head (`calibrate_head`) on the
    bench photos under `work` (default: the folder above `folder`). Returns (path, sha256).
    An existing file is reused: random weights are as good as any others for timing,
    and rebuilding resnet101 costs seconds.
    """
    import torch
    from safetensors.torch import save_file

    from legitseg.models.factory import build_module
    from legitseg.models.weights import sha256_file

    sharp = model.task == "segmentation" and model.classes == 1
    path = folder / f"{model.name}{'.sharp' if sharp else ''}.safetensors"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(seed)
        module = build_module(spec_for(model, path))
        if sharp:
            calibrate_head(module, model, calibration_photos(work or folder.parent, model))
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(tmp))
        os.replace(tmp, path)
    return path, sha256_file(path)


def write_manifest(models: list[BenchModel], work: Path) -> Path:
    """Build (or reuse) every model's weights and write `work/models.yaml` pinning their sha256."""
    entries = {}
    for m in models:
        path, sha = build_weights(m, work / "weights", work=work)
        entries[m.name] = {**m.manifest_fields(), "weights": os.path.relpath(path, work), "sha256": sha}
    manifest = work / "models.yaml"
    manifest.write_text(yaml.safe_dump({"version": 1, "models": entries}, sort_keys=False))
    return manifest


# -- images ---------------------------------------------------------------------------------
def photo_like(width: int, height: int, seed: int) -> np.ndarray:
    """A BGR uint8 picture with the statistics of a skin photograph, not of white noise.

    Smooth colour gradients (lighting), a few soft reddish blobs (lesions) and
    mild sensor noise: JPEG sizes and decode times land near those of real photos.
    """
    rng = np.random.default_rng(seed)
    skin = np.array([130, 150, 200], np.float32)  # BGR
    coarse = skin + rng.normal(0, 18, (6, 8, 3)).astype(np.float32)
    img = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    # Blobs drawn at a quarter of the resolution, blurred and upscaled: soft edges, cheap.
    sw, sh = max(8, width // 4), max(8, height // 4)
    layer = np.zeros((sh, sw), np.float32)
    for _ in range(int(rng.integers(3, 9))):
        center = (int(rng.integers(0, sw)), int(rng.integers(0, sh)))
        axes = (int(rng.integers(sw // 40 + 1, sw // 6 + 2)), int(rng.integers(sh // 40 + 1, sh // 6 + 2)))
        cv2.ellipse(layer, center, axes, float(rng.uniform(0, 180)), 0, 360, float(rng.uniform(0.4, 1.0)), -1)
    layer = cv2.GaussianBlur(layer, (0, 0), sigmaX=max(1.0, sw / 150))
    alpha = cv2.resize(layer, (width, height), interpolation=cv2.INTER_LINEAR)[..., None]
    lesion = np.array([70, 60, 170], np.float32)
    img = img * (1 - alpha) + lesion * alpha
    img += rng.normal(0, 4.0, (height, width, 1)).astype(np.float32)  # luminance noise
    return np.clip(img, 0, 255).astype(np.uint8)


def image_pool(work: Path, width: int, height: int, count: int, threads: int | None = None) -> list[Path]:
    """At least `count` JPEGs of width x height under work/images/WxH (generated on demand)."""
    folder = work / "images" / f"{width}x{height}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"img_{i:04d}.jpg" for i in range(count)]
    missing = [(i, p) for i, p in enumerate(paths) if not p.is_file()]

    def make(item: tuple[int, Path]) -> None:
        i, p = item
        ok, buf = cv2.imencode(".jpg", photo_like(width, height, seed=i), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        if not ok:
            raise RuntimeError(f"OpenCV could not encode {p}")
        tmp = p.with_suffix(".tmp")
        tmp.write_bytes(buf.tobytes())
        os.replace(tmp, p)

    if missing:
        with ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:
            list(pool.map(make, missing))
    return paths


def image_set(work: Path, width: int, height: int, count: int, unique: int | None = None) -> Path:
    """A folder holding exactly `count` images (hard links to the pool's), for `legitseg run FOLDER`.

    With `unique`, only that many distinct pictures are generated and the folder cycles
    through them under `count` names: enough images for 20 s of a GPU's steady state
    without generating thousands (each name is still read, hashed and decoded).
    """
    distinct = min(count, unique or count)
    pool = image_pool(work, width, height, distinct)
    names = [p.name for p in pool] if distinct == count else [f"img_{i:05d}.jpg" for i in range(count)]
    folder = work / "sets" / (f"{width}x{height}-n{count}" + (f"-u{distinct}" if distinct < count else ""))
    have = sorted(p.name for p in folder.glob("*.jpg")) if folder.is_dir() else []
    if have != names:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for i, name in enumerate(names):
            try:
                os.link(pool[i % distinct], folder / name)
            except OSError:  # file systems without hard links
                shutil.copy2(pool[i % distinct], folder / name)
    return folder
