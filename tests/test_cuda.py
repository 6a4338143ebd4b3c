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


# -- the GPU path of the engine: parity, decode tolerance, syncs ------------------------------
REPO = Path(__file__).resolve().parents[1]
PHOTOS = sorted((REPO / "examples" / "images").iterdir())


def _demo_models():
    import yaml

    from legitseg.manifest.spec import load_manifest
    from legitseg.models.factory import load_model

    entries = yaml.safe_load((REPO / "models.yaml").read_text())["models"]
    manifest = load_manifest(REPO / "models.yaml")
    return {name: (entries[name], load_model(manifest.models[name])) for name in entries}


def test_fp32_on_cuda_matches_the_reference_implementation_on_the_demo_photographs():
    """IEEE fp32 on the card: legitseg's CUDA forward + device postprocessing against tests/reference.py
    (Pillow, smp, torch on the CPU) on every bundled photograph, max |dp| <= 1e-4."""
    import torch.nn.functional as F

    from legitseg.images.decode import prepare
    from legitseg.inference.activation import activation
    from legitseg.inference.torch_runner import TorchRunner, tf32_switch
    from tests import reference

    cuda = torch.device("cuda")
    torch.backends.cudnn.allow_tf32 = True  # PyTorch's default for convolutions: must not leak into fp32
    worst = {}
    with tf32_switch("fp32"):
        for name, (entry, loaded) in _demo_models().items():
            module = reference.build(entry, REPO)
            runner = TorchRunner(loaded, cuda, "fp32")
            for path in PHOTOS:
                rgb = reference.decode(path)
                want = reference.predict(module, entry, rgb)
                logits = runner.logits([prepare(rgb, runner.prep)])[0]
                if entry["task"] == "severity":
                    got = activation(logits.float(), loaded.spec, dim=0).cpu().numpy()
                else:
                    up = F.interpolate(logits[None], size=rgb.shape[:2], mode="bilinear", align_corners=False)[0]
                    got = activation(up, loaded.spec, dim=0).cpu().numpy()
                worst[name, path.name] = float(np.abs(got - want.probabilities).max())
    assert len(worst) == 3 * len(PHOTOS)
    bad = {k: v for k, v in worst.items() if v > 1e-4}
    assert not bad, bad


def test_gpu_jpeg_decode_stays_within_its_stated_tolerance_of_opencv(tmp_path):
    """nvJPEG is not libjpeg: pixels within a few levels, results within what docs/architecture.md states."""
    from legitseg.images import device_decode
    from legitseg.images.decode import decode_rgb
    from tests.images import picture, save

    cuda = torch.device("cuda")
    files = [p for p in PHOTOS if p.suffix == ".jpg"]
    for turn in (1, 6, 8):  # photo-like JPEGs with EXIF orientations, 4:2:0 and 4:4:4
        files.append(save(tmp_path / f"t{turn}.jpg", picture(480, 640, turn), orientation=turn, quality=90,
                          subsampling=0 if turn == 6 else 2))
    datas = [p.read_bytes() for p in files]
    plans = [device_decode.plan(d, "JPEG") for d in datas]
    assert all(plans), [f.name for f, p in zip(files, plans, strict=True) if not p]
    images = device_decode.decode([torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas], cuda)
    for f, data, (size, turn), image in zip(files, datas, plans, images, strict=True):
        assert image is not None and image.is_cuda, f.name
        got = device_decode.orient(image, turn).permute(1, 2, 0).cpu().numpy().astype(int)
        want = decode_rgb(data, "JPEG").astype(int)
        assert got.shape == want.shape and got.shape[:2] == size, f.name
        diff = np.abs(got - want)
        # A swapped channel, a wrong turn or a shifted chroma plane costs tens of levels on average.
        assert diff.mean() <= 2.0 and np.percentile(diff, 99) <= 16, (f.name, diff.mean(), diff.max())


def _jpeg_folder(d: Path, n: int) -> Path:
    from tests.images import picture, save

    for i in range(n):
        save(d / f"{i:03d}.jpg", picture(300 + 7 * i, 400 - 5 * i, i), orientation=(1, 6, 3, 8)[i % 4], quality=90)
    return d


