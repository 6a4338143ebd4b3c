"""The GPU's way through the engine, run on the CPU: batched JPEG decode, orientation and
resize on the device, and postprocessing whose arrays come back in one copy per batch.

On a GPU these run with CUDA tensors (tests/test_cuda.py checks them there against the
CPU path). Here the same code runs with CPU tensors and torchvision's CPU JPEG decoder,
so the planning, orientation, fallbacks, batching and slicing are checked on every
machine, against the CPU path that every other test covers.
"""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from legitseg.engines.transfer import Transfer
from legitseg.images import device_decode
from legitseg.images.decode import decode_rgb
from legitseg.images.decoded import Prep
from tests.images import picture, save


def _engine(runners, **kw):
    from legitseg.engines.local import Engine

    return Engine(runners, batch_size=3, workers=2, post_threads=2, save_probabilities=True, max_pixels=10**8,
                  stop=threading.Event(), **kw)


@pytest.fixture(scope="module")
def runners(tmp_path_factory):
    from legitseg.inference.registry import build_runner
    from legitseg.manifest.spec import load_manifest
    from legitseg.models.factory import load_model
    from tests.conftest import ModelKit

    kit = ModelKit(tmp_path_factory.mktemp("kit"))
    kit.add("binary", input_size=(64, 96))
    kit.add("multi", classes=4, resize="pad", seed=1)
    kit.add("grade", task="severity", classes=5, input_size=(64, 64), seed=2, interpolation="nearest")
    manifest = load_manifest(kit.write())
    return [build_runner(load_model(s), torch.device("cpu"), "fp32", "torch") for s in manifest.models.values()]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """JPEGs of every orientation, and files the device must leave to the CPU decoder."""
    d = tmp_path_factory.mktemp("in")
    for turn in range(1, 9):
        save(d / f"turn{turn}.jpg", picture(45 + turn, 70 + 2 * turn, turn), orientation=turn, quality=92)
    save(d / "progressive.jpg", picture(50, 64, 11), progressive=True, quality=90)
    save(d / "grey.jpg", picture(40, 52, 12)[..., 0], mode="L")
    Image.fromarray(picture(44, 60, 13)).convert("CMYK").save(d / "cmyk.jpg")
    save(d / "plain.png", picture(47, 61, 14))
    # Whole and well-formed to the header check, but a Huffman table that cannot be: refused by both decoders.
    data = bytearray((d / "turn1.jpg").read_bytes())
    dht = data.index(b"\xff\xc4")
    data[dht + 5:dht + 21] = b"\xff" * 16
    (d / "broken.jpg").write_bytes(bytes(data))
    return d


def _sources(d: Path):
    from legitseg.images.sources import Source

    return [Source(p, p.name) for p in sorted(d.iterdir())]


def test_the_device_plans_only_baseline_8_bit_colour_jpegs(folder):
    planned = {p.name: device_decode.plan(p.read_bytes(), "JPEG" if p.suffix == ".jpg" else "PNG")
               for p in sorted(folder.iterdir())}
    assert {k for k, v in planned.items() if v is None} == {"progressive.jpg", "grey.jpg", "cmyk.jpg",
                                                            "plain.png"}
    for turn in range(1, 9):
        (h, w), got = planned[f"turn{turn}.jpg"]
        assert got == turn
        stored = (45 + turn, 70 + 2 * turn)
        assert (h, w) == (stored[::-1] if turn >= 5 else stored)  # upright size, as the CPU decoder gives


def test_orientation_on_the_device_matches_opencv_for_all_eight(folder):
    from torchvision.io import ImageReadMode, decode_jpeg

    for turn in range(1, 9):
        data = (folder / f"turn{turn}.jpg").read_bytes()
        cpu = decode_rgb(data, "JPEG")  # OpenCV applies the EXIF orientation itself
        raw = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        upright = device_decode.orient(raw, device_decode.orientation(data)).permute(1, 2, 0).numpy()
        assert upright.shape == cpu.shape, turn
        assert np.array_equal(upright, cpu), turn  # same libjpeg on the CPU: bit-identical


def test_device_resize_is_within_one_level_of_opencv():
    img = picture(300, 410, 3)
    t = torch.from_numpy(img).permute(2, 0, 1)
    for interpolation, limit in (("linear", 1), ("nearest", 0)):
        for size in ((64, 96), (512, 640), (300, 410)):
            prep = Prep("stretch", size, interpolation, 3)
            got = device_decode.prepare(t, prep).permute(1, 2, 0).numpy().astype(int)
            want = cv2.resize(img, size[::-1], interpolation=cv2.INTER_LINEAR if interpolation == "linear"
                              else cv2.INTER_NEAREST).astype(int)
            assert np.abs(got - want).max() <= limit, (interpolation, size)


