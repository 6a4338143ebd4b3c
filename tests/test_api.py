"""The Python API (docs/python-api.md): same results as the CLI, streaming, typed errors, cheap import.

One module-scoped world: three calibrated tiny models (binary stretch, multi-class pad,
severity), real JPEG photographs, one Predictor (torch backend, CPU) and one CLI run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from legitseg import ImageFailed, ManifestError, Prediction, Predictor, UsageError, WeightsError
from legitseg.output.writers import encode_png
from tests.conftest import REPO, ModelKit
from tests.images import picture, save
from tests.test_run_e2e import MODELS, calibrate

PHOTOS = {  # name -> (h, w, seed); sizes off the stride grid, portrait and landscape
    "a.jpg": (75, 101, 1), "b.jpg": (64, 48, 2), "c.jpg": (90, 61, 3), "d.jpg": (53, 70, 4),
    "e.jpg": (48, 64, 5), "f.jpg": (81, 77, 6),
}


@dataclass
class World:
    root: Path
    manifest: Path
    photos: Path
    predictor: Predictor
    cli_out: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("api")
    kit = ModelKit(root)
    for name, fields in MODELS.items():
        kit.add(name, **fields)
    pictures = [picture(60 + 7 * s, 90 - 5 * s, 40 + s) for s in range(4)]
    calibrate(kit, "lesion", pictures, 12.0)
    calibrate(kit, "regions", pictures, 3.0)
    calibrate(kit, "grade", pictures, 40.0)
    manifest = kit.write()
    photos = root / "photos"
    for name, (h, w, seed) in PHOTOS.items():
        save(photos / name, picture(h, w, seed), quality=90)
    cli_out = root / "cli-out"
    from legitseg.cli import app

    r = CliRunner().invoke(app, ["run", str(photos), "-m", str(manifest), "-o", str(cli_out), "--device", "cpu",
                                 "--backend", "torch", "--save-probabilities", "--quiet"])
    assert r.exit_code == 0, r.output
    predictor = Predictor(manifest, device="cpu", backend="torch")
    return World(root, manifest, photos, predictor, cli_out)


def cli_rows(out: Path) -> dict[tuple[str, str], dict]:
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    return {(Path(r["image"]).name, r["model"]): r for r in rows}


def assert_same_as_cli(pred: Prediction, file_name: str, world: World) -> None:
    rows = cli_rows(world.cli_out)
    assert pred.ok, pred.error
    for model, res in pred.results.items():
        row = rows[file_name, model]
        assert row["status"] == "ok" and res.ok
        if res.task == "severity":
            assert res.score == row["score"] and res.grade == row["grade"]
            assert res.probabilities == row["probabilities"]
            continue
        png = (world.cli_out / row["mask"]).read_bytes()
        assert encode_png(res.mask) == png, f"{file_name} {model}: mask PNG bytes differ"
        with Image.open(world.cli_out / row["mask"]) as im:
            np.testing.assert_array_equal(np.asarray(im), res.mask)
        assert res.area_fraction == row["area_fraction"] and res.components == row["components"]
        with np.load(world.cli_out / row["probability_map"]) as npz:
            np.testing.assert_array_equal(npz["probabilities"], res.probabilities)


# -- same results as the CLI -------------------------------------------------------------------
def test_files_folder_arrays_and_pil_images_match_the_cli(world):
    names = sorted(PHOTOS)
    files = [world.photos / n for n in names]
    by_folder = list(world.predictor.predict(world.photos, probabilities=True))
    by_files = list(world.predictor.predict(files, probabilities=True))
    arrays = (np.asarray(Image.open(p).convert("RGB")) for p in files)  # a generator
    by_arrays = list(world.predictor.predict(arrays, probabilities=True))
    by_pil = list(world.predictor.predict([Image.open(p) for p in files], probabilities=True))
    assert [Path(p.image).name for p in by_folder] == names
    records = {json.loads(p.read_text())["name"]: json.loads(p.read_text())
               for p in (world.cli_out / "records").glob("*.json")}
    for i, name in enumerate(names):
        for pred in (by_folder[i], by_files[i], by_arrays[i], by_pil[i]):
            assert_same_as_cli(pred, name, world)
            assert pred.size == tuple(records[name]["size"])
        assert by_files[i].sha256 == records[name]["sha256"] == hashlib.sha256(files[i].read_bytes()).hexdigest()
        assert (by_files[i].input_kind, by_arrays[i].input_kind, by_pil[i].input_kind) == ("file", "array", "pil")
        assert by_arrays[i].image == f"array[{i}]" and by_pil[i].image == f"image[{i}]"
        rgb = np.asarray(Image.open(files[i]).convert("RGB"))
        assert by_arrays[i].sha256 == by_pil[i].sha256 == hashlib.sha256(rgb.tobytes()).hexdigest()
        weights = {m: r.weights_sha256 for m, r in by_arrays[i].results.items()}
        assert weights == {m: e["weights_sha256"] for m, e in records[name]["models"].items()}
        assert {m: r.settings for m, r in by_arrays[i].results.items()} == \
            {m: e["settings"] for m, e in records[name]["models"].items()}


def test_gray_rgba_and_exif_rotated_inputs_are_converted_as_files_are(world, tmp_path):
    rgb = picture(57, 83, 9)
    gray = rgb[..., 0]
    p_gray, p_gray3, p_rgba, p_rgb = world.predictor.predict(
        [gray, np.repeat(gray[..., None], 3, axis=2), np.dstack([rgb, np.full(gray.shape, 7, np.uint8)]), rgb])
    for a, b in ((p_gray, p_gray3), (p_rgba, p_rgb)):
        assert a.sha256 == b.sha256
        np.testing.assert_array_equal(a["lesion"].mask, b["lesion"].mask)
        assert a["grade"].score == b["grade"].score
    rotated = save(tmp_path / "rot6.jpg", picture(62, 95, 16), orientation=6, quality=90)
    from_file = world.predictor.predict_one(rotated)
    from_pil = world.predictor.predict_one(Image.open(rotated))
    assert from_file.size == from_pil.size == (95, 62)  # EXIF orientation 6: a quarter turn
    np.testing.assert_array_equal(from_file["regions"].mask, from_pil["regions"].mask)


def test_predictor_run_writes_what_the_cli_writes_and_resumes(world, tmp_path):
    summary = world.predictor.run([world.photos], tmp_path / "out", save_probabilities=True)
    assert (summary.status, summary.processed, summary.failed, summary.exit_code) == ("completed", 6, 0, 0)
    assert summary.run_json == tmp_path / "out" / "run.json"
    assert json.loads(summary.run_json.read_text())["run_id"] == summary.run_id
    ours, theirs = cli_rows(tmp_path / "out"), cli_rows(world.cli_out)
    strip = ("run_id", "computed")
    assert {k: {f: v for f, v in r.items() if f not in strip} for k, r in ours.items()} == \
        {k: {f: v for f, v in r.items() if f not in strip} for k, r in theirs.items()}
    for row in ours.values():
        if "mask" in row:
            assert (tmp_path / "out" / row["mask"]).read_bytes() == (world.cli_out / row["mask"]).read_bytes()
    again = world.predictor.run([world.photos], tmp_path / "out", save_probabilities=True)
    assert (again.processed, again.skipped) == (0, 6)
    with pytest.raises(UsageError, match="device is the Predictor's"):
        world.predictor.run([world.photos], tmp_path / "out", device="cpu")


# -- streaming ----------------------------------------------------------------------------------
def test_a_generator_is_read_lazily(world):
    pulled = []

    def frames():
        for i in range(200):
            pulled.append(i)
            yield picture(48, 64, i % 7)

    stream = world.predictor.predict(frames())
    first = next(stream)
    assert first.image == "array[0]" and first.ok
    # A decode window and a few queued results ahead, never the whole generator.
    assert len(pulled) <= 4 * world.predictor.batch_size + 4 * world.predictor.workers + 8, len(pulled)
    stream.close()
    assert len(pulled) < 200


MEMORY_SCRIPT = r"""
import ctypes, gc, resource, sys
import numpy as np
import psutil
from legitseg import Predictor

