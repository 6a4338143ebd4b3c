"""SPEC 4.3 / 4.4 on hand-made logits: activation, threshold, argmax, areas, regions, scores."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from legitseg.inference.postprocess import (
    argmax_planes,
    segmentation,
    severity,
    sigmoid_cutoff,
    upsample,
)
from legitseg.manifest.spec import ModelSpec

TINY = "tu-test_resnet.r160_in1k"


def spec(task: str = "segmentation", **fields) -> ModelSpec:
    base = dict(name="lesion", task=task, encoder=TINY, weights=Path("w.safetensors"), sha256="0" * 64,
                input_size=(32, 32))
    if task == "segmentation":
        base["arch"] = "Unet"
    return ModelSpec(**{**base, **fields})


def sigmoid(x):
    return 1 / (1 + np.exp(-np.asarray(x, np.float64)))


def logit(p: float) -> float:
    return math.log(p / (1 - p))


# -- binary ------------------------------------------------------------------------------------
def test_binary_mask_is_sigmoid_above_threshold():
    values = np.array([[-3.0, logit(0.3) - 1e-3, logit(0.3) + 1e-3],
                       [0.0, 2.0, -0.5]], np.float32)
    r = segmentation(torch.from_numpy(values)[None], (2, 3), spec(threshold=0.3), True)
    assert r.mask.dtype == np.uint8
    assert r.mask.tolist() == [[0, 0, 1], [1, 1, 1]]
    assert r.probabilities.dtype == np.float16 and r.probabilities.shape == (1, 2, 3)
    np.testing.assert_allclose(r.probabilities[0], sigmoid(values), atol=5e-4)
    assert r.area_fraction == {"lesion": pytest.approx(4 / 6)}
    assert r.components == {"lesion": 1}


@pytest.mark.parametrize("threshold", [0.5, 0.3, 0.9, 1e-4, 0.9999])
def test_the_logit_cutoff_gives_the_sigmoid_threshold_mask_near_the_boundary(threshold):
    # The mask is `logits > cutoff`; it must equal `sigmoid(logits) > threshold` as torch computes
    # it, also for the float32 values right at the boundary, where float64 math would disagree.
    cut = torch.tensor(sigmoid_cutoff(threshold), dtype=torch.float32)
    near = [cut]
    for _ in range(300):
        near.append(torch.nextafter(near[-1], torch.tensor(-math.inf)))
    up = [cut]
    for _ in range(300):
        up.append(torch.nextafter(up[-1], torch.tensor(math.inf)))
    wide = torch.linspace(logit(threshold) - 0.01, logit(threshold) + 0.01, 4001)
    x = torch.cat([torch.stack(near), torch.stack(up), wide, torch.randn(4000) * 5]).float()
    want = (torch.sigmoid(x) > threshold).to(torch.uint8)
    side = int(math.isqrt(x.numel())) + 1
    grid = torch.full((side * side,), -50.0)
    grid[: x.numel()] = x
    r = segmentation(grid.view(1, side, side), (side, side), spec(threshold=threshold), False)
    assert r.mask.ravel()[: x.numel()].tolist() == want.tolist()
    assert 0 < want.sum() < x.numel()


def test_argmax_planes_is_the_argmax_of_the_softmax_ties_and_nans_included():
    g = torch.Generator().manual_seed(5)
    x = torch.randint(-3, 4, (4, 50, 60), generator=g).float()  # small integers: many ties
    x[2, 0, :5] = math.nan  # a NaN logit makes the whole softmax NaN: argmax 0
    x[0, 1, :5] = math.nan
    want = torch.softmax(x, dim=0).argmax(dim=0)
    got = argmax_planes(x.numpy())
    assert got.dtype == np.uint8 and got.tolist() == want.tolist()
    assert got[0, :5].tolist() == [0] * 5 and got[1, :5].tolist() == [0] * 5
    many = torch.randn(300, 4, 5, generator=g)
    got = argmax_planes(many.numpy())
    assert got.dtype == np.uint16 and got.tolist() == many.argmax(dim=0).tolist()


def test_the_cpu_upsample_matches_torch_bilinear_within_1e_4():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 24, 40, generator=g) * 4
    ours = upsample(logits, (301, 499))
    ref = torch.nn.functional.interpolate(logits[None], size=(301, 499), mode="bilinear", align_corners=False)[0]
    assert ours.shape == ref.shape
    assert float((ours - ref).abs().max()) < 1e-4
    # ...and downsizing too (tile and letterbox maps can be larger than the picture).
    small = upsample(logits, (7, 9))
    ref = torch.nn.functional.interpolate(logits[None], size=(7, 9), mode="bilinear", align_corners=False)[0]
    assert float((small - ref).abs().max()) < 1e-4


def test_a_probability_equal_to_the_threshold_is_background():
    r = segmentation(torch.zeros(1, 2, 2), (2, 2), spec(), False)  # sigmoid(0) == 0.5 == threshold
    assert r.mask.tolist() == [[0, 0], [0, 0]]
    assert r.probabilities is None
    assert r.area_fraction == {"lesion": 0.0} and r.components == {"lesion": 0}


def test_logits_are_resized_bilinearly_before_the_sigmoid():
    # Upsampling [-1, 1] from width 2 to 4 with align_corners=False samples the source at
    # x = -0.25, 0.25, 0.75, 1.25 (clamped at the edges): logits -1, -0.5, 0.5, 1.
    r = segmentation(torch.tensor([[[-1.0, 1.0]]]), (1, 4), spec(), True)
    np.testing.assert_allclose(r.probabilities[0, 0], sigmoid([-1, -0.5, 0.5, 1]), atol=5e-4)
    assert r.mask.tolist() == [[0, 0, 1, 1]]
    # Resizing probabilities instead would give 0.5 * (sigmoid(-1) + sigmoid(1)) ... not these.
    assert abs(sigmoid(-0.5) - (0.75 * sigmoid(-1) + 0.25 * sigmoid(1))) > 5e-3


def test_downsizing_keeps_the_original_size():
    logits = torch.randn(1, 8, 10, generator=torch.Generator().manual_seed(0))
    r = segmentation(logits, (37, 23), spec(), True)
    assert r.mask.shape == (37, 23) and r.probabilities.shape == (1, 37, 23)


def test_components_use_8_connectivity():
    on, off = 5.0, -5.0
    diagonal = [[on, off, off, on],
                [off, on, off, off],
                [off, off, off, on],
                [on, off, off, on]]
    r = segmentation(torch.tensor([diagonal]), (4, 4), spec(), False)
    # {(0,0), (1,1)} touch diagonally; {(2,3), (3,3)}; (0,3) and (3,0) are alone.
    assert r.components == {"lesion": 4}
    assert r.area_fraction == {"lesion": pytest.approx(6 / 16)}


def test_binary_labels_come_from_the_manifest():
    r = segmentation(torch.full((1, 2, 2), 3.0), (2, 2), spec(labels=["skin", "erythema"]), False)
    assert r.area_fraction == {"erythema": 1.0} and r.components == {"erythema": 1}


# -- multi-class ---------------------------------------------------------------------------------
def test_multiclass_mask_is_argmax_of_softmax():
    logits = torch.tensor([
        [[3.0, 0.0, 0.0], [0.0, 0.0, 1.0]],  # class 0
        [[0.0, 2.0, 0.0], [0.0, 5.0, 0.0]],  # class 1
        [[0.0, 0.0, 4.0], [9.0, 0.0, 0.0]],  # class 2
    ])
    r = segmentation(logits, (2, 3), spec(classes=3), True)
    assert r.mask.tolist() == [[0, 1, 2], [2, 1, 0]]
    want = torch.softmax(logits.double(), dim=0).numpy()
    assert r.probabilities.shape == (3, 2, 3)
    np.testing.assert_allclose(r.probabilities, want, atol=1e-3)
    np.testing.assert_allclose(r.probabilities.astype(np.float32).sum(axis=0), 1, atol=2e-3)
    assert r.area_fraction == {"class_1": pytest.approx(2 / 6), "class_2": pytest.approx(2 / 6)}
    assert r.components == {"class_1": 1, "class_2": 2}


def test_multiclass_labels_and_empty_classes():
    logits = torch.zeros(4, 3, 3)
    logits[2] = 1.0
    r = segmentation(logits, (3, 3), spec(classes=4, labels=["bg", "a", "b", "c"]), False)
    assert r.area_fraction == {"a": 0.0, "b": 1.0, "c": 0.0}
    assert r.components == {"a": 0, "b": 1, "c": 0}


def test_more_than_255_classes_give_a_16_bit_mask():
    logits = torch.zeros(300, 2, 2)
    logits[299, 0, 0] = 1.0
    logits[256, 1, 1] = 1.0
    r = segmentation(logits, (2, 2), spec(classes=300), False)
    assert r.mask.dtype == np.uint16
    assert r.mask.tolist() == [[299, 0], [0, 256]]


# -- severity -------------------------------------------------------------------------------------
def test_severity_softmax_with_temperature_grade_and_score():
    # logits / 2 = [0, ln 2, 2 ln 2] -> exp = 1, 2, 4 -> p = 1/7, 2/7, 4/7
    logits = torch.tensor([0.0, 2 * math.log(2), 4 * math.log(2)])
    r = severity(logits, spec("severity", classes=3, temperature=2.0, class_values=[0, 10, 20]))
    assert r.probabilities == pytest.approx([1 / 7, 2 / 7, 4 / 7], abs=1e-6)
    assert r.grade == 2
    assert r.score == pytest.approx(100 / 7, rel=1e-6)


def test_severity_default_class_values_are_the_class_indices():
    logits = torch.tensor([0.0, math.log(2), 2 * math.log(2)])
    r = severity(logits, spec("severity", classes=3))
    assert r.score == pytest.approx((0 * 1 + 1 * 2 + 2 * 4) / 7, rel=1e-6)


def test_grade_is_argmax_not_the_rounded_score():
    # Most mass on class 0, but a long tail of high values pulls the expected value up.
    logits = torch.log(torch.tensor([0.4, 0.0001, 0.0001, 0.3, 0.2999 - 0.0001]))
    r = severity(logits, spec("severity", classes=5, class_values=[0, 1, 2, 30, 40]))
    assert r.grade == 0
    assert r.score == pytest.approx(0.3 * 30 + 0.2998 * 40 + 0.0001 * 3, rel=1e-4)


def test_severity_is_stable_for_large_logits():
    r = severity(torch.tensor([1000.0, 0.0, -1000.0]), spec("severity", classes=3))
    assert r.probabilities == pytest.approx([1.0, 0.0, 0.0])
    assert r.grade == 0 and r.score == pytest.approx(0.0)


def test_components_past_65535_regions_are_counted():
    """16-bit labels overflow there; the count must still be exact (inference/postprocess.py)."""
    from legitseg.inference.postprocess import count_components

    dots = np.zeros((600, 600), np.uint8)
    dots[::2, ::2] = 1  # isolated pixels even with 8-connectivity
    assert count_components(dots, 1, binary=True) == 300 * 300
    assert count_components(dots * 2, 2) == 300 * 300
    assert count_components(dots[:100, :100], 1, binary=True) == 50 * 50
