"""Reliability (docs/reliability.md): bad images fail alone, odd images succeed,
integrity problems stop the run before anything is written, output is atomic and
resumable, one run per OUT, clean stops on signals, runtime errors exit 4.
"""

from __future__ import annotations

import io
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO, invoke_cli

RNG = np.random.default_rng(7)


def photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth, photo-like RGB image (JPEG-friendly)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([np.sin(xx / 17 + seed), np.cos(yy / 23), np.sin((xx + yy) / 31)], axis=-1)
    img = (base * 60 + 128 + rng.normal(0, 8, (h, w, 3))).clip(0, 255)
    return img.astype(np.uint8)


def jpeg_bytes(rgb: np.ndarray, exif: Image.Exif | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=90, exif=exif.tobytes() if exif else b"")
    return buf.getvalue()


def jpeg_folder(root: Path, n: int, h: int, w: int, name: str = "img{:02d}.jpg") -> Path:
    """A folder `root/in` of n photo-like JPEGs of h x w (each with its own seed)."""
    d = root / "in"
    d.mkdir()
    for i in range(n):
        (d / name.format(i)).write_bytes(jpeg_bytes(photo(h, w, i)))
    return d


def records(out: Path) -> dict[str, dict]:
    return {p.relative_to(out / "records").as_posix()[:-5]: json.loads(p.read_text())
            for p in (out / "records").rglob("*.json")}


@pytest.fixture
def manifest(kit):
    kit.add("seg", input_size=(64, 64))
    kit.add("grade", task="severity", classes=4, input_size=(64, 64))
    return kit.write()