def test_frame_parser_reads_pillow_and_opencv_files():
    for quality, subsampling in ((75, 2), (95, 0)):
        buf = io.BytesIO()
        Image.fromarray(picture(33, 47)).save(buf, "JPEG", quality=quality, subsampling=subsampling)
        frame = device_decode.jpeg_frame(buf.getvalue())
        assert (frame.marker, frame.precision, frame.height, frame.width, frame.components) == (0xC0, 8, 33, 47, 3)
    ok, enc = cv2.imencode(".jpg", picture(20, 30))
    assert device_decode.jpeg_frame(enc.tobytes()).height == 20
    assert device_decode.jpeg_frame(b"\xff\xd8\xff\xda\x00\x02") is None  # a scan before any frame
    assert device_decode.jpeg_frame(b"not a jpeg") is None


def test_transfer_slices_each_tensor_back_with_its_shape_and_dtype():
    transfer = Transfer(torch.device("cpu"))
    tensors = [torch.arange(12, dtype=torch.uint8).view(3, 4), torch.rand(2, 5, 6).half(), torch.rand(5),
               torch.zeros(0, 7, dtype=torch.uint8), torch.full((2, 2), 9, dtype=torch.uint8)]
    ids = [transfer.add(t) for t in tensors]
    pending = transfer.launch()
    for i, t in zip(ids, tensors, strict=True):
        got = pending.array(i)
        assert got.shape == tuple(t.shape) and got.dtype == t.numpy().dtype
        assert np.array_equal(got, t.numpy())
    assert set(pending.buffers) == {torch.uint8, torch.float16, torch.float32}  # one buffer per dtype


def test_batched_postprocessing_gives_the_cpu_path_results_exactly(runners, folder):
    """Device-style postprocessing (one copy per batch) on the CPU path's decoded inputs: identical."""
    plain = list(_engine(runners, batched_post=False, device_decode=False).process(_sources(folder)))
    batched = list(_engine(runners, batched_post=True, device_decode=False).process(_sources(folder)))
    assert [r.name for r in plain] == [r.name for r in batched]
    checked = 0
    for a, b in zip(plain, batched, strict=True):
        assert a.error == b.error
        for name, oa in a.outputs.items():
            ra, rb = oa.result, b.outputs[name].result
            assert (ra is None) == (rb is None)
            if ra is None:
                continue
            checked += 1
            if name == "grade":
                assert ra == rb
            else:
                assert ra.mask.dtype == rb.mask.dtype and np.array_equal(ra.mask, rb.mask)
                assert np.array_equal(ra.probabilities, rb.probabilities)
                assert (ra.area_fraction, ra.components) == (rb.area_fraction, rb.components)
    assert checked == 3 * 12  # 13 files, one of them broken
    assert "broken.jpg" in {r.name for r in plain if r.error}


def test_device_decode_path_agrees_with_the_cpu_path(runners, folder, monkeypatch):
    """Whole engine with JPEGs decoded, turned and resized 'on the device' (CPU tensors here)."""
    plain = {r.name: r for r in _engine(runners, batched_post=False, device_decode=False).process(_sources(folder))}
    real, calls = device_decode._decode, []

    def counting(encoded, device):
        calls.append(len(encoded))
        return real(encoded, device)

    monkeypatch.setattr(device_decode, "_decode", counting)
    engine = _engine(runners, batched_post=True, device_decode=True)
    device = {r.name: r for r in engine.process(_sources(folder))}
    # the eight orientations and the broken one went to the device decoder, in batches of at most 3
    assert sum(calls) == 9 and max(calls) <= 3
    assert plain.keys() == device.keys()
    assert device["broken.jpg"].error and plain["broken.jpg"].error  # refused by both decoders: failed
    assert all(r.error is None for n, r in device.items() if n != "broken.jpg")
    for name, a in plain.items():
        b = device[name]
        assert a.size == b.size, name
        if a.error:
            continue
        for model, oa in a.outputs.items():
            ra, rb = oa.result, b.outputs[model].result
            if model == "grade":
                assert np.abs(np.array(ra.probabilities) - rb.probabilities).max() < 1e-6
                continue
            assert ra.mask.shape == rb.mask.shape
            # bilinear stretch within one level of OpenCV's; pad models see the same pixels
            tol = 0.02 if model == "binary" else 1e-6
            assert np.abs(ra.probabilities.astype(np.float32) - rb.probabilities).max() <= tol, (name, model)
            assert (ra.mask != rb.mask).mean() <= 0.01, (name, model)


def test_device_decode_is_off_where_the_device_cannot_make_the_input(runners, monkeypatch):
    from legitseg.engines.local import Engine

    assert device_decode.supports([Prep("stretch", (8, 8), "linear", 3), Prep("pad", None, "linear", 3)])
    assert not device_decode.supports([Prep("stretch", (8, 8), "area", 3)])
    assert not device_decode.supports([Prep("letterbox", (8, 8), "linear", 3)])
    assert not device_decode.supports([Prep("stretch", (8, 8), "linear", 1)])
    # CPU runners: never on by default; forced, it is on.
    auto = Engine(runners, batch_size=2, workers=0, post_threads=1, save_probabilities=False,
                  max_pixels=10**8, stop=threading.Event())
    assert not auto.device_decode and not auto.batched_post
    from legitseg.options import Environment

    assert not Environment.read({"LEGITSEG_GPU_DECODE": "0"}).gpu_decode
    assert Environment.read({"LEGITSEG_GPU_DECODE": "1"}).gpu_decode and Environment.read({}).gpu_decode


