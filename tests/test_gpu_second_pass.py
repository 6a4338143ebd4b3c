"""The GPU path's second pass, checked on the CPU (issue 25, items 1-5).

Each CUDA behaviour has its twin in tests/test_cuda.py; here the same code runs with CPU
tensors and with failures injected where the device would raise them: functions of
legitseg's own that raise the exception types and messages torch, cuBLAS, cuDNN and
torchvision raise. Torch itself is never replaced.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from legitseg.images import device_decode
from legitseg.images.device_memory import out_of_memory
from tests.conftest import engine_for, sources_in, torch_runners
from tests.images import picture, save

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runners(tmp_path_factory):
    from tests.conftest import ModelKit

    kit = ModelKit(tmp_path_factory.mktemp("kit"))
    kit.add("binary", input_size=(64, 96))
    kit.add("multi", classes=3, resize="pad", seed=1)
    return torch_runners(kit.write())


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("in")
    for i, turn in enumerate((1, 6, 3, 8, 1, 2)):
        save(d / f"p{i}.jpg", picture(40 + 3 * i, 60 + 2 * i, i), orientation=turn, quality=92)
    save(d / "z.png", picture(41, 59, 9))
    return d


_sources = sources_in


def _engine(runners, **kw):
    """The GPU path's engine on the CPU: postprocessing batched, JPEGs decoded in batches."""
    return engine_for(runners, **{"batched_post": True, "device_decode": True, **kw})


def _probabilities(results) -> dict[str, np.ndarray]:
    return {r.name: r.outputs["binary"].result.probabilities for r in results if r.error is None}


# -- item 1: the decoder only gets memory no queued kernel can use ------------------------------------
class Recorder(device_decode.Streams):
    """Stands in for torch.cuda's streams and records the order in which the decode uses them."""

    def __init__(self):
        super().__init__()
        self.log: list = []
        self.now = "compute"

    def compute(self, device):
        return "compute"

    def side(self, device):
        return "side"

    @contextlib.contextmanager
    def current(self, stream):
        before, self.now = self.now, stream
        self.log.append(("enter", stream))
        try:
            yield
        finally:
            self.now = before
            self.log.append(("leave", stream))

    def mark(self, stream):
        self.log.append(("mark", stream))
        return f"end of {stream}"

    def wait(self, waiting, event):
        self.log.append(("wait", waiting, event))

    def used_by(self, tensor, stream):
        self.log.append(("used_by", id(tensor), stream))


def test_the_device_decode_runs_on_a_side_stream_that_compute_then_waits_for(folder, monkeypatch):
    recorder, real = Recorder(), device_decode._decode

    def decoding(encoded, device):
        recorder.log.append(("decode", recorder.now))
        return real(encoded, device)

    monkeypatch.setattr(device_decode, "_decode", decoding)
    data = [torch.frombuffer(bytearray((folder / f"p{i}.jpg").read_bytes()), dtype=torch.uint8) for i in range(3)]
    images = device_decode.decode(data, torch.device("cpu"), recorder)
    assert recorder.log == [("enter", "side"), ("decode", "side"), ("leave", "side"), ("mark", "side"),
                            ("wait", "compute", "end of side"), *[("used_by", id(image), "compute") for image in images]]


def test_decoding_ahead_leaves_the_compute_stream_alone_until_the_images_are_used(folder, monkeypatch):
    """The decode-ahead thread queues nothing on the compute stream: the compute thread's `ready` does,
    when it is about to use the images (a wait queued earlier would hold up the batch being launched)."""
    recorder = Recorder()
    data = [torch.frombuffer(bytearray((folder / f"p{i}.jpg").read_bytes()), dtype=torch.uint8) for i in range(2)]
    images, marker = device_decode.decode_ahead(data, torch.device("cpu"), recorder)
    assert [entry[0] for entry in recorder.log] == ["enter", "leave", "mark"]
    assert all(entry[-1] != "compute" for entry in recorder.log)
    device_decode.ready(images, marker, torch.device("cpu"), recorder)
    assert recorder.log[3:] == [("wait", "compute", "end of side"), *[("used_by", id(i), "compute") for i in images]]


