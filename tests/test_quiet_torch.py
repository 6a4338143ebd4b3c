"""While a run streams images through models that all run on ONNX Runtime on the CPU, torch (which
only normalises inputs then) uses one intra-op thread, so that its OpenMP team does not spin on
the cores ONNX Runtime needs; the caller's setting comes back afterwards. A Predictor, a stream
in the caller's process, leaves it alone, and so does a run with a torch model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from legitseg.inference import ort_runner, torch_runner
from tests.conftest import ModelKit, invoke_cli
from tests.images import picture, save

SMALL = {"decoder_channels": [16, 8, 8, 8, 8]}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("quiet-torch")
    kit = ModelKit(root)
    kit.add("seg", input_size=(64, 64), arch_params=SMALL)
    for i in range(6):
        save(root / "img" / f"{i}.png", picture(48, 64, i))
    return kit.write(), root / "img"


@pytest.fixture
def seen(monkeypatch):
    """torch's intra-op threads at each forward pass, per backend (the engine's, after the gate's)."""
    threads: dict[str, list[int]] = {"onnxruntime": [], "torch": []}
    for cls, name in ((ort_runner.OrtRunner, "onnxruntime"), (torch_runner.TorchRunner, "torch")):
        forward = cls.logits

        def logits(self, arrays, _forward=forward, _name=name):
            threads[_name].append(torch.get_num_threads())
            return _forward(self, arrays)

        monkeypatch.setattr(cls, "logits", logits)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield threads
    torch.set_num_threads(before)


def test_an_onnx_runtime_run_streams_with_one_torch_thread_and_restores_it(world, seen, tmp_path):
    manifest, photos = world
    r = invoke_cli("run", photos, "-m", manifest, "-o", tmp_path / "out", "--device", "cpu", "--quiet",
                   "--batch-size", "2")
    assert r.returncode == 0, r.stderr
    # The gate's forward passes (before the stream) with the caller's 2, the stream's 3 batches with 1.
    assert seen["onnxruntime"][-3:] == [1, 1, 1] and 2 in seen["onnxruntime"], seen
    assert torch.get_num_threads() == 2


def test_a_torch_run_and_a_predictor_leave_torchs_threads_alone(world, seen, tmp_path):
    manifest, photos = world
    r = invoke_cli("run", photos, "-m", manifest, "-o", tmp_path / "out", "--device", "cpu", "--quiet",
                   "--backend", "torch")
    assert r.returncode == 0, r.stderr
    assert seen["torch"] and set(seen["torch"]) == {2}, seen
    from legitseg import Predictor

    predictor = Predictor(manifest, device="cpu", backend="onnxruntime")
    assert predictor.backends == {"seg": "onnxruntime"}
    seen["onnxruntime"].clear()
    assert all(p.ok for p in predictor.predict([np.asarray(picture(48, 64, 9))] * 3))
    assert seen["onnxruntime"] and set(seen["onnxruntime"]) == {2}, seen
    assert torch.get_num_threads() == 2
