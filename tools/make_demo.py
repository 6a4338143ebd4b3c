"""Regenerate the bundled demo: example images, ground truth, three trained experts, models.yaml.

    HF_HUB_OFFLINE=1 .venv/bin/python tools/make_demo.py

Everything is a function of --seed: the synthetic pictures (tools/synth.py), the
training order and the initial weights. Writes, under --root (default: the repository):

    examples/images/                        12 held-out pictures (.jpg, .png, .tif, .webp)
    examples/ground_truth/<model>/<stem>.png  masks, uint8 class indices, original size
    examples/ground_truth/severity.csv      image,grade
    examples/weights/<model>.safetensors    fp32 weights of the three experts
    models.yaml                             the manifest (SPEC section 2) pinning them

and prints the experts' quality on the example images, measured with the SPEC
section 4 semantics on the decoded (compressed) files. See docs/demo.md.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import logging
import multiprocessing as mp
import os
import pickle
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import demo_eval  # noqa: E402
import synth  # noqa: E402

from legitseg.manifest.spec import ModelSpec  # noqa: E402
from legitseg.models.factory import build_module  # noqa: E402

log = logging.getLogger("make_demo")

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
TRAIN_STREAM, EXAMPLE_STREAM, VAL_STREAM = 1, 2, 3

# erythema_segmenter first: severity_classifier starts from its encoder.
TRAIN_ORDER = ("erythema_segmenter", "severity_classifier", "lesion_segmenter")
MODELS: dict[str, dict] = {
    "erythema_segmenter": {
        "task": "segmentation",
        "arch": "DeepLabV3Plus",
        "encoder": "tu-mobilenetv3_small_075",
        "input_size": (192, 192),
        "classes": 1,
        "labels": ["background", "erythema"],
        "arch_params": {"decoder_channels": 64, "decoder_atrous_rates": [2, 4, 6]},
    },
    "lesion_segmenter": {
        "task": "segmentation",
        "arch": "Unet",
        "encoder": "tu-mobilenetv3_small_100",
        "input_size": (160, 160),
        "classes": 3,
        "labels": list(synth.LABELS),
        "arch_params": {"decoder_channels": [64, 32, 16, 16, 8]},
    },
    "severity_classifier": {
        "task": "severity",
        # Same encoder as erythema_segmenter: training starts from its trained encoder.
        "encoder": "tu-mobilenetv3_small_075",
        "input_size": (160, 160),
        "classes": synth.GRADES,
        "labels": [f"grade_{g}" for g in range(synth.GRADES)],
    },
}


@dataclass(frozen=True)
class Example:
    stem: str
    suffix: str
    width: int
    height: int
    grade: int
    fitzpatrick: int


# Held-out pictures: sizes off the multiples of 32, mixed formats, every grade and
# skin type. Each shows at least one lesion and some erythema, so every IoU is defined.
EXAMPLES = [
    Example("case01", ".jpg", 500, 375, 0, 1),
    Example("case02", ".jpg", 640, 427, 1, 2),
    Example("case03", ".jpg", 333, 500, 2, 3),
    Example("case04", ".png", 301, 226, 3, 4),
    Example("case05", ".jpg", 450, 301, 4, 5),
    Example("case06", ".tif", 213, 283, 5, 6),
    Example("case07", ".jpg", 601, 401, 6, 1),
    Example("case08", ".webp", 410, 307, 7, 2),
    Example("case09", ".jpg", 375, 500, 8, 3),
    Example("case10", ".jpg", 517, 389, 9, 4),
    Example("case11", ".jpg", 427, 640, 4, 5),
    Example("case12", ".png", 287, 215, 6, 6),
]


# -- data -----------------------------------------------------------------------------


def input_sizes() -> list[tuple[int, int]]:
    return sorted({cfg["input_size"] for cfg in MODELS.values()})


def _train_item(args: tuple[int, int, int]) -> tuple[dict, dict, float]:
    """One training picture, compressed like the examples, resized as SPEC 4.2 'stretch'
    does to every input size in use; the masks resized with nearest neighbour."""
    seed, stream, index = args
    rng = np.random.default_rng([seed, stream, index])
    h, w = synth.random_size(rng)
    s = synth.make_sample(rng, h, w)
    image = synth.recompress(rng, s.image)
    xs = {size: cv2.resize(image, size[::-1], interpolation=cv2.INTER_LINEAR) for size in input_sizes()}
    ys = {size: cv2.resize(s.mask, size[::-1], interpolation=cv2.INTER_NEAREST) for size in input_sizes()}
    return xs, ys, s.burden


def _val_item(args: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, int]:
    seed, stream, index = args
    rng = np.random.default_rng([seed, stream, index])
    h, w = synth.random_size(rng)
    s = synth.make_sample(rng, h, w)
    return synth.recompress(rng, s.image), s.mask, s.grade


def generate(fn, seed: int, stream: int, count: int, workers: int) -> list:
    jobs = [(seed, stream, i) for i in range(count)]
    if workers <= 1:
        return [fn(j) for j in jobs]
    with mp.get_context("fork").Pool(workers) as pool:
        return pool.map(fn, jobs, chunksize=16)


def load_data(args) -> tuple[dict, dict, np.ndarray, list]:
    """Training arrays per input size ({(h, w): (N, h, w, 3) uint8}, masks likewise),
    burdens, and validation pictures at full size; optionally cached in --cache."""
    cache = None
    if args.cache:
        sizes = "-".join(f"{h}x{w}" for h, w in input_sizes())
        cache = Path(args.cache) / f"demo-data-s{args.seed}-n{args.train_images}-v{args.val_images}-{sizes}.pkl"
        if cache.exists():
            log.info("reading cached pictures from %s", cache)
            with open(cache, "rb") as f:
                return pickle.load(f)
    log.info("drawing %d training pictures", args.train_images)
    items = generate(_train_item, args.seed, TRAIN_STREAM, args.train_images, args.workers)
    data = (
        {size: np.stack([t[0][size] for t in items]) for size in input_sizes()},
        {size: np.stack([t[1][size] for t in items]) for size in input_sizes()},
        np.array([t[2] for t in items], np.float64),
        generate(_val_item, args.seed, VAL_STREAM, args.val_images, args.workers),
    )
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with open(cache, "wb") as f:
            pickle.dump(data, f, protocol=pickle.HIGHEST_PROTOCOL)
    return data


def make_example(seed: int, index: int, ex: Example) -> synth.Sample:
    """The first draw for this example that shows a lesion, erythema and the wanted grade."""
    for attempt in range(200):
        rng = np.random.default_rng([seed, EXAMPLE_STREAM, index, attempt])
        s = synth.make_sample(rng, ex.height, ex.width, target_grade=ex.grade, fitzpatrick=ex.fitzpatrick)
        lesion = (s.mask == synth.LESION).mean()
        erythema = (s.mask == synth.ERYTHEMA).mean()
        if s.grade == ex.grade and lesion >= 0.004 and erythema >= 0.01:
            return s
    raise RuntimeError(f"no acceptable draw for {ex}")


def write_examples(seed: int, root: Path) -> None:
    images = root / "examples" / "images"
    truth = root / "examples" / "ground_truth"
    for folder in (images, truth / "erythema_segmenter", truth / "lesion_segmenter"):
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.iterdir():
            old.unlink()
    rows = []
    for i, ex in enumerate(EXAMPLES):
        s = make_example(seed, i, ex)
        name = ex.stem + ex.suffix
        pil = Image.fromarray(s.image)
        # Lossy formats are applied after the ground truth was drawn, as with real photos.
        if ex.suffix == ".jpg":
            pil.save(images / name, quality=88, subsampling=2)
        elif ex.suffix == ".webp":
            pil.save(images / name, quality=88, method=6)
        elif ex.suffix == ".tif":
            pil.save(images / name, compression="tiff_adobe_deflate")
        else:
            pil.save(images / name, optimize=True)
        Image.fromarray(s.mask).save(truth / "lesion_segmenter" / f"{ex.stem}.png", optimize=True)
        binary = (s.mask == synth.ERYTHEMA).astype(np.uint8)
        Image.fromarray(binary).save(truth / "erythema_segmenter" / f"{ex.stem}.png", optimize=True)
        rows.append((name, s.grade))
        log.info(
            "example %s %dx%d grade %d (burden %.3f) fitzpatrick %d",
            name, ex.width, ex.height, s.grade, s.burden, s.fitzpatrick,
        )
    with open(truth / "severity.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "grade"])
        writer.writerows(rows)


# -- training --------------------------------------------------------------------------


def spec_for(name: str, weights: Path, sha256: str = "0" * 64) -> ModelSpec:
    return ModelSpec(
        name=name,
        weights=weights,
        sha256=sha256,
        normalize={"mean": MEAN, "std": STD},
        **MODELS[name],
    )


def to_tensor(batch_u8: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(batch_u8).float().div_(255.0)
    x = (x - torch.tensor(MEAN)) / torch.tensor(STD)
    return x.permute(0, 3, 1, 2).contiguous()


def augment(rng: np.random.Generator, x: np.ndarray, y: np.ndarray | None):
    """Flips and quarter turns, per sample (inputs are square)."""
    xs, ys = [], []
    for i in range(len(x)):
        k, fh, fv = rng.integers(4), rng.uniform() < 0.5, rng.uniform() < 0.5
        xi = np.rot90(x[i], k)
        yi = None if y is None else np.rot90(y[i], k)
        if fh:
            xi = xi[:, ::-1]
            yi = None if yi is None else yi[:, ::-1]
        if fv:
            xi = xi[::-1]
            yi = None if yi is None else yi[::-1]
        xs.append(xi)
        ys.append(yi)
    x_out = np.ascontiguousarray(np.stack(xs))
    return x_out, (None if y is None else np.ascontiguousarray(np.stack(ys)))


def dice_loss(probs: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    total = probs.sum(dims) + onehot.sum(dims)
    return 1 - ((2 * inter + 1) / (total + 1)).mean()


def train(name: str, module: torch.nn.Module, x: np.ndarray, target: np.ndarray, steps: int, batch: int, lr: float, seed: int):
    """Train in place. `target`: masks (N, H, W) for segmentation, burden (N,) for severity."""
    task, classes = MODELS[name]["task"], MODELS[name]["classes"]
    rng = np.random.default_rng([seed, 100, len(name)])
    opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    module.train()
    started = time.perf_counter()
    running = 0.0
    grades = torch.arange(synth.GRADES, dtype=torch.float32)
    for step in range(1, steps + 1):
        idx = rng.integers(0, len(x), batch)
        if task == "severity":
            xb, _ = augment(rng, x[idx], None)
            logits = module(to_tensor(xb))
            # Soft ordinal target: a Gaussian around the continuous grade position, so
            # neighbouring grades are cheap mistakes and the argmax lands on floor(burden/step).
            pos = torch.from_numpy(np.clip(target[idx] / synth.GRADE_STEP - 0.5, 0, synth.GRADES - 1)).float()
            soft = torch.softmax(-((grades[None] - pos[:, None]) ** 2) / (2 * 0.6**2), dim=1)
            log_p = F.log_softmax(logits, 1)
            # Plus the squared error of the expected grade: keeps the distribution ordinal.
            expected = (log_p.exp() * grades[None]).sum(1)
            loss = -(soft * log_p).sum(1).mean() + 0.05 * ((expected - pos) ** 2).mean()
        else:
            xb, yb = augment(rng, x[idx], target[idx])
            logits = module(to_tensor(xb))
            y = torch.from_numpy(yb).long()
            if classes == 1:
                fg = (y == synth.ERYTHEMA).float()[:, None]
                loss = F.binary_cross_entropy_with_logits(logits, fg) + dice_loss(torch.sigmoid(logits), fg)
            else:
                onehot = F.one_hot(y, classes).permute(0, 3, 1, 2).float()
                loss = F.cross_entropy(logits, y) + dice_loss(torch.softmax(logits, 1), onehot)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running += loss.item()
        if step % 50 == 0 or step == steps:
            log.info("%s step %d/%d loss %.4f (%.0fs)", name, step, steps, running / 50, time.perf_counter() - started)
            running = 0.0
    module.eval()


def validate(name: str, module: torch.nn.Module, val: list) -> float:
    """Quality on freshly drawn held-out pictures, with the SPEC semantics (original size)."""
    spec = spec_for(name, Path("unused.safetensors"))
    loaded = SimpleNamespace(spec=spec, module=module, mean=MEAN, std=STD)  # what predict() reads
    scores = []
    for image, mask, grade in val:
        if spec.task == "severity":
            pred, _ = demo_eval.predict(loaded, image)
            scores.append(abs(pred - grade) <= 1)
        else:
            truth = (mask == synth.ERYTHEMA).astype(np.uint8) if spec.classes == 1 else mask
            scores.append(demo_eval.mask_score(demo_eval.predict(loaded, image), truth, spec.classes))
    return float(np.mean(scores))


def start_from_erythema_encoder(module: torch.nn.Module, weights: Path) -> None:
    """Copy the trained erythema_segmenter encoder (same timm model) into `module.encoder`.

    Grading is mostly about how much red skin there is, which that encoder already
    detects; starting from it makes the classifier converge in a few hundred steps.
    """
    from safetensors.torch import load_file

    state = load_file(str(weights))
    encoder = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    module.encoder.load_state_dict(encoder, strict=True)
    log.info("severity_classifier starts from the encoder of %s", weights.name)


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_manifest(hashes: dict[str, str], root: Path) -> None:
    models = {}
    for name, cfg in MODELS.items():
        entry = {"task": cfg["task"]}
        if "arch" in cfg:
            entry["arch"] = cfg["arch"]
        entry.update(
            encoder=cfg["encoder"],
            classes=cfg["classes"],
            labels=cfg["labels"],
            weights=f"examples/weights/{name}.safetensors",
            sha256=hashes[name],
            input_size=list(cfg["input_size"]),
            resize="stretch",
            interpolation="linear",
            normalize={"mean": list(MEAN), "std": list(STD)},
        )
        if cfg["task"] == "segmentation":
            entry["arch_params"] = cfg["arch_params"]
            if cfg["classes"] == 1:
                entry["threshold"] = 0.5
        else:
            entry.update(temperature=1.0, pooling="avg")
        models[name] = entry
    header = (
        "# Demo experts bundled with legitseg: trained on synthetic pictures only, NOT for\n"
        "# clinical use. Regenerate with `python tools/make_demo.py` (docs/demo.md).\n"
    )
    body = yaml.safe_dump({"version": 1, "models": models}, sort_keys=False, default_flow_style=None, width=100)
    (root / "models.yaml").write_text(header + body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Regenerate the bundled demo experts and example images.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", default=str(ROOT), help="where examples/ and models.yaml go (default: the repository)")
    parser.add_argument("--train-images", type=int, default=1200)
    parser.add_argument("--val-images", type=int, default=64)
    parser.add_argument("--seg-steps", type=int, default=450)
    parser.add_argument("--sev-steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2, help="processes drawing pictures")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--cache", help="folder to keep the drawn training pictures in between runs")
    parser.add_argument("--keep-examples", action="store_true", help="do not redraw examples/")
    parser.add_argument("--only", help="comma-separated experts to retrain (others keep their weights)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    started = time.perf_counter()

    root = Path(args.root).resolve()
    if not args.keep_examples:
        write_examples(args.seed, root)
    x, masks, burden, val = load_data(args)
    log.info("data ready (%.0fs); grade histogram %s", time.perf_counter() - started,
             np.bincount([synth.grade_of(b) for b in burden], minlength=synth.GRADES).tolist())

    weights_dir = root / "examples" / "weights"
    weights_dir.mkdir(parents=True, exist_ok=True)
    only = set(args.only.split(",")) if args.only else set(MODELS)
    from safetensors.torch import save_file

    for name in TRAIN_ORDER:
        path = weights_dir / f"{name}.safetensors"
        if name not in only:
            continue
        cfg = MODELS[name]
        torch.manual_seed(args.seed * 1000 + list(MODELS).index(name))
        module = build_module(spec_for(name, path))
        params = sum(p.numel() for p in module.parameters())
        log.info("training %s (%s, %.2fM parameters)", name, cfg["encoder"], params / 1e6)
        if cfg["task"] == "severity":
            start_from_erythema_encoder(module, weights_dir / "erythema_segmenter.safetensors")
            train(name, module, x[cfg["input_size"]], burden, args.sev_steps, args.batch_size, 2e-3, args.seed)
        else:
            steps = args.seg_steps
            train(name, module, x[cfg["input_size"]], masks[cfg["input_size"]], steps, args.batch_size, 3e-3, args.seed)
        log.info("%s validation (%d fresh pictures): %.3f", name, len(val), validate(name, module, val))
        state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
        # One metadata key only: safetensors writes several in a random order, and the
        # file's sha256 should depend on the tensors alone.
        save_file(state, str(path), metadata={"format": "pt"})
    write_manifest({name: sha256_file(weights_dir / f"{name}.safetensors") for name in MODELS}, root)
    elapsed = time.perf_counter() - started
    total = sum((weights_dir / f"{n}.safetensors").stat().st_size for n in MODELS)
    log.info("done in %.1f min; weights %.2f MB in total", elapsed / 60, total / 1e6)
    manifest, preds = demo_eval.predictions_in_process(root)
    demo_eval.report(manifest, preds, root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