def test_a_decode_out_of_memory_is_raised_before_compute_is_told_anything(folder, monkeypatch):
    recorder = Recorder()

    def failing(encoded, device):
        raise RuntimeError("Error while decoding JPEG images: Failed to decode batch: 5")

    monkeypatch.setattr(device_decode, "_decode", failing)
    with pytest.raises(RuntimeError, match="batch: 5"):
        device_decode.decode([torch.zeros(4, dtype=torch.uint8)], torch.device("cpu"), recorder)
    assert recorder.log == [("enter", "side"), ("leave", "side")]


# -- item 4: out of memory, classified by type and message ---------------------------------------------
@pytest.mark.parametrize(("error", "oom"), [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (RuntimeError("CUDA error: out of memory"), True),
    (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"), True),
    (RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"), True),
    (RuntimeError("Error while decoding JPEG images: Failed to decode batch: 5"), True),  # NVJPEG_STATUS_ALLOCATOR_FAILURE
    (RuntimeError("Error while decoding JPEG images: Failed to synchronize CUDA stream: 2"), True),
    (RuntimeError("Error while decoding JPEG images: Failed to decode batch: 3"), False),  # a bad JPEG
    (RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED"), False),
    (ValueError("out of memory"), False),
])
def test_out_of_memory_is_told_by_type_and_message(error, oom):
    assert out_of_memory(error) is oom


def test_a_cublas_alloc_failure_in_the_forward_pass_halves_the_batch(runners, folder, monkeypatch, caplog):
    plain = _probabilities(_engine(runners, device_decode=False, batched_post=False).process(_sources(folder)))
    runner = runners[0]
    real = type(runner).logits

    def small_card(self, arrays):
        if self is runner and len(arrays) > 1:
            raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")
        return real(self, arrays)

    monkeypatch.setattr(type(runner), "logits", small_card)
    engine = _engine(runners, device_decode=False, batched_post=False)
    got = _probabilities(engine.process(_sources(folder)))
    assert got.keys() == plain.keys() and len(got) == 7
    # batches of one sum in another order than batches of four: float rounding, no more
    assert all(np.abs(got[k].astype(np.float32) - plain[k]).max() <= 2e-3 for k in plain)
    assert engine.batch_limit == {"binary": 1}
    assert "out of memory on a batch of" in caplog.text


def test_a_forward_out_of_memory_that_passes_after_emptying_the_cache_keeps_the_batch(runners, folder, monkeypatch):
    runner = runners[0]
    real, failures = type(runner).logits, [1]

    def once(self, arrays):
        if self is runner and failures:
            failures.pop()
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
        return real(self, arrays)

    monkeypatch.setattr(type(runner), "logits", once)
    engine = _engine(runners, device_decode=False, batched_post=False)
    assert all(r.error is None for r in engine.process(_sources(folder)))
    assert engine.batch_limit == {}  # retried at the same size: nothing given up


def test_a_decode_out_of_memory_decodes_that_batch_on_the_cpu_in_the_decode_pool(runners, folder, monkeypatch,
                                                                                 caplog):
    from legitseg.engines.device_inputs import DeviceInputs

    plain = _probabilities(_engine(runners, device_decode=False).process(_sources(folder)))
    calls, threads = [], []
    real_cpu, real_decode = DeviceInputs.decode_on_cpu, device_decode._decode

    def out_of_memory_first(encoded, device):
        calls.append(len(encoded))
        if len(calls) <= 2:  # the first batch: out of memory, and again after emptying the cache
            raise RuntimeError("Error while decoding JPEG images: Failed to decode batch: 5")
        return real_decode(encoded, device)

    def cpu(self, item):
        threads.append(threading.current_thread().name)
        return real_cpu(self, item)

    monkeypatch.setattr(device_decode, "_decode", out_of_memory_first)
    monkeypatch.setattr(DeviceInputs, "decode_on_cpu", cpu)
    engine = _engine(runners)
    got = _probabilities(engine.process(_sources(folder)))
    assert got.keys() == plain.keys()
    assert calls == [4, 4, 2]  # tried twice, then the next batch on the device again
    assert engine.device_decode  # not taken for a refusal
    assert len(threads) == 4 and all(t.startswith("legitseg-decode") for t in threads)
    for name in ("p0.jpg", "p1.jpg", "p2.jpg", "p3.jpg"):  # OpenCV's pixels for the first batch: exact
        assert np.array_equal(got[name], plain[name]), name
    assert "this batch is decoded on the CPU" in caplog.text


def test_out_of_memory_moving_inputs_to_the_device_halves_the_batch(runners, folder, monkeypatch):
    """Room for one image's inputs at a time: pinning the second raises; the batch goes in halves, then ones."""
    from legitseg.engines.device_inputs import DeviceInputs

    plain = _probabilities(_engine(runners, device_decode=False).process(_sources(folder)))
    held = [0]
    real_to_device, real_orient = DeviceInputs._to_device, device_decode.orient

    def to_device(self, batch, decoded, pool):
        held[0] = 0
        return real_to_device(self, batch, decoded, pool)

    def orient(image, turn):
        held[0] += 1
        if held[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 12.00 MiB")
        return real_orient(image, turn)

    monkeypatch.setattr(DeviceInputs, "_to_device", to_device)
    monkeypatch.setattr(device_decode, "orient", orient)
    engine = _engine(runners)
    results = list(engine.process(_sources(folder)))
    assert [r.error for r in results] == [None] * 7
    assert engine.upload_limit == 1
    got = _probabilities(results)
    assert np.abs(got["z.png"].astype(np.float32) - plain["z.png"]).max() <= 2e-3  # OpenCV's pixels, batch of one
    assert all(np.abs(got[k].astype(np.float32) - plain[k]).max() <= 0.02 for k in plain)


def test_an_image_that_does_not_fit_even_alone_fails_alone(runners, folder, monkeypatch):
    real = device_decode.orient

    def orient(image, turn):
        if tuple(image.shape[-2:]) == (43, 62):  # p1.jpg
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")
        return real(image, turn)

    monkeypatch.setattr(device_decode, "orient", orient)
    results = {r.name: r for r in _engine(runners).process(_sources(folder))}
    assert [n for n, r in results.items() if any(o.error for o in r.outputs.values())] == ["p1.jpg"]
    assert {o.error_kind for o in results["p1.jpg"].outputs.values()} == {"oom"}
    assert "even alone" in results["p1.jpg"].outputs["binary"].error


# -- item 5: the decoded size is checked against the header's ------------------------------------------
def test_a_gpu_decode_of_another_size_is_decoded_on_the_cpu_instead(runners, folder, monkeypatch, caplog):
    plain = _probabilities(_engine(runners, device_decode=False).process(_sources(folder)))
    real = device_decode._decode

    def cropping(encoded, device):
        return [image[:, :-2] if image is not None and image.shape[-1] == 62 else image  # p1.jpg loses 2 rows
                for image in real(encoded, device)]

    monkeypatch.setattr(device_decode, "_decode", cropping)
    got = _probabilities(_engine(runners).process(_sources(folder)))
    assert got.keys() == plain.keys()
    assert np.array_equal(got["p1.jpg"], plain["p1.jpg"])  # OpenCV's pixels, exactly
    assert "decoded on the CPU" in caplog.text


def test_the_ray_driver_builds_no_cuda_runner(runners):
    from legitseg.engines.ray_data import DriverRunner, driver_runners

    specs = [r.loaded.spec for r in runners]
    built = driver_runners(specs, torch.device("cuda", 0), "fp16", None)
    assert all(isinstance(r, DriverRunner) for r in built)
    assert [(r.name, r.backend, r.prep) for r in built] == [(r.name, "torch", r.prep) for r in runners]
    assert not torch.cuda.is_initialized()
    assert all(p.device.type == "cpu" for r in built for p in r.loaded.module.parameters())


def test_check_header_reads_jpeg_and_png_without_pillow_heif(tmp_path, monkeypatch):
    from legitseg.images.decode import check_header

    monkeypatch.setitem(sys.modules, "pillow_heif", None)  # importing it now raises ImportError
    jpeg = save(tmp_path / "a.jpg", picture(20, 30)).read_bytes()
    png = save(tmp_path / "a.png", picture(20, 30)).read_bytes()
    assert check_header(jpeg, 10**8) == "JPEG" and check_header(png, 10**8) == "PNG"


# -- item 2: TF32 through torch's new API, switched per forward call ------------------------------------
def test_runs_work_after_the_new_tf32_api_and_restore_the_callers_setting(kit, tmp_path):
    """In one process: the caller uses torch >= 2.9's fp32_precision; the API and the CLI run, the
    forward passes run in IEEE fp32, and the caller's setting is what it was afterwards."""
    kit.add("lesion", seed=3)
    manifest = kit.write()
    images = tmp_path / "in"
    images.mkdir()
    save(images / "a.jpg", picture(50, 70, 1))
    code = f"""
import json, torch
from typer.testing import CliRunner
from legitseg.api import Predictor
from legitseg.cli import app
torch.backends.fp32_precision = "tf32"
seen = []
predictor = Predictor({str(manifest)!r}, device="cpu", backend="torch")
predictor.runners[0].module.register_forward_pre_hook(
    lambda m, a: seen.append((torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision)))
ok = [p.ok for p in predictor.predict({str(images)!r})]
r = CliRunner().invoke(app, ["run", {str(images)!r}, "-m", {str(manifest)!r}, "-o", {str(tmp_path / "out")!r},
                             "--device", "cpu", "--backend", "torch", "-q"])
print(json.dumps(dict(ok=ok, cli=r.exit_code, output=r.output, seen=seen,
                      after=[torch.backends.fp32_precision, torch.backends.cudnn.conv.fp32_precision,
                             torch.backends.cuda.matmul.fp32_precision])))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["ok"] == [True] and got["cli"] == 0, got["output"]
    assert got["seen"] and set(map(tuple, got["seen"])) == {("ieee", "ieee")}
    assert got["after"] == ["tf32", "tf32", "tf32"]


def test_two_predict_generators_of_different_precisions_do_not_hold_the_switch(kit, tmp_path):
    from legitseg.api import Predictor

    kit.add("lesion", seed=4)
    manifest = kit.write()
    pictures = [picture(48, 64, s) for s in range(3)]
    fp32 = Predictor(manifest, device="cpu", precision="fp32", backend="torch")
    bf16 = Predictor(manifest, device="cpu", precision="bf16", backend="torch")
    alone = [p.results["lesion"].probabilities for p in fp32.predict(pictures, probabilities=True)]
    caller = torch.backends.cudnn.allow_tf32
    a = fp32.predict(pictures, probabilities=True)
    b = bf16.predict(pictures, probabilities=True)
    got = []
    for _ in pictures:
        got.append(next(a).results["lesion"].probabilities)
        assert torch.backends.cudnn.allow_tf32 == caller  # nothing held open across the yield
        next(b)
    assert all(np.array_equal(x, y) for x, y in zip(got, alone, strict=True))


# -- item 3: only exactly equivalent variants are chosen by timing -------------------------------------
def test_half_weights_are_asked_for_by_name_and_change_the_settings_digest(kit, tmp_path, monkeypatch):
    from legitseg.inference.torch_runner import TorchRunner
    from legitseg.manifest.spec import load_manifest
    from legitseg.output.records import settings_digest

    monkeypatch.setenv("LEGITSEG_CACHE_DIR", str(tmp_path / "cache"))
    kit.add("plain", seed=5)
    kit.add("halved", seed=5, half_weights=True)
    specs = load_manifest(kit.write()).models
    assert settings_digest(specs["plain"]) != settings_digest(specs["halved"])
    from legitseg.models.factory import load_model

    arrays = [picture(64, 64, s) for s in range(2)]
    for name, dtype, variant in (("plain", torch.float32, ""), ("halved", torch.bfloat16, "+half")):
        runner = TorchRunner(load_model(specs[name]), torch.device("cpu"), "bf16", tune_layout=True,
                             cache_dir=tmp_path / "cache")
        runner.logits(arrays)  # tuned on this batch: layouts only
        assert {p.dtype for p in runner.module.parameters()} == {dtype}, name
        assert runner.variant in (f"channels_last{variant}", f"contiguous{variant}"), name
    fp32 = TorchRunner(load_model(specs["halved"]), torch.device("cpu"), "fp32")
    assert {p.dtype for p in fp32.module.parameters()} == {torch.float32}  # no half type in fp32
