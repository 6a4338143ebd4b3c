"""Images per ONNX Runtime call (legitseg/inference/ort_calls.py): chosen on the first batch by
timing, remembered in the cache folder, and never allowed to change an output bit."""

from __future__ import annotations

import io
import json
import logging

import cv2
import numpy as np
import pytest
import torch

from legitseg.fsio import cache_root
from legitseg.inference import ort_calls
from legitseg.inference.ort_runner import gate, make_session
from legitseg.inference.torch_runner import TorchRunner
from legitseg.manifest.spec import load_manifest
from legitseg.models.factory import load_model
from legitseg.models.onnx_export import INPUT, OUTPUT
from tests.conftest import invoke_cli
from tests.images import picture, save

SMALL_UNET = {"decoder_channels": [16, 16, 16, 16, 16]}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LEGITSEG_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


class Counting:
    """A real session that counts its calls and the images they carried."""

    def __init__(self, session):
        self.session, self.calls = session, []

    def run(self, names, feeds):
        self.calls.append(feeds[INPUT].shape[0])
        return self.session.run(names, feeds)


def gated_runner(kit, name="lesion"):
    loaded = load_model(load_manifest(kit.write()).models[name])
    result = gate(loaded, TorchRunner(loaded, torch.device("cpu")), 1e-4, cache_dir=cache_root())
    assert result.runner.backend == "onnxruntime", result.reason
    return result.runner