def mib():
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # Current RSS of what is alive: freed heap pages go back to the OS first (glibc keeps them
    # otherwise, and how many it keeps varies from run to run by tens of MiB).
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return peak, psutil.Process().memory_info().rss / 2**20

predictor = Predictor(sys.argv[1], models=["lesion"], device="cpu", backend="torch", batch_size=4, workers=2)
rng = np.random.default_rng(0)
base = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)

def frames(n):
    for i in range(n):
        img = base.copy()
        img[:8, :8] = i % 256
        yield img

kept = []
for mode in ("stream", "keep"):
    for i, p in enumerate(predictor.predict(frames(200), probabilities=True)):
        assert p.ok, p.error
        if mode == "keep":
            kept.append(p)
        if i + 1 in (20, 200):
            peak, rss = mib()
            print(f"{mode}{i + 1}_peak={peak:.1f} {mode}{i + 1}_rss={rss:.1f}")
"""


@pytest.mark.slow
def test_200_images_from_a_generator_run_in_flat_memory(world, tmp_path):
    """Peak and current RSS after 200 images of a generator are those after 20, within a margin
    far below what keeping them would cost. The same process then keeps its predictions
    (mask and float16 probabilities of a 640x480 frame: ~0.9 MiB each), which the measure
    must see, so the test can fail."""
    script = tmp_path / "memory.py"
    script.write_text(MEMORY_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(world.manifest)], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)},
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    m = {k: float(v) for k, v in re.findall(r"(\w+)=([\d.]+)", proc.stdout)}
    print("MiB:", m)
    assert m["stream200_peak"] - m["stream20_peak"] < 25, m
    assert m["stream200_rss"] - m["stream20_rss"] < 25, m
    assert m["keep200_rss"] - m["keep20_rss"] > 100, m  # 180 kept predictions: ~160 MiB


# -- errors -------------------------------------------------------------------------------------
def test_manifest_and_weights_errors_are_typed_with_their_exit_codes(world, tmp_path):
    with pytest.raises(ManifestError, match="manifest not found") as err:
        Predictor(tmp_path / "missing.yaml")
    assert err.value.exit_code == 3
    bad = tmp_path / "bad.yaml"
    bad.write_text(world.manifest.read_text().replace("version: 1", "version: 1\nextra_field: 2"))
    with pytest.raises(ManifestError, match="extra_field"):
        Predictor(bad)
    weights = tmp_path / "weights"
    weights.mkdir()
    for f in (world.root / "weights").iterdir():
        (weights / f.name).write_bytes(f.read_bytes())
    (weights / "grade.safetensors").open("ab").write(b"\0")
    moved = tmp_path / "models.yaml"
    moved.write_text(world.manifest.read_text())
    with pytest.raises(WeightsError, match="grade") as err:
        Predictor(moved, device="cpu", backend="torch")
    assert err.value.exit_code == 3 and "sha256" in str(err.value)
    with pytest.raises(UsageError, match="nevus") as err:
        Predictor(world.manifest, models=["nevus"])
    assert err.value.exit_code == 2
    with pytest.raises(UsageError, match="--precision fp16 needs a CUDA device"):
        Predictor(world.manifest, device="cpu", precision="fp16")


def test_a_bad_image_is_a_failed_prediction_or_image_failed_when_asked(world, tmp_path):
    broken = tmp_path / "broken.jpg"
    data = (world.photos / "a.jpg").read_bytes()[:-300]  # a JPEG cut short
    broken.write_bytes(data)
    good, bad, odd, wrong = world.predictor.predict(
        [world.photos / "b.jpg", broken, np.zeros((10, 10, 3), np.float32), tmp_path / "missing.jpg"])
    assert good.ok and good.error is None
    assert (bad.ok, bad.error_kind, bad.size) == (False, "image", None)
    assert "truncated JPEG" in bad.error and bad.sha256 == hashlib.sha256(data).hexdigest()
    assert all(r.status == "failed" and r.error_kind == "image" and r.mask is None for r in bad.results.values())
    assert odd.error_kind == "image" and "dtype float32" in odd.error
    assert wrong.error_kind == "image" and "file not found" in wrong.error
    with pytest.raises(ImageFailed) as err:
        list(world.predictor.predict([world.photos / "b.jpg", broken], raise_on_error=True))
    assert err.value.exit_code == 1 and err.value.prediction.image == str(broken)
    assert "truncated JPEG" in str(err.value)
    with pytest.raises(UsageError, match="item 1 is a int"):
        list(world.predictor.predict([world.photos / "b.jpg", 3]))


# -- import cost, docs ------------------------------------------------------------------------
def test_import_legitseg_does_not_import_torch():
    code = ("import sys, legitseg; legitseg.Predictor; legitseg.Prediction; legitseg.ImageFailed; "
            "import legitseg.api; print(sorted(m for m in ('torch', 'cv2', 'segmentation_models_pytorch') "
            "if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
    assert (REPO / "legitseg" / "py.typed").is_file()


def test_api_defaults_match_the_cli():
    """One constant, not copies kept in step: tests/test_registry.py checks every entry point's default."""
    from legitseg.api import DEFAULT_MAX_PIXELS
    from legitseg.manifest import choices

    assert DEFAULT_MAX_PIXELS is choices.DEFAULT_MAX_PIXELS


def test_the_python_api_doc_runs_as_written(tmp_path, monkeypatch, capsys):
    kit = ModelKit(tmp_path)
    kit.add("lesion", input_size=(64, 64), arch_params={"decoder_channels": [16, 16, 16, 16, 16]})
    kit.add("grade", task="severity", classes=5, input_size=(64, 64), seed=1)
    kit.write()
    for i, name in enumerate(("visit1.jpg", "visit2.jpg", "visit3.jpg")):
        save(tmp_path / "photos" / name, picture(70 + i, 90, i), quality=90)
    monkeypatch.chdir(tmp_path)
    text = (REPO / "docs" / "python-api.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 6
    namespace: dict = {}
    exec(compile("\n".join(blocks), "docs/python-api.md", "exec"), namespace)
    out = capsys.readouterr().out
    assert "['lesion', 'grade']" in out
    assert "array[0] array float16 (1, 70, 90)" in out
    assert "False image corrupt image header" in out
    assert "1 photos/broken.jpg" in out
    assert "completed 3 1 1" in out and "0 4" in out
