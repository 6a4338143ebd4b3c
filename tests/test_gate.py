"""The parity rule (docs/onnx.md, "The parity gate"): ONNX Runtime runs a model whose outputs
cannot be told from torch's in what legitseg writes, however sharp its logits.

Tiny real models exported for real; where a test needs a graph that is off by a known
amount, the ONNX Runtime forward is replaced by torch's own forward plus that difference.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from legitseg.inference.ort_runner import OrtRunner
from legitseg.inference.ort_runner import gate as ort_gate
from legitseg.inference.parity_rule import FLOAT16_STEP, MAX_CHANGED_SHARE, ParityFigures, _classes
from legitseg.inference.torch_runner import TorchRunner
from legitseg.manifest.spec import load_manifest
from legitseg.models.factory import load_model
from legitseg.models.weights import sha256_file
from legitseg.verify.tolerances import Tolerances

CPU = torch.device("cpu")
UNET = {"decoder_channels": [16, 16, 16, 16, 16]}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LEGITSEG_CACHE_DIR", str(tmp_path / "cache"))


def sharp(kit, name: str, scale: float, **fields):
    """A tiny Unet whose segmentation head is multiplied by `scale`: logits as large as a trained model's."""
    entry = kit.add(name, arch_params=UNET, **fields)
    path = kit.root / entry["weights"]
    state = load_file(str(path))
    for key in ("segmentation_head.0.weight", "segmentation_head.0.bias"):
        state[key] = state[key] * scale
    save_file(state, str(path))
    entry["sha256"] = sha256_file(path)
    return load_model(load_manifest(kit.write()).models[name])


def gate(loaded, tolerance: float = 1e-4):
    return ort_gate(loaded, TorchRunner(loaded, CPU), tolerance)


def test_a_sharp_model_that_the_old_probability_gate_refused_runs_on_onnx_runtime(kit, cache):
    loaded = sharp(kit, "lesion", 1e4)
    result = gate(loaded)
    f = result.figures
    assert f.logit_scale > 1000  # logits in the thousands
    assert result.parity > 1e-4  # the old rule (max |dp| <= 1e-4) sent this model to torch
    assert result.runner.backend == "onnxruntime", result.reason
    assert f.passed and f.relative < 1e-5 and f.probability <= FLOAT16_STEP and f.changed_off_tie == 0
    assert result.runner.parity == f.probability and result.runner.parity_gate["passed"] is True


def shifted(relative: float, flip_far: bool = False):
    """An ONNX Runtime forward that returns torch's logits plus seeded noise of `relative` x max |z|;
    `flip_far`: also negate the logit farthest from the threshold (a change no rounding makes)."""
    def forward(self, x):
        with torch.inference_mode():
            z = self.loaded.module(x).float()
        g = torch.Generator().manual_seed(0)
        z = z + relative * z.abs().max() * (2 * torch.rand(z.shape, generator=g) - 1)
        if flip_far:
            k = z.abs().flatten().argmax()
            z.view(-1)[k] = -z.view(-1)[k]
        return z
    return forward


@pytest.mark.parametrize("scale, relative, flip_far, tolerance, passes, why", [
    (300, 1e-5, False, 1e-4, True, None),  # ONNX Runtime's measured rounding on the bench models
    (300, 1e-3, False, 1e-4, False, "of the largest logit > parity tolerance 0.0001"),
    (1, 1e-3, False, 1e-2, True, None),  # a looser tolerance is the manifest's to give ...
    (300, 1e-3, False, 1.0, False, "probabilities differ by"),  # ... but not past what the maps show
    (1, 0.0, True, 1.0, False, "change away from a near-tie"),
], ids=["rounding", "wrong-graph", "looser-tolerance", "past-the-float16-step", "flip-far-from-a-tie"])
def test_each_part_of_the_rule(kit, cache, monkeypatch, caplog, scale, relative, flip_far, tolerance, passes, why):
    loaded = sharp(kit, "lesion", scale)
    monkeypatch.setattr(OrtRunner, "forward", shifted(relative, flip_far))
    result = gate(loaded, tolerance)
    assert (result.runner.backend == "onnxruntime") is passes, result.reason
    assert result.figures.passed is passes and result.figures.tolerance == tolerance
    if why:
        assert why in result.reason and "using the torch backend for this model" in caplog.text
        assert result.runner.parity is None  # the gate leaves the reference alone; the registry records


def test_a_class_may_change_only_at_a_near_tie():
    class Spec:
        task, classes, threshold = "segmentation", 1, 0.5

    ref = torch.tensor([0.5 + FLOAT16_STEP / 2, 0.9, 0.1], dtype=torch.float64).view(1, 1, 1, 3)
    near = torch.tensor([0.5 - FLOAT16_STEP / 2, 0.9, 0.1], dtype=torch.float64).view(1, 1, 1, 3)
    far = torch.tensor([0.5 + FLOAT16_STEP / 2, 0.4, 0.1], dtype=torch.float64).view(1, 1, 1, 3)
    assert _classes(ref, near, Spec) == (1, 0, 3)
    assert _classes(ref, far, Spec) == (1, 1, 3)

    class Grades:
        task, classes = "severity", 3

    p = torch.tensor([[0.4, 0.4 - FLOAT16_STEP / 4, 0.2 + FLOAT16_STEP / 4], [0.7, 0.2, 0.1]], dtype=torch.float64)
    q = torch.tensor([[0.4 - FLOAT16_STEP / 4, 0.4, 0.2 + FLOAT16_STEP / 4], [0.2, 0.7, 0.1]], dtype=torch.float64)
    assert _classes(p, q, Grades) == (2, 1, 2)


def test_the_gate_is_never_laxer_than_verification_and_its_figures_are_json():
    assert MAX_CHANGED_SHARE == pytest.approx(1 - Tolerances().min_agreement)
    assert FLOAT16_STEP == float(np.spacing(np.float16(0.5)))
    f = ParityFigures(2e-4, 3e-3, 250.0, 1.2e-5, 1, 0, 8192)
    assert f.decide(1e-4) == [] and f.passed
    data = json.loads(json.dumps(f.to_json()))
    assert data["rule"].startswith("logit-relative") and data["passed"] is True and data["tolerance"] == 1e-4
    inf = ParityFigures(*(float("inf"),) * 4, 0, 0, 0)
    assert inf.decide(1.0) and inf.to_json()["relative"] is None  # run.json holds no Infinity