# -- 1. bad images fail alone --------------------------------------------------------------
def _bomb_png(w: int, h: int) -> bytes:
    """A real PNG header declaring w x h pixels with a tiny (truncated) body."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_bad_images_fail_alone(manifest, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    good = jpeg_bytes(photo(60, 80))
    (d / "good.jpg").write_bytes(good)
    (d / "empty.jpg").write_bytes(b"")
    (d / "truncated.jpg").write_bytes(jpeg_bytes(photo(300, 400, 1))[:5000])
    (d / "text.png").write_text("this is not an image\n")
    (d / "random.tif").write_bytes(RNG.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (d / "bomb.png").write_bytes(_bomb_png(30000, 30000))
    (d / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (d / "folder.jpg").mkdir()
    unreadable = d / "unreadable.jpg"
    if os.geteuid() == 0:
        # root reads any mode-000 file; /proc/1/mem refuses even root.
        unreadable.symlink_to("/proc/1/mem")
    else:
        unreadable.write_bytes(good)
        unreadable.chmod(0)
    out = tmp_path / "out"
    r = invoke_cli("run", str(d), "-m", str(manifest), "-o", str(out), "--max-pixels", "50000000")
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    recs = records(out)
    expected = {
        "empty.jpg": "empty file (0 bytes)",
        "truncated.jpg": "truncated JPEG",
        "text.png": "not a recognised image format (starts with text",
        "random.tif": "not a recognised image format",
        "bomb.png": "declares 900,000,000 pixels, above --max-pixels 50,000,000",
        "dangling.jpg": "dangling symbolic link",
        "folder.jpg": "is a folder, not an image file",
        "unreadable.jpg": "not readable: permission denied",
    }
    for name, message in expected.items():
        rec = recs[name]
        assert rec["status"] == "failed", name
        assert message in rec["error"], (name, rec["error"])
        assert {m["status"] for m in rec["models"].values()} == {"failed"}
        # One log line per failure, naming the file and the problem.
        assert sum(name in line and "failed" in line for line in r.stderr.splitlines()) == 1, name
    assert recs["good.jpg"]["status"] == "ok"
    assert (out / "masks/seg/good.jpg.png").is_file()
    assert not (out / "masks/seg/truncated.jpg.png").exists()
    rows = [json.loads(x) for x in (out / "scores.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * (len(expected) + 1)
    run = json.loads((out / "run.json").read_text())
    assert run["counts"] == {"processed": 1, "skipped": 0, "failed": len(expected), "skipped_failed": 0,
                             "unreadable_records": 0}


# -- 2. odd but valid images succeed ---------------------------------------------------------
def _odd_images(d: Path) -> dict[str, tuple[int, int]]:
    """Write odd-but-valid images; return name -> expected oriented (h, w)."""
    sizes = {}
    rgb = photo(37, 53, 3)
    cv2.imwrite(str(d / "sixteen.png"), (photo(37, 53, 4).astype(np.uint16) * 257))
    sizes["sixteen.png"] = (37, 53)
    Image.fromarray(rgb[:, :, 0]).save(d / "gray.png")
    sizes["gray.png"] = (37, 53)
    Image.fromarray(np.dstack([rgb, np.full((37, 53), 128, np.uint8)])).save(d / "rgba.png")
    sizes["rgba.png"] = (37, 53)
    Image.fromarray(rgb).convert("P").save(d / "palette.png")
    sizes["palette.png"] = (37, 53)
    Image.fromarray(rgb).convert("CMYK").save(d / "cmyk.jpg", quality=90)
    sizes["cmyk.jpg"] = (37, 53)
    Image.fromarray(rgb).save(d / "anim.gif")
    sizes["anim.gif"] = (37, 53)
    Image.fromarray(rgb).save(d / "pic.webp")
    sizes["pic.webp"] = (37, 53)
    Image.fromarray(rgb).save(d / "scan.tiff")
    sizes["scan.tiff"] = (37, 53)
    Image.fromarray(rgb[:1, :1]).save(d / "one.png")
    sizes["one.png"] = (1, 1)
    Image.fromarray(photo(7, 9000, 5)).save(d / "wide.png")
    sizes["wide.png"] = (7, 9000)
    for o in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = o
        (d / f"orient{o}.jpg").write_bytes(jpeg_bytes(rgb, exif))
        sizes[f"orient{o}.jpg"] = (53, 37) if o >= 5 else (37, 53)
    (d / "Ünïcode name with spaces.JPG").write_bytes(jpeg_bytes(rgb))
    sizes["Ünïcode name with spaces.JPG"] = (37, 53)
    (d / "UPPER.PNG").write_bytes(cv2.imencode(".png", rgb)[1].tobytes())
    sizes["UPPER.PNG"] = (37, 53)
    return sizes


def test_odd_but_valid_images_succeed(manifest, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    sizes = _odd_images(d)
    out = tmp_path / "out"
    r = invoke_cli("run", str(d), "-m", str(manifest), "-o", str(out))
    assert r.returncode == 0, r.stderr
    recs = records(out)
    assert set(recs) == set(sizes)
    for name, (h, w) in sizes.items():
        assert recs[name]["status"] == "ok", (name, recs[name]["error"])
        assert recs[name]["size"] == [h, w], name
        mask = cv2.imread(str(out / "masks/seg" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        assert mask.shape == (h, w), name


# -- 3. integrity: exit 3 before any image is read, nothing written -----------------------------
def _code_pickle(path: Path, marker: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    import pickle

    with open(path, "wb") as f:
        pickle.dump({"encoder.weight": Evil()}, f)


@pytest.mark.parametrize("case", ["sha256", "pickle", "shape", "unknown-field", "duplicate", "python-tag", "missing"])
def test_integrity_errors_exit_3_and_write_nothing(kit, tmp_path, case):
    import yaml

    from legitseg.models.weights import sha256_file

    kit.add("seg")
    marker = tmp_path / "PWNED"
    manifest = kit.write()
    text = manifest.read_text()
    entry = kit.models["seg"]
    expect = {
        "sha256": "sha256 mismatch",
        "pickle": "weights_only",
        "shape": "mis-shaped",
        "unknown-field": "field 'colour': unknown field",
        "duplicate": "duplicate field 'arch'",
        "python-tag": "Python tags are refused",
        "missing": "weights file not found",
    }[case]
    if case == "sha256":
        text = text.replace(entry["sha256"], "f" * 64)
    elif case == "pickle":
        evil = tmp_path / "evil.pt"
        _code_pickle(evil, marker)
        text = text.replace(entry["weights"], "evil.pt").replace(entry["sha256"], sha256_file(evil))
    elif case == "shape":
        kit.add("other", classes=3, seed=1)
        data = yaml.safe_load(kit.write().read_text())
        data["models"]["seg"]["weights"] = data["models"]["other"]["weights"]
        data["models"]["seg"]["sha256"] = data["models"]["other"]["sha256"]
        del data["models"]["other"]
        text = yaml.safe_dump(data)
    elif case == "unknown-field":
        text = text.replace("task: segmentation", "task: segmentation\n    colour: red")
    elif case == "duplicate":
        text = text.replace("arch: Unet", "arch: Unet\n    arch: FPN")
    elif case == "python-tag":
        text = text.replace("classes: 1", "classes: !!python/object/apply:os.system ['touch PWNED']")
    elif case == "missing":
        text = text.replace(entry["weights"], "weights/absent.safetensors")
    manifest.write_text(text)
    images = tmp_path / "in"
    images.mkdir()
    (images / "a.jpg").write_bytes(jpeg_bytes(photo(40, 40)))
    out = tmp_path / "out"
    r = invoke_cli("run", str(images), "-m", str(manifest), "-o", str(out), cwd=tmp_path)
    assert r.returncode == 3, r.stderr
    assert expect in r.stderr
    assert "seg" in r.stderr or case in ("duplicate", "python-tag")
    assert "Traceback" not in r.stderr
    assert not out.exists()
    assert not marker.exists() and not (tmp_path / "PWNED").exists()


# -- 4./5. atomic output after SIGKILL; resume ------------------------------------------------
def _valid(path: Path) -> bool:
    if path.suffix == ".png":
        return cv2.imread(str(path), cv2.IMREAD_UNCHANGED) is not None
    if path.suffix == ".npz":
        with np.load(path) as z:
            return z["probabilities"].dtype == np.float16
    if path.suffix in (".json", ".jsonl"):
        text = path.read_text()
        [json.loads(x) for x in text.splitlines()] if path.suffix == ".jsonl" else json.loads(text)
        return True
    return True


@pytest.mark.slow
def test_sigkill_leaves_no_partial_files_and_resume_completes(manifest, tmp_path):
    d = jpeg_folder(tmp_path, 24, 240, 320)
    out = tmp_path / "out"
    args = [sys.executable, "-m", "legitseg", "run", str(d), "-m", str(manifest), "-o", str(out),
            "--save-probabilities", "-q", "--workers", "2", "--batch-size", "2"]
    # Frozen (SIGSTOP) the moment the first record appears, then killed: 23 images are
    # still to do whatever the machine's load, so the kill always lands mid-run.
    for _ in range(2):
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        before = len(records(out)) if (out / "records").is_dir() else 0
        deadline = time.time() + 120
        while time.time() < deadline and len(list((out / "records").glob("*.json"))) <= before:
            if proc.poll() is not None:
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGSTOP)
        proc.kill()
        proc.wait()
        for p in out.rglob("*"):
            if p.is_file() and not p.name.endswith(".legitseg-tmp"):
                assert _valid(p), p
        for name, rec in records(out).items():
            for entry in rec["models"].values():
                if "mask" in entry:
                    assert (out / entry["mask"]).is_file(), name  # a record is written after its files
    done_before = set(records(out))
    assert 0 < len(done_before) < 24
    r = invoke_cli(*args[3:-5], "--jsonl")  # the resume needs no process of its own
    assert r.returncode == 0, r.stderr
    assert not list(out.rglob("*.legitseg-tmp"))
    assert set(records(out)) == {f"img{i:02d}.jpg" for i in range(24)}
    rows = [json.loads(x) for x in (out / "scores.jsonl").read_text().splitlines()]
    assert len(rows) == 48 and len({(x["image"], x["model"]) for x in rows}) == 48
    assert len(r.stdout.splitlines()) == 48


def test_resume_skips_done_and_redoes_changed(kit, tmp_path):
    import yaml

    kit.add("seg")
    manifest = kit.write()
    d = jpeg_folder(tmp_path, 3, 50, 70, "{}.jpg")
    out = tmp_path / "out"
    base = ["run", str(d), "-m", str(manifest), "-o", str(out)]
    assert invoke_cli(*base).returncode == 0
    first = records(out)
    # Nothing to do: every image skipped, no model built.
    r = invoke_cli(*base)
    assert r.returncode == 0 and "0 to process, 3 already done" in r.stderr
    assert "built seg" not in r.stderr
    assert records(out) == first
    # A changed image is processed again; the others are not.
    (d / "1.jpg").write_bytes(jpeg_bytes(photo(50, 70, 99)))
    r = invoke_cli(*base)
    assert "1 to process, 2 already done" in r.stderr
    after = records(out)
    assert after["0.jpg"] == first["0.jpg"] and after["1.jpg"]["sha256"] != first["1.jpg"]["sha256"]
    # Changed weights: everything again.
    kit.add("seg", seed=5)
    manifest = kit.write()
    r = invoke_cli(*base)
    assert "3 to process, 0 already done" in r.stderr
    sha = yaml.safe_load(manifest.read_text())["models"]["seg"]["sha256"]
    assert {rec["models"]["seg"]["weights_sha256"] for rec in records(out).values()} == {sha}
    # --overwrite redoes all; scores never hold duplicates.
    r = invoke_cli(*base, "--overwrite")
    assert "3 to process" in r.stderr
    rows = (out / "scores.jsonl").read_text().splitlines()
    assert len(rows) == 3 and len(set(rows)) == 3


# -- 6. one run per output folder ---------------------------------------------------------------
def test_second_run_exits_5_naming_the_pid_and_lock_dies_with_the_process(manifest, tmp_path):
    from legitseg.output.lock import OutputLock

    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from legitseg.output.lock import OutputLock;"
        f"OutputLock(Path({str(out)!r})).acquire(); print('locked', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "locked"
        d = tmp_path / "in"
        d.mkdir()
        (d / "a.jpg").write_bytes(jpeg_bytes(photo(30, 30)))
        started = time.monotonic()
        r = invoke_cli("run", str(d), "-m", str(manifest), "-o", str(out))
        assert r.returncode == 5, r.stderr
        assert f"PID {holder.pid}" in r.stderr
        assert time.monotonic() - started < 30
        assert not (out / "records").exists()
    finally:
        holder.kill()
        holder.wait()
    lock = OutputLock(out)
    lock.acquire()  # SIGKILL released it
    lock.release()


# -- 7. signals ---------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_stops_cleanly(manifest, tmp_path, sig, code):
    import psutil

    d = jpeg_folder(tmp_path, 60, 240, 320)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "legitseg", "run", str(d), "-m", str(manifest), "-o", str(out),
                             "--workers", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    # records/ exists from the start; the first record says images are flowing.
    while time.time() < deadline and not any((out / "records").rglob("*.json")):
        time.sleep(0.05)
    children = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(sig)
    sent = time.monotonic()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert time.monotonic() - sent < 10
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "interrupted"
    assert 0 < run["counts"]["processed"] < 60
    assert len(records(out)) == run["counts"]["processed"]
    assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)
    assert "Traceback" not in err


# -- 8. runtime errors ---------------------------------------------------------------------------
def test_output_not_writable_exits_4(manifest, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "a.jpg").write_bytes(jpeg_bytes(photo(30, 30)))
    r = invoke_cli("run", str(d), "-m", str(manifest), "-o", "/dev/null/out")
    assert r.returncode == 4, r.stderr
    assert "/dev/null/out" in r.stderr and "not writable" in r.stderr
    assert "Traceback" not in r.stderr


def _limit_file_size(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_disk_full_exits_4_and_keeps_earlier_outputs(manifest, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "small.jpg").write_bytes(jpeg_bytes(photo(30, 40)))
    out = tmp_path / "out"
    assert invoke_cli("run", str(d), "-m", str(manifest), "-o", str(out)).returncode == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".legitseg.lock"}
    (d / "big.png").write_bytes(cv2.imencode(".png", photo(900, 1200, 3))[1].tobytes())
    # Files may grow to 60 kB: the big image's probability map cannot be written (EFBIG, like ENOSPC).
    r = subprocess.run([sys.executable, "-m", "legitseg", "run", str(d), "-m", str(manifest), "-o", str(out),
                        "--save-probabilities"], capture_output=True, text=True,
                       preexec_fn=_limit_file_size(60_000))
    assert r.returncode == 4, r.stderr
    assert "cannot write" in r.stderr and "big.png" in r.stderr
    assert "Traceback" not in r.stderr
    for p, data in before.items():
        if p.name in ("scores.jsonl", "scores.csv", "run.json"):
            assert _valid(p)
        else:
            assert p.read_bytes() == data, p
    assert not list(out.rglob("*.legitseg-tmp"))
    assert not (out / "records/big.png.json").exists()


def test_out_of_memory_retries_image_by_image(kit, tmp_path):
    """A batch that does not fit is retried one image at a time; an image that still does not fit fails alone."""
    import torch

    from legitseg.engines.local import Engine
    from legitseg.images.sources import Source
    from legitseg.inference.torch_runner import TorchRunner
    from legitseg.manifest.spec import load_manifest
    from legitseg.models.factory import load_model

    kit.add("seg")
    spec = load_manifest(kit.write()).models["seg"]
    loaded = load_model(spec)
    real_forward = loaded.module.forward

    def forward(x):
        # Simulates a device with room for one image at a time, and none for the 'huge' one (mean > 0).
        if x.shape[0] > 1 or float(x.mean()) > 0.9:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_forward(x)

    loaded.module.forward = forward
    d = tmp_path / "in"
    d.mkdir()
    sources = []
    for i, value in enumerate([None, None, 255]):
        img = photo(40, 40, i) if value is None else np.full((40, 40, 3), value, np.uint8)
        (d / f"{i}.png").write_bytes(cv2.imencode(".png", img)[1].tobytes())
        sources.append(Source(d / f"{i}.png", f"{i}.png"))
    engine = Engine([TorchRunner(loaded, torch.device("cpu"))], batch_size=3, workers=0, post_threads=1,
                    save_probabilities=False, max_pixels=10**8, stop=threading.Event())
    results = list(engine.process(sources))
    assert [r.outputs["seg"].error is None for r in results] == [True, True, False]
    assert "out of memory" in results[2].outputs["seg"].error
    assert results[2].outputs["seg"].error_kind == "oom"
    assert engine.batch_limit["seg"] == 1  # the size that fits is kept for the rest of the run


# -- 9. determinism -----------------------------------------------------------------------------
def test_two_clean_cpu_runs_write_byte_identical_masks(manifest, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    for i in range(4):
        (d / f"{i}.jpg").write_bytes(jpeg_bytes(photo(61 + i, 83, i)))
    outs = []
    for k in range(2):
        out = tmp_path / f"out{k}"
        assert invoke_cli("run", str(d), "-m", str(manifest), "-o", str(out)).returncode == 0
        outs.append(out)
    masks = sorted(p.relative_to(outs[0]) for p in (outs[0] / "masks").rglob("*.png"))
    assert len(masks) == 4
    for rel in masks:
        assert (outs[0] / rel).read_bytes() == (outs[1] / rel).read_bytes(), rel


def test_closed_stdout_stops_like_a_signal(manifest, tmp_path):
    d = jpeg_folder(tmp_path, 12, 40, 50, "{:02d}.jpg")
    out = tmp_path / "out"
    cmd = (f"{sys.executable} -m legitseg run {d} -m {manifest} -o {out} --jsonl --batch-size 1 "
           "--backend torch | head -1; echo ${PIPESTATUS[0]}")
    r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=300)
    first, code = r.stdout.splitlines()
    assert json.loads(first)["image"].endswith("00.jpg")
    assert code == "141", r.stderr
    assert "Traceback" not in r.stderr
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
