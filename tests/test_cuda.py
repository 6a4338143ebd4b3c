"""The CUDA path: same results as the CPU within float tolerance, fp16/bf16 close to fp32,
a real out-of-memory batch retried image by image. Skipped where there is no GPU
(CI has none; these run on the lent GPU machine, see docs/benchmarks.md)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _images(d: Path, n: int = 5) -> None:
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        h, w = 70 + 13 * i, 97 + 7 * i
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.dstack([np.sin(xx / (5 + i)), np.cos(yy / 7), np.sin((xx + yy) / 11)]) * 90 + 128
        img = (img + rng.normal(0, 10, img.shape)).clip(0, 255).astype(np.uint8)
        cv2.imwrite(str(d / f"{i}.png"), img)


def _run(manifest, images, out, *extra):
    from typer.testing import CliRunner

    from legitseg.cli import app

    r = CliRunner().invoke(app, ["run", str(images), "-m", str(manifest), "-o", str(out),
                                 "--save-probabilities", "-q", *extra])
    return r


def _probs(out: Path, model: str) -> dict[str, np.ndarray]:
    return {p.name: np.load(p)["probabilities"].astype(np.float32)
            for p in sorted((out / "probabilities" / model).glob("*.npz"))}


@pytest.fixture
def setup(kit, tmp_path):
    kit.add("binary", input_size=(96, 128))
    kit.add("multi", classes=4, resize="pad", seed=1)
    kit.add("grade", task="severity", classes=5, input_size=(64, 64), seed=2)
    images = tmp_path / "images"
    _images(images)
    return kit.write(), images


def test_cuda_matches_cpu_and_half_precisions_match_fp32(setup, tmp_path):
    manifest, images = setup
    outs = {}
    for tag, args in {"cpu": ["--device", "cpu", "--backend", "torch"],
                      "cuda": ["--device", "cuda", "--backend", "torch"],
                      "fp16": ["--device", "cuda", "--precision", "fp16", "--backend", "torch"],
                      "bf16": ["--device", "cuda", "--precision", "bf16", "--backend", "torch"]}.items():
        out = tmp_path / tag
        r = _run(manifest, images, out, *args)
        assert r.exit_code == 0, r.output
        outs[tag] = out
    run = json.loads((outs["fp16"] / "run.json").read_text())
    assert run["device"].startswith("cuda") and run["precision"] == "fp16"
    # fp32 on CUDA is IEEE fp32 (TF32 off for the run): agrees with the CPU to 1e-4.
    tolerance = {"cuda": 1e-4, "fp16": 1e-2, "bf16": 5e-2}
    for model in ("binary", "multi"):
        ref = _probs(outs["cpu"], model)
        assert len(ref) == 5
        for tag, tol in tolerance.items():
            got = _probs(outs[tag], model)
            for name in ref:
                assert np.abs(got[name] - ref[name]).max() < tol, (model, tag, name)
    grades = {tag: [json.loads(x) for x in (o / "scores.jsonl").read_text().splitlines() if '"grade"' in x]
              for tag, o in outs.items()}
    for tag, tol in tolerance.items():
        for a, b in zip(grades["cpu"], grades[tag], strict=True):
            assert np.abs(np.array(a["probabilities"]) - np.array(b["probabilities"])).max() < tol


def test_missing_cuda_index_exits_4(setup, tmp_path):
    manifest, images = setup
    r = _run(manifest, images, tmp_path / "out", "--device", f"cuda:{torch.cuda.device_count()}")
    assert r.exit_code == 4
    assert "CUDA device(s) present" in r.output


def test_real_out_of_memory_batch_is_retried_image_by_image(kit, tmp_path):
    """A batch far larger than the card's memory fails with a real CUDA OOM; each image alone fits."""
    side = 8192
    kit.add("big", input_size=(side, side))
    manifest = kit.write()
    images = tmp_path / "images"
    n = 24
    _images(images, n=n)
    # Activations of this model at 8192x8192 take over 10 GB per image: 24 at once exceed any card.
    batch = n
    out = tmp_path / "out"
    r = _run(manifest, images, out, "--device", "cuda", "--batch-size", str(batch), "--backend", "torch",
             "--workers", "2")
    assert r.exit_code == 0, r.output
    recs = [json.loads(p.read_text()) for p in (out / "records").glob("*.json")]
    # Every image after the failed batch succeeds: nothing of that batch stayed on the card.
    assert len(recs) == n and all(rec["status"] == "ok" for rec in recs)


def test_fp32_switches_tf32_off_for_the_run_and_restores_it(setup, tmp_path):
    manifest, images = setup
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.matmul.allow_tf32 = True
    r = _run(manifest, images, tmp_path / "fp32", "--device", "cuda", "--backend", "torch")
    assert r.exit_code == 0, r.output
    math = json.loads((tmp_path / "fp32" / "run.json").read_text())["math"]
    assert math["convolution_fp32"] == "ieee" and math["matmul_fp32"] == "ieee"
    assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32  # restored
    r = _run(manifest, images, tmp_path / "tf32", "--device", "cuda", "--backend", "torch", "--precision", "tf32")
    assert r.exit_code == 0, r.output
    math = json.loads((tmp_path / "tf32" / "run.json").read_text())["math"]
    assert math["convolution_fp32"] == "tf32"
