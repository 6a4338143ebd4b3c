"""Letterbox (docs/accuracy.md): aspect ratio kept, zeros after normalisation around the
centred content, logits cropped back exactly before the resize to the original size."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from legitseg.cli import app
from legitseg.images.geometry import content_slices, letterbox_size
from legitseg.inference.runners import Preprocessor
from tests import reference_modes as ref
from tests.conftest import ModelKit
from tests.modes_kit import decoded, legit_probs, photos, reference_modules, runners

INPUTS = [(8, 8), (32, 32), (64, 96), (96, 64), (33, 47), (47, 33), (512, 512), (384, 640)]


def test_exhaustive_sizes_padded_region_and_crop_never_disagree():
    """Every image size 1..64 x 1..64 (and some large ones) on every input size: the content
    lies inside the canvas, fills the limiting side, keeps the aspect ratio to half a pixel,
    is centred, and the crop taken back covers exactly the pixels that are not padding."""
    sizes = list(itertools.product(range(1, 65), range(1, 65))) + [(3000, 4000), (4000, 3000), (4032, 3024),
                                                                   (1, 5000), (5000, 1), (2999, 4001)]
    mismatches, pairs = [], 0
    for (ih, iw), (h, w) in itertools.product(INPUTS, sizes):
        pairs += 1
        rh, rw = letterbox_size(h, w, ih, iw)
        rows, cols = content_slices(rh, rw, ih, iw, centred=True)
        canvas = np.zeros((ih, iw), np.int8)
        canvas[rows, cols] += 1  # where the preprocessor puts the content
        crop = canvas[rows, cols]  # what the crop takes back
        ok = (crop.shape == (rh, rw) and crop.min() == 1 and canvas.sum() == rh * rw
              and (rh == ih or rw == iw)
              and abs(rows.start - (ih - rows.stop)) <= 1 and abs(cols.start - (iw - cols.stop)) <= 1)
        # The other side is the exact scaled length rounded (half a pixel at most).
        if rw == iw:
            ok = ok and (abs(rh - h * iw / w) <= 0.5 or rh in (1, ih))
        else:
            ok = ok and (abs(rw - w * ih / h) <= 0.5 or rw in (1, iw))
        if not ok:
            mismatches.append(((h, w), (ih, iw), (rh, rw), rows, cols))
    assert pairs > 30000
    assert mismatches == []


def test_preprocessor_puts_normalised_content_in_the_centre_and_zeros_around():
    """The real preprocessor on many small sizes: the crop is the normalised input, the rest 0."""
    mean = torch.tensor([0.2, 0.5, 0.7]).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.3, 0.2, 0.25]).view(1, 3, 1, 1) * 255
    rng = np.random.default_rng(0)
    for ih, iw in [(8, 8), (16, 24), (24, 16), (13, 9)]:
        pre = Preprocessor(mean, std, 32, False, torch.device("cpu"), False, (ih, iw), True)
        for h, w in itertools.product(range(1, 40, 3), range(1, 40, 5)):
            rh, rw = letterbox_size(h, w, ih, iw)
            a = rng.integers(0, 256, (rh, rw, 3), dtype=np.uint8)
            x = pre.tensor([a])[0]
            rows, cols = content_slices(rh, rw, ih, iw, True)
            want = (torch.from_numpy(a).permute(2, 0, 1).float() - mean[0]) / std[0]
            assert torch.allclose(x[:, rows, cols], want, atol=1e-6)
            outside = x.clone()
            outside[:, rows, cols] = 0
            assert outside.abs().max() == 0


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("letterbox")
    kit = ModelKit(root)
    kit.add("wide", resize="letterbox", input_size=[64, 96], classes=1)
    kit.add("square", resize="letterbox", input_size=[64, 64], classes=3, tta=["hflip", "rot90"], seed=1)
    kit.add("grader", task="severity", arch=None, classes=4, resize="letterbox", input_size=[64, 64], seed=2)
    return kit, kit.write(), photos(root / "img", [(75, 101), (120, 64), (64, 96), (31, 200)])


@pytest.mark.parametrize("name", ["wide", "square", "grader"])
def test_letterbox_matches_the_reference_on_both_backends(setup, name):
    kit, manifest, files = setup
    modules = reference_modules(kit, name)
    entry = kit.models[name]
    by_backend = runners(manifest, name)
    for path in files:
        rgb = decoded(path)
        want = ref.letterbox(modules, rgb, entry, list(entry.get("tta", [])))
        for backend, runner in by_backend.items():
            got = legit_probs(runner, rgb)
            assert got.shape == want.shape, (backend, path.name)
            assert np.abs(got - want).max() < 1e-4, (backend, path.name, np.abs(got - want).max())


def test_letterbox_masks_are_the_original_size_and_batch_across_aspect_ratios(setup, tmp_path):
    from PIL import Image

    _, manifest, files = setup
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", str(files[0].parent), "-o", str(out), "-m", str(manifest),
                                      "--device", "cpu", "--batch-size", "4", "--models", "wide,square"])
    assert result.exit_code == 0, result.output
    for f in files:
        with Image.open(f) as src, Image.open(out / "masks" / "wide" / f"{f.name}.png") as mask:
            assert mask.size == src.size