def test_a_jpeg_the_device_refuses_is_decoded_on_the_cpu(runners, folder, monkeypatch):
    """nvJPEG refusing a file (None from `decode`) costs only that file a CPU decode: same result."""
    real = device_decode._decode

    def refusing(encoded, device):
        out = real(encoded, device)
        return [None if o is not None and tuple(o.shape[-2:]) == (47, 74) else o for o in out]  # turn2.jpg

    sources = [s for s in _sources(folder) if s.name in ("turn2.jpg", "turn3.jpg")]
    plain = list(_engine(runners, batched_post=True, device_decode=False).process(sources))
    monkeypatch.setattr(device_decode, "_decode", refusing)
    fallback = list(_engine(runners, batched_post=True, device_decode=True).process(sources))
    def probs(results, k):
        return results[k].outputs["binary"].result.probabilities

    # OpenCV's resize for the refused file (bit-identical), the device's for the other (within a level)
    assert np.array_equal(probs(plain, 0), probs(fallback, 0))
    assert not np.array_equal(probs(plain, 1), probs(fallback, 1))
    assert np.abs(probs(plain, 1).astype(np.float32) - probs(fallback, 1)).max() <= 0.02


# -- the fastest variant of a model (layout, half weights), chosen on the first batch ------------
def _tuned_pair(runners, precision, tmp_path, monkeypatch):
    from legitseg.inference.torch_runner import TorchRunner

    loaded = runners[0].loaded  # "binary", 64x96 stretch
    arrays = [picture(64, 96, s) for s in range(3)]
    plain = TorchRunner(loaded, torch.device("cpu"), "fp32")
    tuned = TorchRunner(loaded, torch.device("cpu"), precision, tune_layout=True, cache_dir=tmp_path / "cache")
    return plain, tuned, arrays


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_layout_tuning_measures_every_variant_and_remembers_the_choice(runners, precision, tmp_path, monkeypatch):
    from legitseg.inference import layout_tuning
    from legitseg.inference.precision import variants
    from legitseg.inference.torch_runner import TorchRunner

    plain, tuned, arrays = _tuned_pair(runners, precision, tmp_path, monkeypatch)
    timed = []
    real = layout_tuning._time
    monkeypatch.setattr(layout_tuning, "_time", lambda r, x: timed.append(r.variant) or real(r, x))
    want = torch.sigmoid(plain.logits(arrays))
    got = torch.sigmoid(tuned.logits(arrays))
    # Only memory layouts are timed, whatever the precision: nothing a stopwatch picks changes the arithmetic.
    assert timed == variants(precision) == ["channels_last", "contiguous"]
    assert tuned.variant in timed and tuned.tuned
    assert (got - want).abs().max() <= (1e-4 if precision == "fp32" else 5e-2)
    cache = json.loads(layout_tuning.cache_file(tmp_path / "cache").read_text())
    assert list(cache.values()) == [tuned.variant]
    # The next run on this machine takes the remembered variant without measuring.
    timed.clear()
    again = TorchRunner(tuned.loaded, torch.device("cpu"), precision, tune_layout=True, cache_dir=tmp_path / "cache")
    again.logits(arrays)
    assert timed == [] and again.variant == tuned.variant


def test_a_faster_variant_that_changes_results_is_not_used(runners, tmp_path, monkeypatch):
    from legitseg.inference import layout_tuning

    _, tuned, arrays = _tuned_pair(runners, "fp32", tmp_path, monkeypatch)
    real = layout_tuning._time

    def fake(runner, x):
        seconds, y = real(runner, x)
        if runner.variant == "contiguous":  # "faster", but off by a whole logit
            return seconds / 100, y + 1.0
        return seconds, y

    monkeypatch.setattr(layout_tuning, "_time", fake)
    tuned.logits(arrays)
    assert tuned.variant == "channels_last"


def test_a_device_decoder_that_refuses_everything_is_given_up_for_the_cpu(runners, folder, monkeypatch, caplog):
    monkeypatch.setattr(device_decode, "_decode", lambda encoded, device: [None] * len(encoded))
    sources = [s for s in _sources(folder) if s.name.startswith("turn")]
    engine = _engine(runners, batched_post=True, device_decode=True)
    results = list(engine.process(sources))
    assert [r.error for r in results] == [None] * 8
    assert not engine.device_decode and engine.device_inputs
    assert "decoded on the CPU for the rest of this run" in caplog.text