def test_demo_run_on_cuda_with_gpu_decode_agrees_with_the_cpu_run(tmp_path):
    """The whole CLI, GPU decode on (the default), against the CPU run: masks and scores within tolerance."""
    images = _jpeg_folder(tmp_path / "in", 12)
    for p in PHOTOS:
        (images / p.name).write_bytes(p.read_bytes())
    outs = {}
    for tag, args in {"cpu": ["--device", "cpu", "--backend", "torch"], "cuda": ["--device", "cuda"]}.items():
        r = _run(REPO / "models.yaml", images, tmp_path / tag, *args)
        assert r.exit_code == 0, r.output
        outs[tag] = tmp_path / tag
    decoders = {tag: json.loads((o / "run.json").read_text())["jpeg_decoder"] for tag, o in outs.items()}
    assert decoders == {"cpu": "opencv", "cuda": "nvjpeg"}
    for model in ("erythema_segmenter", "lesion_segmenter"):
        ref, got = _probs(outs["cpu"], model), _probs(outs["cuda"], model)
        assert ref.keys() == got.keys() and len(ref) == 12 + len(PHOTOS)
        for name in ref:
            dp = np.abs(got[name] - ref[name])
            assert dp.mean() <= 0.005 and np.percentile(dp, 99.9) <= 0.05, (model, name, dp.mean(), dp.max())
            masks = [cv2.imread(str(o / "masks" / model / name.replace(".npz", ".png")), cv2.IMREAD_UNCHANGED)
                     for o in (outs["cpu"], outs["cuda"])]
            assert (masks[0] != masks[1]).mean() <= 0.01, (model, name)
    rows = {tag: {json.loads(x)["image"]: json.loads(x) for x in (o / "scores.jsonl").read_text().splitlines()
                  if '"severity_classifier"' in x} for tag, o in outs.items()}
    for image, row in rows["cpu"].items():
        assert abs(row["score"] - rows["cuda"][image]["score"]) <= 0.05, image


def test_one_device_synchronisation_per_batch_at_most(tmp_path, recwarn):
    """The main thread launches batch after batch; only the postprocessing threads wait for copies."""
    import threading
    import warnings

    from legitseg.engines.local import Engine
    from legitseg.images.sources import Source
    from legitseg.inference.torch_runner import TorchRunner
    from legitseg.manifest.spec import load_manifest
    from legitseg.models.factory import load_model

    images = _jpeg_folder(tmp_path / "in", 24)
    loaded = load_model(load_manifest(REPO / "models.yaml").models["erythema_segmenter"])
    engine = Engine([TorchRunner(loaded, torch.device("cuda"), "fp16")], batch_size=8, workers=2, post_threads=2,
                    save_probabilities=False, max_pixels=10**8, stop=threading.Event())
    assert engine.device_decode and engine.batched_post
    sources = [Source(p, p.name) for p in sorted(images.iterdir())]
    list(engine.process(sources[:8]))  # warm-up: cuDNN picks its algorithms
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results = list(engine.process(sources))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(r.error is None for r in results)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= 24 // 8, [str(w.message)[:120] for w in syncs[:5]]


# -- the GPU path's second pass (issue 25; CPU twins in tests/test_gpu_second_pass.py) ------------------
def test_gpu_decode_is_not_written_into_memory_that_queued_kernels_still_read(tmp_path):
    """Blocks freed while reductions queued behind a long kernel still read them, then a batched decode:
    the reductions and the decoded pixels equal a quiet run's. Decoding on the compute stream fails this
    (pytorch/vision PR 9606: 199 of 200 on an H100); `device_decode.Streams` keeps the decoder off them."""
    import time

    from legitseg.images import device_decode
    from tests.images import picture, save

    cuda = torch.device("cuda")
    files = [save(tmp_path / f"{i}.jpg", picture(768, 1024, i), quality=90) for i in range(8)]
    encoded = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in files]
    quiet = [image.cpu() for image in device_decode.decode(encoded, cuda)]
    torch.cuda.synchronize()
    cycles = int(torch.cuda.get_device_properties(cuda).clock_rate * 1000 * 0.05)  # ~50 ms of GPU time
    for trial in range(30):
        # Same byte size as the decoded images, so the allocator would hand these blocks to the decoder.
        held = [torch.full((3, 768, 1024), k + 1, dtype=torch.uint8, device=cuda) for k in range(8)]
        torch.cuda._sleep(cycles)  # the GPU runs behind the host
        sums = [t.sum(dtype=torch.int64) for t in held]  # queued: they read `held` after the sleep
        del held  # back to the pool while the reductions are still queued
        t0 = time.perf_counter()
        images = device_decode.decode(encoded, cuda)
        assert time.perf_counter() - t0 < 10
        assert [int(s) for s in sums] == [(k + 1) * 3 * 768 * 1024 for k in range(8)], trial
        assert all(torch.equal(image.cpu(), q) for image, q in zip(images, quiet, strict=True)), trial


