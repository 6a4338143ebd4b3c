"""Sliding-window tiling (docs/accuracy.md): exact coverage, a step of at least one pixel,
a Gaussian centred exactly, tiles of several images batched together, no seams."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from legitseg.images.decode import prepare
from legitseg.images.geometry import blend_window, tile_boxes, tile_starts
from tests import reference_modes as ref
from tests.conftest import ModelKit
from tests.modes_kit import decoded, legit_probs, photos, reference_modules, runners
from tests.test_tta import Counting

SHALLOW = {"encoder_depth": 3, "decoder_channels": [32, 16, 8]}  # a small receptive field


def test_tiles_cover_every_pixel_with_a_step_of_at_least_one_and_the_asked_overlap():
    for size, tile, overlap in itertools.product(range(1, 300, 7), (8, 31, 64, 100),
                                                 (0.0, 0.25, 0.5, 0.9, 0.99, 0.999999)):
        starts = tile_starts(size, tile, overlap)
        steps = np.diff(starts)
        assert starts[0] == 0 and (steps >= 1).all(), (size, tile, overlap, starts)
        assert min(starts[-1] + tile, size) == size or size <= tile  # the last tile ends at the edge
        if len(starts) > 1:
            assert starts[-1] + tile == size
            assert steps.max() <= max(1, int(tile * (1 - overlap)))  # overlap at least as asked
        covered = np.zeros(size, int)
        for s in starts:
            covered[s:s + tile] += 1
        assert covered.min() >= 1


@pytest.mark.parametrize("th, tw", [(64, 64), (63, 64), (8, 9), (512, 384)])
def test_gaussian_window_is_centred_exactly(th, tw):
    w = blend_window(th, tw, "gaussian")
    assert w.shape == (th, tw) and w.dtype == np.float32
    assert np.array_equal(w, w[::-1]) and np.array_equal(w, w[:, ::-1])  # symmetric: centre (n-1)/2
    assert w.max() == 1.0 and w.min() > 0  # never a zero weight, so never 0/0
    peak = np.argwhere(w == w.max())
    assert set(peak[:, 0]) == {(th - 1) // 2, th // 2} and set(peak[:, 1]) == {(tw - 1) // 2, tw // 2}
    assert np.array_equal(blend_window(th, tw, "constant"), np.ones((th, tw), np.float32))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiling")
    kit = ModelKit(root)
    common = dict(classes=1, seed=5, arch_params=SHALLOW)
    kit.add("whole", resize="pad", **common)
    kit.add("gauss", resize="tile", tile_size=64, overlap=0.5, **common)
    kit.add("flat", resize="tile", tile_size=64, overlap=0.5, blend="constant", **common)
    kit.add("multi", resize="tile", tile_size=[64, 96], overlap=0.25, classes=3, seed=6, tta=["hflip"],
            arch_params=SHALLOW)
    return kit, kit.write(), photos(root / "img", [(160, 224), (40, 150), (97, 130)])


@pytest.mark.parametrize("name", ["gauss", "flat", "multi"])
def test_tiling_matches_the_reference_on_both_backends(setup, name):
    kit, manifest, files = setup
    modules = reference_modules(kit, name)
    entry = kit.models[name]
    by_backend = runners(manifest, name)
    for path in files:
        rgb = decoded(path)
        want = ref.tiled(modules, rgb, entry, list(entry.get("tta", [])))
        for backend, runner in by_backend.items():
            got = legit_probs(runner, rgb)
            assert got.shape == want.shape == (entry["classes"], *rgb.shape[:2])
            assert np.abs(got - want).max() < 1e-4, (backend, path.name, np.abs(got - want).max())


def _near_borders(h: int, w: int, boxes, k: int) -> np.ndarray:
    band = np.zeros((h, w), bool)
    for y0, x0, y1, x1 in boxes:
        for e in (y0, y1):
            if 0 < e < h:
                band[max(0, e - k):e + k, x0:x1] = True
        for e in (x0, x1):
            if 0 < e < w:
                band[y0:y1, max(0, e - k):e + k] = True
    return band


def test_tiled_output_differs_from_the_whole_image_only_near_tile_borders_and_gaussian_hides_seams(setup):
    """A pad model sees the whole image at once. With a small receptive field, tiled output is
    the whole-image output wherever a pixel is 16 px or more inside every tile edge; near the
    edges the context differs. The Gaussian weights each tile's edges down, so the difference
    there (a seam, when visible) is several times smaller than with constant weights."""
    _, manifest, files = setup
    rgb = decoded(files[0])
    whole = legit_probs(runners(manifest, "whole")["torch"], rgb)[0]
    band = _near_borders(*rgb.shape[:2], tile_boxes(*rgb.shape[:2], 64, 64, 0.5), 16)
    assert (~band).sum() > 1000
    near = {}
    for name in ("gauss", "flat"):
        d = np.abs(legit_probs(runners(manifest, name)["torch"], rgb)[0] - whole)
        assert d[~band].max() < 1e-5, name
        near[name] = d[band].max()
    assert near["flat"] > 1e-2  # the comparison can see a seam
    assert near["gauss"] < 0.3 * near["flat"], near


def test_tiles_of_several_images_share_forward_calls_of_bounded_size(setup):
    _, manifest, files = setup
    mode = runners(manifest, "multi")["torch"]
    counting = Counting(mode.members[0])
    mode.members = [counting]
    mode.tile_batch = 6
    arrays = [prepare(decoded(f), mode.prep) for f in files]
    per_image = [len(tile_boxes(*a.shape[:2], 64, 96, 0.25)) for a in arrays]
    out = mode.logits(arrays)
    assert [tuple(o.shape) for o in out] == [(3, *a.shape[:2]) for a in arrays]
    assert sum(counting.calls) == 2 * sum(per_image)  # every tile in two views, once
    assert max(counting.calls) <= 6  # memory bounded by tile_batch, not by the image size
    # Calls are filled across images: fewer calls than if each image's tiles went alone.
    assert len(counting.calls) == -(-2 * sum(per_image) // 6) < sum(-(-2 * n // 6) for n in per_image)


def test_changing_tile_settings_changes_the_settings_digest(setup):
    from legitseg.manifest.spec import load_manifest
    from legitseg.output.records import settings_digest

    _, manifest, _ = setup
    spec = load_manifest(manifest).models["gauss"]
    digests = {settings_digest(spec)}
    for change in ({"overlap": 0.25}, {"blend": "constant"}, {"tile_size": (96, 96)}, {"tta": ("hflip",)}):
        digests.add(settings_digest(spec.model_copy(update=change)))
    assert len(digests) == 5
