"""`legitseg run` end to end: real models, real files, a real subprocess, checked against
an independent implementation of SPEC section 4 (tests/reference.py).

One module-scoped set of runs serves most tests: the CLI processes start together
(each pays ~8 s of imports) while the reference results are computed in-process.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from tests import reference
from tests.conftest import REPO, ModelKit, invoke_cli
from tests.images import image_set, picture, save

LEGITSEG = Path(sys.executable).parent / "legitseg"  # the installed console script
SMALL_UNET = {"decoder_channels": [16, 16, 16, 16, 16]}
SMALL_FPN = {"decoder_pyramid_channels": 32, "decoder_segmentation_channels": 32}
GRADE_VALUES = [0, 0.5, 1, 2, 3, 5, 8, 13, 21, 34]
MODELS = {
    # binary, stretched to a non-square input, its own mean/std, a threshold other than 0.5
    "lesion": dict(input_size=(64, 96), threshold=0.4, arch_params=SMALL_UNET, seed=1,
                   normalize={"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}),
    # multi-class at native resolution, the encoder's own mean/std
    "regions": dict(arch="FPN", classes=3, resize="pad", labels=["skin", "erythema", "scale"],
                    arch_params=SMALL_FPN, seed=2),
    # severity: 10 grades, temperature, uneven class values, area interpolation
    "grade": dict(task="severity", classes=10, input_size=(64, 64), interpolation="area",
                  temperature=2.5, class_values=GRADE_VALUES, pooling="max", seed=3),
}
STDIN_MODELS = ("lesion", "grade")  # two ONNX exports are enough for that path
HEADS = {"segmentation": "segmentation_head.0", "severity": "classification_head.3"}
PROB_ATOL = 2e-3  # probabilities are stored as float16
TIE = 1e-3  # masks may differ only where the probability is this close to the threshold / a tie


# -- set-up ---------------------------------------------------------------------------------
def calibrate(kit: ModelKit, name: str, pictures: list[np.ndarray], scale: float) -> None:
    """Re-centre a random model's last layer so that its outputs vary between pixels and images.

    A randomly initialised head gives nearly the same class everywhere; subtracting each
    class's median logit (over a few pictures) and scaling makes masks mixed and grades differ.
    """
    entry = kit.models[name]
    path = kit.root / entry["weights"]
    module = reference.build(entry, kit.root)
    with torch.no_grad():
        ys = [module(reference.model_input(p, entry)[0]) for p in pictures]
    if entry["task"] == "severity":
        centre = torch.cat(ys).mean(dim=0)
    else:
        centre = torch.cat([y.flatten(2)[0] for y in ys], dim=1).median(dim=1).values
    state = load_file(str(path))
    head = HEADS[entry["task"]]
    state[f"{head}.weight"] = state[f"{head}.weight"] * scale
    state[f"{head}.bias"] = (state[f"{head}.bias"] - centre) * scale
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class World:
    root: Path
    manifest: Path
    images: Path  # folder holding image_set()
    files: dict[str, Path]  # output name -> file, in the order a folder INPUT yields them
    entries: dict[str, dict]  # manifest entries
    bad: Path  # two good images and a text file named x.jpg


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("e2e")
    kit = ModelKit(root)
    for name, fields in MODELS.items():
        kit.add(name, **fields)
    pictures = [picture(60 + 7 * s, 90 - 5 * s, 40 + s) for s in range(4)]
    calibrate(kit, "lesion", pictures, 12.0)
    calibrate(kit, "regions", pictures, 3.0)
    calibrate(kit, "grade", pictures, 40.0)
    manifest = kit.write()
    images = root / "images"
    files = image_set(images)
    bad = root / "bad"
    save(bad / "a.png", picture(40, 50, 30))
    save(bad / "c.jpg", picture(45, 35, 31))
    (bad / "x.jpg").write_text("this is not a picture\n")
    return World(root, manifest, images, dict(sorted(files.items(), key=_walk_order)),
                 kit.models, bad)


def _walk_order(item: tuple[str, Path]) -> tuple:
    parts = item[0].split("/")
    return (len(parts) > 1, parts)  # a folder's files come before its subfolders'


class Launched:
    """A CLI process started now and collected later (so that several run side by side)."""

    def __init__(self, argv: list[str], logs: Path, out: Path):
        self.out, self.logs = out, logs
        logs.mkdir(parents=True, exist_ok=True)
        self._stdout, self._stderr = open(logs / "stdout", "w"), open(logs / "stderr", "w")
        # ONNX exports (the CPU default backend) are cached beside the logs, never in ~/.cache.
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "LEGITSEG_CACHE_DIR": str(logs / "cache")}
        self.proc = subprocess.Popen(argv, stdout=self._stdout, stderr=self._stderr,
                                     stdin=subprocess.DEVNULL, env=env, cwd=REPO)
        self._done = False

    def result(self, timeout: float = 300) -> Launched:
        if not self._done:
            self.returncode = self.proc.wait(timeout)
            self._stdout.close()
            self._stderr.close()
            self.stdout = (self.logs / "stdout").read_text()
            self.stderr = (self.logs / "stderr").read_text()
            self._done = True
        return self

    def rows(self) -> list[dict]:
        """--jsonl output; every line must be one JSON object."""
        return [json.loads(line) for line in self.stdout.splitlines()]


class InProcess(Launched):
    """The same run in this process (typer's CliRunner): for runs that need no process of their own."""

    def __init__(self, argv: list[str], logs: Path, out: Path):
        self.out, self.logs, self.proc = out, logs, None
        r = invoke_cli(*argv[3:], cwd=REPO, env={"LEGITSEG_CACHE_DIR": str(logs / "cache")})
        self.returncode, self.stdout, self.stderr, self._done = r.returncode, r.stdout, r.stderr, True


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "legitseg", *args]


