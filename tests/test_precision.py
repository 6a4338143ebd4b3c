"""Precision and memory layout change the arithmetic, not the answer.

These are the correctness checks behind the paths that `make bench` times
(benchmarks/run_bench.py): bf16 on the CPU and fp16 on CUDA agree with fp32
within a tolerance, and channels_last and contiguous give the same outputs.
Timing itself lives in the benchmark, never here.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from tests.conftest import invoke_cli as run_cli

# bf16 keeps 8 bits of mantissa (relative error ~0.4% per rounding) and fp16 11;
# through a few dozen layers that moves probabilities by a few thousandths. These
# bounds leave room for that and still catch a wrong cast, scale or layout.
TOLERANCE = {"bf16": 0.05, "fp16": 0.01}


def _images(folder: Path) -> list[str]:
    """Smooth, photo-like pictures (not white noise): odd sizes, one portrait, one PNG."""
    folder.mkdir()
    rng = np.random.default_rng(7)
    names = []
    for i, (h, w) in enumerate([(70, 90), (96, 64), (45, 33)]):
        coarse = rng.uniform(40, 220, (3, 4, 3)).astype(np.float32)
        img = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
        img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
        name = f"img{i}.{'png' if i == 2 else 'jpg'}"
        cv2.imwrite(str(folder / name), img)
        names.append(name)
    return names


def _run(manifest: Path, images: Path, out: Path, device: str, precision: str) -> dict:
    r = run_cli("run", str(images), "-m", str(manifest), "-o", str(out), "--device", device,
                "--precision", precision, "--backend", "torch", "--save-probabilities", "--quiet")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    results = {}
    for row in rows:
        assert row["status"] == "ok", row
        name = Path(row["image"]).name
        if row["model"] == "lesion":
            probs = np.load(out / row["probability_map"])["probabilities"].astype(np.float32)
            mask = cv2.imread(str(out / row["mask"]), cv2.IMREAD_UNCHANGED)
            results[(name, "lesion")] = (probs, mask)
        else:
            results[(name, row["model"])] = (np.array(row["probabilities"]), row["grade"])
    return results


def _compare(reference: dict, other: dict, tolerance: float) -> None:
    assert reference.keys() == other.keys()
    lesion = np.concatenate([p.ravel() for (_, model), (p, _) in reference.items() if model == "lesion"])
    assert lesion.min() < 0.2 and lesion.max() > 0.8, "probabilities too close to 0.5 to test anything"
    for key, (p_ref, r_ref) in reference.items():
        p, r = other[key]
        assert p.shape == p_ref.shape, key
        assert np.isfinite(p).all(), key
        diff = np.abs(p - p_ref)
        assert diff.max() <= tolerance, f"{key}: probabilities differ by up to {diff.max():.4f} > {tolerance}"
        assert diff.mean() <= tolerance / 5, f"{key}: probabilities differ by {diff.mean():.4f} on average"
        if key[1] == "lesion":
            # A mask pixel may flip only where fp32 itself was within the tolerance of the threshold.
            flipped = r != r_ref
            assert np.all(np.abs(p_ref[0][flipped] - 0.5) <= tolerance), f"{key}: mask flips far from 0.5"
        else:
            top2 = np.sort(p_ref)[-2:]
            assert r == r_ref or top2[1] - top2[0] <= 2 * tolerance, f"{key}: grade {r} != {r_ref}"


def _spread(kit, name: str, factor: float) -> None:
    """Scale a model's head so its probabilities span (0, 1) instead of hugging 0.5.

    Randomly initialised heads give logits near 0, where any tolerance would pass.
    """
    from safetensors.torch import load_file, save_file

    from legitseg.models.weights import sha256_file

    entry = kit.models[name]
    path = kit.root / entry["weights"]
    state = load_file(str(path))
    state = {k: v * factor if "_head." in k else v for k, v in state.items()}
    save_file(state, str(path))
    entry["sha256"] = sha256_file(path)


@pytest.fixture
def two_models(kit):
    kit.add("lesion", seed=1)
    kit.add("grade", task="severity", arch=None, classes=5, seed=2)
    _spread(kit, "lesion", 40.0)
    _spread(kit, "grade", 40.0)
    return kit.write()


@pytest.mark.slow
def test_bf16_on_cpu_agrees_with_fp32(two_models, tmp_path):
    images = tmp_path / "images"
    _images(images)
    fp32 = _run(two_models, images, tmp_path / "fp32", "cpu", "fp32")
    bf16 = _run(two_models, images, tmp_path / "bf16", "cpu", "bf16")
    assert len(fp32) == 6
    _compare(fp32, bf16, TOLERANCE["bf16"])
    run_json = json.loads((tmp_path / "bf16" / "run.json").read_text())
    assert run_json["precision"] == "bf16"


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 needs a CUDA device")
def test_fp16_on_cuda_agrees_with_fp32(two_models, tmp_path):
    images = tmp_path / "images"
    _images(images)
    fp32 = _run(two_models, images, tmp_path / "fp32", "cuda", "fp32")
    fp16 = _run(two_models, images, tmp_path / "fp16", "cuda", "fp16")
    _compare(fp32, fp16, TOLERANCE["fp16"])


def _runner(spec, channels_last: bool):
    from legitseg.inference.torch_runner import TorchRunner
    from legitseg.models.factory import load_model

    return TorchRunner(load_model(spec), torch.device("cpu"), "fp32", channels_last=channels_last)


@pytest.mark.parametrize("resize", ["stretch", "pad"])
def test_channels_last_and_contiguous_give_the_same_logits(kit, resize):
    from legitseg.manifest.spec import load_manifest

    kit.add("lesion", resize=resize, seed=3)
    kit.add("grade", task="severity", arch=None, classes=4, seed=4, resize=resize)
    rng = np.random.default_rng(0)
    shape = (64, 64, 3) if resize == "stretch" else (45, 70, 3)  # pad: off the stride grid
    arrays = [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(3)]
    for spec in load_manifest(kit.write()).models.values():
        fast = _runner(spec, channels_last=True).logits(arrays)
        plain = _runner(spec, channels_last=False).logits(arrays)
        assert fast.shape == plain.shape
        assert fast.shape[0] == 3
        if spec.task == "segmentation":
            assert fast.shape[2:] == shape[:2]
        torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-5)


def test_batch_of_three_matches_one_at_a_time(kit):
    """The forward bound times batches of 1-8; results must not depend on the batch (SPEC 4.5)."""
    from legitseg.manifest.spec import load_manifest

    kit.add("lesion", seed=5)
    spec = load_manifest(kit.write()).models["lesion"]
    runner = _runner(spec, channels_last=True)
    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(3)]
    together = runner.logits(arrays)
    alone = torch.cat([runner.logits([a]) for a in arrays])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)