def test_the_first_batch_chooses_remembers_and_gives_the_whole_batchs_outputs(kit, cache, caplog):
    kit.add("lesion", input_size=(64, 64), arch_params=SMALL_UNET, seed=1)
    runner = gated_runner(kit)
    assert runner.tune and runner.per_call is None and runner.variant is None
    x = torch.from_numpy(np.random.default_rng(0).random((4, 3, 64, 64), dtype=np.float32))
    whole = runner.session.run([OUTPUT], {INPUT: x.numpy()})[0]
    with caplog.at_level(logging.INFO, logger="legitseg"):
        y = runner.forward(x)
    assert runner.per_call in (1, 2, 4)
    assert runner.variant == f"{runner.per_call} image(s) per call"
    assert np.array_equal(y.numpy(), whole)  # bit for bit
    assert "the fastest for a batch of 4" in caplog.text
    assert list(json.loads(ort_calls.cache_file(cache).read_text()).values()) == [runner.per_call]

    # Later batches use the choice; a short last batch is cut the same way.
    runner.session = Counting(runner.session)
    assert np.array_equal(runner.forward(x[:3]).numpy(), whole[:3])
    k = runner.per_call
    assert runner.session.calls == [min(k, 3)] * (3 // min(k, 3)) + ([3 % k] if 3 % min(k, 3) else [])

    # A new process (a new runner) reads the choice instead of measuring: one batch, its calls only.
    path = ort_calls.cache_file(cache)
    entry = json.loads(path.read_text())
    for forced in (1, 4):
        path.write_text(json.dumps(dict.fromkeys(entry, forced)))
        again = gated_runner(kit)
        again.session = Counting(again.session)
        assert np.array_equal(again.forward(x).numpy(), whole)
        assert again.per_call == forced and again.session.calls == [forced] * (4 // forced)


def test_without_the_gate_or_for_single_images_nothing_is_measured(kit, cache):
    kit.add("lesion", input_size=(64, 64), arch_params=SMALL_UNET, seed=1)
    runner = gated_runner(kit)
    runner.session = Counting(runner.session)
    runner.forward(torch.zeros(1, 3, 64, 64))
    assert runner.per_call is None and runner.session.calls == [1]
    runner.tune = False  # a runner the gate has not passed (benchmarks' ort_session) runs whole batches
    runner.forward(torch.zeros(4, 3, 64, 64))
    assert runner.per_call is None and runner.session.calls == [1, 4]
    assert not ort_calls.cache_file(cache).exists()


class BatchMean(torch.nn.Module):
    """Each image minus the batch's mean: a graph whose outputs depend on the batch."""

    def forward(self, x):
        return x - x.mean(dim=0, keepdim=True)


def test_a_split_that_changes_any_output_is_never_used(tmp_path, caplog):
    buf = io.BytesIO()
    torch.onnx.export(BatchMean(), (torch.zeros(4, 3, 8, 8),), buf, dynamo=False, input_names=[INPUT],
                      output_names=[OUTPUT], dynamic_axes={INPUT: {0: "n"}, OUTPUT: {0: "n"}})
    session = make_session(buf.getvalue(), 1)
    batch = np.random.default_rng(1).random((4, 3, 8, 8), dtype=np.float32)
    with caplog.at_level(logging.INFO, logger="legitseg"):
        per_call, y = ort_calls.choose(session, batch, "k", tmp_path, "batchmean")
    assert per_call == 4
    assert np.array_equal(y, session.run([OUTPUT], {INPUT: batch})[0])
    assert "2 image(s) per call changes the outputs; not used" in caplog.text
    assert "1 image(s) per call changes the outputs; not used" in caplog.text
    assert json.loads(ort_calls.cache_file(tmp_path).read_text()) == {"k": 4}


@pytest.mark.parametrize("stored", ["two", 0, 9, True, None])
def test_a_cached_choice_that_cannot_apply_is_measured_again(tmp_path, stored):
    buf = io.BytesIO()
    torch.onnx.export(torch.nn.Conv2d(3, 2, 3), (torch.zeros(4, 3, 8, 8),), buf, dynamo=False,
                      input_names=[INPUT], output_names=[OUTPUT], dynamic_axes={INPUT: {0: "n"}, OUTPUT: {0: "n"}})
    session = Counting(make_session(buf.getvalue(), 1))
    ort_calls.cache_file(tmp_path).write_text(json.dumps({"k": stored}))
    per_call, _ = ort_calls.choose(session, np.zeros((4, 3, 8, 8), np.float32), "k", tmp_path, "conv")
    assert len(session.calls) > 4  # measured: every candidate ran
    assert json.loads(ort_calls.cache_file(tmp_path).read_text()) == {"k": per_call}


def test_a_run_gives_the_same_files_whatever_the_images_per_call(kit, cache, tmp_path):
    kit.add("lesion", input_size=(64, 64), arch_params=SMALL_UNET, seed=1)
    manifest = kit.write()
    for i in range(6):
        save(tmp_path / "img" / f"p{i}.png", picture(80 + 8 * i, 96, i))

    def run(out: str) -> dict:
        r = invoke_cli("run", tmp_path / "img", "-m", manifest, "-o", tmp_path / out, "--backend", "onnxruntime",
                       "--batch-size", "4", "--save-probabilities", "--quiet")
        assert r.returncode == 0, r.stderr
        return json.loads((tmp_path / out / "run.json").read_text())["models"]["lesion"]

    first = run("measured")
    assert first["backend"] == "onnxruntime" and first["variant"].endswith("image(s) per call")
    path = ort_calls.cache_file(cache)
    keys = json.loads(path.read_text())
    for forced in (1, 4):
        path.write_text(json.dumps(dict.fromkeys(keys, forced)))
        assert run(f"per{forced}")["variant"] == f"{forced} image(s) per call"
    for i in range(6):
        entries = [json.loads((tmp_path / o / "records" / f"p{i}.png.json").read_text())["models"]["lesion"]
                   for o in ("measured", "per1", "per4")]
        outs = [tmp_path / o for o in ("measured", "per1", "per4")]
        masks = [cv2.imread(str(o / e["mask"]), cv2.IMREAD_UNCHANGED) for o, e in zip(outs, entries, strict=True)]
        probs = [np.load(o / e["probability_map"])["probabilities"] for o, e in zip(outs, entries, strict=True)]
        assert masks[0] is not None and 0 < masks[0].mean() < masks[0].max()  # a mask with both classes
        assert all(np.array_equal(m, masks[0]) for m in masks) and all(np.array_equal(p, probs[0]) for p in probs)