@pytest.fixture(scope="module")
def runs(world: World) -> Iterator[dict[str, Launched]]:
    w, m = world, str(world.manifest)
    q = shlex.quote

    def run(key: str, *args: str, kind: type[Launched] = Launched) -> Launched:
        out = w.root / f"out-{key}"
        return kind(cli("run", *args, "-m", m, "-o", str(out), "--device", "cpu"), w.root / "logs" / key, out)

    # The torch backend is SPEC 4's computation itself; the stdin run below takes the default
    # backend (ONNX Runtime on the CPU), so that path meets the reference too.
    common = (str(w.images), "--save-probabilities", "--jsonl", "--backend", "torch")
    launched = {
        "bs7w2": run("bs7w2", *common, "--batch-size", "7", "--workers", "2"),
    }
    stdin_out = w.root / "out-stdin"
    pipeline = (f"find {q(str(w.images))} -name '*.jpg' | tee {q(str(w.root / 'stdin-list.txt'))}"
                f" | {q(str(LEGITSEG))} run - -o {q(str(stdin_out))} -m {q(m)}"
                f" --models {','.join(STDIN_MODELS)} --device cpu --save-probabilities --jsonl")
    launched["stdin"] = Launched(["bash", "-c", f"set -o pipefail; {pipeline}"],
                                 w.root / "logs" / "stdin", stdin_out)
    # Batch size and decode workers need no process of their own: run here while the others run.
    launched["bad"] = run("bad", str(w.bad), "--models", "lesion", "--jsonl", "--backend", "torch", kind=InProcess)
    launched["bs1w2"] = run("bs1w2", *common, "--batch-size", "1", "--workers", "2", kind=InProcess)
    launched["bs7w0"] = run("bs7w0", *common, "--batch-size", "7", "--workers", "0", kind=InProcess)
    yield launched
    for item in launched.values():
        if item.proc is not None and item.proc.poll() is None:
            item.proc.kill()
        item.result()


@pytest.fixture(scope="module")
def expected(world: World) -> dict[tuple[str, str], object]:
    """Reference results per (output name, model)."""
    modules = {name: reference.build(e, world.root) for name, e in world.entries.items()}
    results = {}
    for name, path in world.files.items():
        rgb = reference.decode(path)
        for model, entry in world.entries.items():
            results[name, model] = reference.predict(modules[model], entry, rgb, tie=TIE)
    return results