def test_the_batch_event_lets_the_waiting_thread_sleep():
    """Transfer's event is blocking: waiting for a long copy costs the waiting thread no CPU to speak of."""
    import time

    from legitseg.engines.transfer import Transfer

    cuda = torch.device("cuda")
    transfer = Transfer(cuda, torch.cuda.Stream(cuda))
    torch.cuda._sleep(int(torch.cuda.get_device_properties(cuda).clock_rate * 1000 * 0.5))  # ~0.5 s
    transfer.add(torch.ones(1000, device=cuda))
    pending = transfer.launch()
    wall, cpu = time.perf_counter(), time.thread_time()
    pending.wait()
    wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
    assert wall > 0.2 and cpu < 0.25 * wall, (wall, cpu)
    assert pending.array(0).sum() == 1000


def test_new_tf32_api_on_cuda_runs_ieee_fp32_and_is_restored(setup, tmp_path):
    import subprocess
    import sys

    manifest, images = setup
    code = ("import json, torch\nfrom typer.testing import CliRunner\nfrom legitseg.cli import app\n"
            "torch.backends.fp32_precision = 'tf32'\n"
            f"r = CliRunner().invoke(app, ['run', {str(images)!r}, '-m', {str(manifest)!r}, '-o', "
            f"{str(tmp_path / 'out')!r}, '--device', 'cuda', '--backend', 'torch', '-q'])\n"
            "print(json.dumps([r.exit_code, torch.backends.cudnn.conv.fp32_precision]))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [0, "tf32"]
    math = json.loads((tmp_path / "out" / "run.json").read_text())["math"]
    assert math["convolution_fp32"] == "ieee" and math["matmul_fp32"] == "ieee"


# -- main-thread work (issue 25 item 6; CPU twins in tests/test_engine_stages.py) -----------------------
def test_decoding_ahead_on_another_thread_while_kernels_run_gives_a_quiet_decodes_pixels(tmp_path):
    """nvJPEG on a thread of its own while the compute stream runs behind; `ready` on this thread
    orders compute after it: the pixels equal a quiet decode's, the queued reductions are untouched."""
    import threading

    from legitseg.images import device_decode
    from tests.images import picture, save

    cuda = torch.device("cuda")
    files = [save(tmp_path / f"{i}.jpg", picture(768, 1024, i), quality=90) for i in range(8)]
    encoded = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in files]
    quiet = [image.cpu() for image in device_decode.decode(encoded, cuda)]
    cycles = int(torch.cuda.get_device_properties(cuda).clock_rate * 1000 * 0.05)
    for trial in range(20):
        held = [torch.full((3, 768, 1024), k + 1, dtype=torch.uint8, device=cuda) for k in range(8)]
        torch.cuda._sleep(cycles)
        sums = [t.sum(dtype=torch.int64) for t in held]
        del held
        box = {}
        worker = threading.Thread(target=lambda box=box: box.update(out=device_decode.decode_ahead(encoded, cuda)))
        worker.start()
        worker.join()
        images, marker = box["out"]
        device_decode.ready(images, marker, cuda)
        checks = [image.sum(dtype=torch.int64) for image in images]  # queued on compute, after the wait
        assert [int(s) for s in sums] == [(k + 1) * 3 * 768 * 1024 for k in range(8)], trial
        assert [int(c) for c in checks] == [int(q.sum(dtype=torch.int64)) for q in quiet], trial


@pytest.mark.parametrize("classes", [1, 4, 300])
def test_counts_on_the_device_equal_the_hosts_without_a_synchronisation(classes, recwarn):
    import warnings
    from types import SimpleNamespace

    from legitseg.inference import postprocess

    spec = SimpleNamespace(classes=classes, label_names=["bg", *[f"c{i}" for i in range(1, max(2, classes))]])
    dtype = torch.uint8 if classes <= 256 else torch.int32
    mask = torch.randint(0, max(2, classes), (3000, 4000), device="cuda").to(dtype)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            counts = postprocess.counts_on_device(mask, spec)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert not [w for w in caught if "synchroniz" in str(w.message)]
    host = mask.cpu().numpy()
    want = ([host.size - int(np.count_nonzero(host)), int(np.count_nonzero(host))] if classes == 1
            else np.bincount(host.ravel().astype(np.int64), minlength=classes).tolist())
    assert counts.cpu().tolist() == want