# -- comparisons ----------------------------------------------------------------------------
def read_mask(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == "L", f"{path}: mode {im.mode}, want single-channel 8-bit"
        return np.asarray(im)


def read_probabilities(path: Path) -> np.ndarray:
    with np.load(path) as npz:
        assert list(npz.keys()) == ["probabilities"]
        p = npz["probabilities"]
    assert p.dtype == np.float16
    return p


def check_segmentation(out: Path, row: dict, ref, labels: list[str]) -> None:
    h, w = ref.mask.shape
    p = read_probabilities(out / row["probability_map"])
    channels = 1 if len(labels) == 2 else len(labels)  # binary models store P(foreground) only
    assert p.shape == ref.probabilities.shape == (channels, h, w)
    np.testing.assert_allclose(p.astype(np.float32), ref.probabilities, atol=PROB_ATOL, rtol=0)
    mask = read_mask(out / row["mask"])
    assert mask.shape == (h, w)
    differ = mask != ref.mask
    assert not (differ & ~ref.ambiguous).any(), "mask differs where the probability is not a near-tie"
    assert differ.mean() < 1e-3
    # Statistics of the mask legitseg wrote, recounted here, must be exactly what it reports.
    area, components = reference.mask_stats(mask, labels)
    assert row["area_fraction"] == pytest.approx(area, abs=1e-12)
    assert row["components"] == components
    ref_area, _ = reference.mask_stats(ref.mask, labels)
    assert row["area_fraction"] == pytest.approx(ref_area, abs=differ.mean() + 1e-12)


def check_severity(row: dict, ref) -> None:
    assert row["probabilities"] == pytest.approx(ref.probabilities.tolist(), abs=1e-5)
    top2 = np.sort(ref.probabilities)[-2:]
    if top2[1] - top2[0] > 1e-5:
        assert row["grade"] == ref.grade
    assert row["score"] == pytest.approx(ref.score, rel=1e-5, abs=1e-6)


def labels_of(world: World, model: str) -> list[str]:
    return reference.label_names(world.entries[model], model)


# -- the main run ---------------------------------------------------------------------------
def test_run_exits_0_and_prints_one_json_row_per_image_and_model(world, runs):
    r = runs["bs7w2"].result()
    assert r.returncode == 0, r.stderr
    rows = r.rows()  # every stdout line parses: nothing else is printed there
    want = [(str(world.images / name), model) for name in world.files for model in MODELS]
    assert [(row["image"], row["model"]) for row in rows] == want
    assert {row["status"] for row in rows} == {"ok"}
    assert "legitseg INFO" in r.stderr  # logs go to stderr


def test_results_match_the_reference_implementation(world, runs, expected):
    r = runs["bs7w2"].result()
    rows = {(Path(row["image"]).relative_to(world.images).as_posix(), row["model"]): row
            for row in r.rows()}
    for (name, model), ref in expected.items():
        row = rows[name, model]
        try:
            if world.entries[model]["task"] == "severity":
                check_severity(row, ref)
            else:
                assert row["mask"] == f"masks/{model}/{name}.png"
                assert row["probability_map"] == f"probabilities/{model}/{name}.npz"
                check_segmentation(r.out, row, ref, labels_of(world, model))
        except AssertionError as err:
            raise AssertionError(f"{name} / {model}: {err}") from err


def test_masks_are_mixed_and_grades_vary(expected):
    """Guards the test itself: a reference that predicts one class everywhere proves little."""
    lesion = np.concatenate([r.mask.ravel() for (_, m), r in expected.items() if m == "lesion"])
    regions = np.concatenate([r.mask.ravel() for (_, m), r in expected.items() if m == "regions"])
    assert 0.1 < lesion.mean() < 0.9
    assert np.bincount(regions, minlength=3).min() > 0.02 * regions.size
    assert len({r.grade for (_, m), r in expected.items() if m == "grade"}) >= 3


def test_exif_orientation_gives_the_oriented_size(world, runs):
    out = runs["bs7w2"].result().out
    for name, (h, w) in {"visit2/rot6.jpg": (95, 62), "visit2/rot8.jpg": (69, 43),
                         "visit2/rot3.jpg": (58, 77), "deep.png": (51, 43)}.items():
        record = json.loads((out / "records" / f"{name}.json").read_text())
        assert record["size"] == [h, w]
        assert read_mask(out / f"masks/lesion/{name}.png").shape == (h, w)
        assert read_probabilities(out / f"probabilities/regions/{name}.npz").shape == (3, h, w)


def test_records_summaries_and_run_json(world, runs):
    r = runs["bs7w2"].result()
    out = r.out
    for name, path in world.files.items():
        record = json.loads((out / "records" / f"{name}.json").read_text())
        assert record["image"] == str(path)
        assert record["name"] == name
        assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert record["status"] == "ok" and record["error"] is None
        assert list(record["models"]) == list(MODELS)
        for model, entry in record["models"].items():
            assert entry["status"] == "ok"
            assert entry["task"] == world.entries[model]["task"]
            assert entry["weights_sha256"] == world.entries[model]["sha256"]
    stdout_rows = r.rows()
    summary = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    key = lambda row: (row["image"], row["model"])  # noqa: E731
    assert sorted(summary, key=key) == sorted(stdout_rows, key=key)
    with open(out / "scores.csv", newline="") as f:
        reader = csv.DictReader(f)
        table = list(reader)
    assert reader.fieldnames == ["image", "model", "status", "error", "mask", "probability_map",
                                 "area_fraction", "components", "score", "grade", "probabilities",
                                 "backend", "run_id", "computed"]
    by_key = {key(row): row for row in summary}
    assert len(table) == len(summary)
    for row in table:
        want = by_key[key(row)]
        if want["model"] == "grade":
            assert float(row["score"]) == want["score"] and int(row["grade"]) == want["grade"]
            assert json.loads(row["probabilities"]) == want["probabilities"]
            assert row["mask"] == ""
        else:
            assert row["mask"] == want["mask"]
            assert json.loads(row["area_fraction"]) == want["area_fraction"]
            assert json.loads(row["components"]) == want["components"]
            assert row["score"] == ""
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "completed"
    assert {row["run_id"] for row in summary} == {run["run_id"]} and all(row["computed"] for row in summary)
    assert run["counts"] == {"processed": len(world.files), "skipped": 0, "failed": 0, "skipped_failed": 0,
                             "unreadable_records": 0}
    assert json.loads((out / "runs" / f"{run['run_id']}.json").read_text()) == run
    assert run["device"] == "cpu" and run["precision"] == "fp32"
    assert run["batch_size"] == 7 and run["workers"] == 2
    assert run["manifest"]["sha256"] == hashlib.sha256(world.manifest.read_bytes()).hexdigest()
    for package in ("legitseg", "python", "torch", "segmentation_models_pytorch", "timm", "opencv",
                    "numpy"):
        assert run["versions"][package], package
    assert torch.__version__.startswith(run["versions"]["torch"].split("+")[0])
    assert {m: v["weights_sha256"] for m, v in run["models"].items()} == \
        {m: e["sha256"] for m, e in world.entries.items()}
    assert run["started"] <= run["ended"]
    assert not list(out.rglob("*.legitseg-tmp"))


# -- SPEC 4.5: batch size and decode workers do not change results ----------------------------
@pytest.mark.parametrize("other", ["bs1w2", "bs7w0"], ids=["batch-size-1-vs-7", "workers-0-vs-2"])
def test_results_do_not_depend_on_batch_size_or_workers(world, runs, expected, other):
    a, b = runs["bs7w2"].result(), runs[other].result()
    assert b.returncode == 0, b.stderr
    rows_a = {(row["image"], row["model"]): row for row in a.rows()}
    rows_b = {(row["image"], row["model"]): row for row in b.rows()}
    assert list(rows_a) == list(rows_b)
    for (image, model), ra in rows_a.items():
        rb = rows_b[image, model]
        name = Path(image).relative_to(world.images).as_posix()
        if model == "grade":
            assert rb["probabilities"] == pytest.approx(ra["probabilities"], abs=1e-6)
            assert rb["score"] == pytest.approx(ra["score"], rel=1e-6)
            assert rb["grade"] == ra["grade"]
            continue
        pa, pb = (read_probabilities(r.out / row["probability_map"]).astype(np.float32)
                  for r, row in ((a, ra), (b, rb)))
        np.testing.assert_allclose(pb, pa, atol=1e-3, rtol=0, err_msg=f"{name} / {model}")
        differ = read_mask(a.out / ra["mask"]) != read_mask(b.out / rb["mask"])
        assert not (differ & ~expected[name, model].ambiguous).any(), f"{name} / {model}"


# -- SPEC 6: pipelines --------------------------------------------------------------------------
def test_find_piped_into_run_dash(world, runs, expected):
    r = runs["stdin"].result()
    assert r.returncode == 0, r.stderr
    listed = (world.root / "stdin-list.txt").read_text().splitlines()
    assert sorted(listed) == sorted(str(p) for n, p in world.files.items() if n.endswith(".jpg"))
    rows = r.rows()  # every stdout line parses: nothing else is printed there
    assert "legitseg INFO" in r.stderr
    assert [(row["image"], row["model"]) for row in rows] == [(p, m) for p in listed for m in STDIN_MODELS]
    assert {row["status"] for row in rows} == {"ok"}
    # Paths from stdin are named by their file name; the two photo.jpg get distinct names.
    masks = {row["image"]: row["mask"] for row in rows if row["model"] == "lesion"}
    assert masks[str(world.images / "gray.jpg")] == "masks/lesion/gray.jpg.png"
    photos = [masks[str(world.images / "photo.jpg")], masks[str(world.images / "visit2/photo.jpg")]]
    assert photos[0] != photos[1]
    assert all(m.startswith("masks/lesion/photo.jpg~") for m in photos)
    # This run took the default backend; its numbers meet the reference all the same.
    for row in rows:
        name = Path(row["image"]).relative_to(world.images).as_posix()
        ref = expected[name, row["model"]]
        try:
            if row["model"] == "grade":
                check_severity(row, ref)
            else:
                check_segmentation(r.out, row, ref, labels_of(world, row["model"]))
        except AssertionError as err:
            raise AssertionError(f"{name} / {row['model']} ({row.get('backend')}): {err}") from err


# -- SPEC 6: exit codes -------------------------------------------------------------------------
def test_one_bad_image_exits_1_and_the_rest_are_written(world, runs):
    r = runs["bad"].result()
    assert r.returncode == 1, r.stderr
    rows = {Path(row["image"]).name: row for row in r.rows()}
    assert set(rows) == {"a.png", "c.jpg", "x.jpg"}
    assert rows["a.png"]["status"] == rows["c.jpg"]["status"] == "ok"
    assert rows["x.jpg"]["status"] == "failed"
    assert "not a recognised image" in rows["x.jpg"]["error"]
    assert "x.jpg" in r.stderr
    for name in ("a.png", "c.jpg"):
        assert (r.out / f"masks/lesion/{name}.png").is_file()
    assert not (r.out / "masks/lesion/x.jpg.png").exists()
    record = json.loads((r.out / "records/x.jpg.json").read_text())
    assert record["status"] == "failed"
    assert record["sha256"] == hashlib.sha256((world.bad / "x.jpg").read_bytes()).hexdigest()
    run = json.loads((r.out / "run.json").read_text())
    assert run["counts"] == {"processed": 2, "skipped": 0, "failed": 1, "skipped_failed": 0, "unreadable_records": 0}
    assert len((r.out / "scores.jsonl").read_text().splitlines()) == 3


def invoke(*args: str):
    from legitseg.cli import app

    return CliRunner().invoke(app, list(args))


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="auto picks the GPU here")


@pytest.mark.parametrize("args, message", [
    (["--precision", "fp16", "--device", "cpu"], "fp16 needs a CUDA device"),
    pytest.param(["--precision", "fp16"], "fp16 needs a CUDA device", marks=NO_CUDA),
    (["--models", "lesion,nope"], "unknown model(s) nope"),
    (["--batch-size", "0"], "batch-size"),
], ids=["fp16-on-cpu", "fp16-auto-without-gpu", "unknown-model", "batch-size-0"])
def test_usage_errors_exit_2_and_write_nothing(world, tmp_path, args, message):
    out = tmp_path / "out"
    r = invoke("run", str(world.bad / "a.png"), "-m", str(world.manifest), "-o", str(out), *args)
    assert r.exit_code == 2, r.output
    assert message in " ".join(r.output.split())
    assert not out.exists()


@pytest.mark.parametrize("inputs, message", [
    ([], "Missing argument"),
    (["/nonexistent/folder"], "does not exist"),
], ids=["no-input", "missing-input"])
def test_missing_input_exits_2(world, tmp_path, inputs, message):
    out = tmp_path / "out"
    r = invoke("run", *inputs, "-m", str(world.manifest), "-o", str(out))
    assert r.exit_code == 2, r.output
    assert message in r.output
    assert not out.exists()


def test_sha256_mismatch_exits_3_and_writes_nothing(world, tmp_path):
    # A weights file changed after it was pinned in the manifest.
    shutil.copytree(world.root / "weights", tmp_path / "weights")
    (tmp_path / "weights" / "grade.safetensors").open("ab").write(b"\0")
    manifest = tmp_path / "models.yaml"
    manifest.write_text(world.manifest.read_text())
    out = tmp_path / "out"
    r = invoke("run", str(world.bad / "a.png"), "-m", str(manifest), "-o", str(out))
    assert r.exit_code == 3, r.output
    assert "sha256" in r.output and "grade" in r.output
    assert not out.exists()


# -- bounded memory -------------------------------------------------------------------------------
PEAK_RSS = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")


@pytest.mark.slow
def test_peak_memory_of_200_images_is_within_10_percent_of_20(tmp_path):
    """SPEC/STYLE: bounded streams. 640x480 photos with probability maps: were decoded images,
    logits or maps kept, 180 more images would add well over 200 MiB to a ~1 GiB process.
    (torch backend: an ONNX export's own peak would hide the pipeline's.)"""
    kit = ModelKit(tmp_path)
    kit.add("lesion", input_size=(64, 64), arch_params=SMALL_UNET)
    manifest = kit.write()
    bases = [picture(480, 640, seed) for seed in range(10)]
    for i in range(200):
        img = bases[i % 10].copy()
        img[:4, :4 * 8] = np.unpackbits(np.array([i], np.uint8)).repeat(4)[None, :, None] * 255
        folder = tmp_path / ("small" if i < 20 else "more")
        save(folder / f"{i:03d}.jpg", img, quality=90)
    shutil.copytree(tmp_path / "small", tmp_path / "more", dirs_exist_ok=True)
    procs = {}
    for key, folder in (("20", "small"), ("200", "more")):
        argv = [sys.executable, "-c", PEAK_RSS, *cli("run", str(tmp_path / folder), "-m", str(manifest),
                                                      "-o", str(tmp_path / f"out{key}"), "--device", "cpu",
                                                      "--save-probabilities", "--quiet",
                                                      "--backend", "torch")]
        procs[key] = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    peak = {}
    for key, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
        peak[key] = int(stdout.split()[-1]) / 1024  # MiB
    print(f"peak RSS: 20 images {peak['20']:.0f} MiB, 200 images {peak['200']:.0f} MiB")
    assert len(list((tmp_path / "out200" / "masks" / "lesion").iterdir())) == 200
    assert peak["200"] <= 1.10 * peak["20"], f"peak RSS 20 images {peak['20']:.0f} MiB, 200 images {peak['200']:.0f} MiB"
