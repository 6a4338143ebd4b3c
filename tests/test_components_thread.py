"""A mask's regions are counted in the thread that encodes it as PNG (docs/architecture.md).

- Local engine, CPU and GPU ways of postprocessing (`batched_post`, forced on the CPU): every
  `count_components` call runs in the writer thread that encodes the same mask, never in a
  `legitseg-post` thread.
- The records' and scores.csv's `components` are OpenCV's own count of the written mask PNGs.
- The Python API, which writes nothing, still gives int counts, equal to the CLI's.
- A Ray actor counts before its results leave it (the driver has few writer threads).
"""

from __future__ import annotations

import csv
import hashlib
import json
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

from legitseg.inference import postprocess
from legitseg.output import writers
from tests.conftest import ModelKit, invoke_cli
from tests.images import picture, save
from tests.test_run_e2e import MODELS, calibrate

SEGMENTERS = ("lesion", "regions")  # binary and multi-class


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("components")
    kit = ModelKit(root)
    for name in SEGMENTERS:
        kit.add(name, **MODELS[name])
    pictures = [picture(60 + 7 * s, 90 - 5 * s, 40 + s) for s in range(4)]
    calibrate(kit, "lesion", pictures, 12.0)
    calibrate(kit, "regions", pictures, 3.0)
    photos = root / "photos"
    for i in range(6):
        save(photos / f"p{i}.png", picture(70 + 5 * i, 96 - 3 * i, 100 + i))
    return kit.write(), photos


def _key(mask: np.ndarray) -> str:
    return hashlib.sha256(mask.tobytes() + str(mask.shape).encode()).hexdigest()


@pytest.fixture
def calls(monkeypatch) -> dict[str, list[tuple[str, int, str]]]:
    """Each count_components and mask encode_png call as (mask key, thread id, thread name)."""
    seen: dict[str, list[tuple[str, int, str]]] = {"count": [], "encode": []}
    lock = threading.Lock()

    def note(kind: str, mask: np.ndarray) -> None:
        t = threading.current_thread()
        with lock:
            seen[kind].append((_key(mask), threading.get_ident(), t.name))

    count, encode = postprocess.count_components, writers.encode_png

    def counting(mask, label, binary=False):
        note("count", mask)
        return count(mask, label, binary)

    def encoding(mask):
        note("encode", mask)
        return encode(mask)

    monkeypatch.setattr(postprocess, "count_components", counting)
    monkeypatch.setitem(writers.FILES, "mask", (writers.mask_path, encoding))
    return seen


def _regions(mask: np.ndarray, label: int) -> int:
    return cv2.connectedComponents((mask == label).astype(np.uint8), connectivity=8)[0] - 1


@pytest.mark.parametrize("batched_post", [False, True], ids=["cpu-way", "gpu-way"])
def test_regions_are_counted_in_the_thread_that_encodes_the_mask(world, calls, tmp_path, batched_post):
    import torch

    from legitseg.engines.local import Engine
    from legitseg.images.sources import Source
    from legitseg.inference.registry import build_runner
    from legitseg.manifest.spec import load_manifest
    from legitseg.models.factory import load_model
    from legitseg.output.records import ModelInfo

    manifest, photos = world
    runners = [build_runner(load_model(s), torch.device("cpu"), "fp32", "torch")
               for s in load_manifest(manifest).models.values()]
    engine = Engine(runners, batch_size=2, workers=2, post_threads=2, save_probabilities=False,
                    max_pixels=10**8, stop=threading.Event(), batched_post=batched_post)
    sink = writers.Sink(tmp_path / "out", [ModelInfo.of(r) for r in runners], "run-1", 2, depth=engine.depth)
    sources = [Source(p, p.stem) for p in sorted(photos.iterdir())]
    outcomes = list(sink.consume(engine.process(sources)))
    assert all(o.ok for o in outcomes) and len(outcomes) == len(sources)

    assert len(calls["encode"]) == len(sources) * len(SEGMENTERS)
    assert calls["count"], "no mask had a region to count"
    encoders: dict[str, set[int]] = {}
    for key, ident, name in calls["encode"]:
        assert name.startswith("legitseg-write"), name
        encoders.setdefault(key, set()).add(ident)
    for key, ident, name in calls["count"]:
        assert not name.startswith("legitseg-post"), f"regions counted in the postprocessing thread {name}"
        assert ident in encoders.get(key, set()), f"regions counted in {name}, not where the mask was encoded"


def test_records_count_the_regions_of_the_written_masks(world, tmp_path):
    manifest, photos = world
    out = tmp_path / "out"
    r = invoke_cli("run", photos, "-m", manifest, "-o", out, "--device", "cpu", "--backend", "torch", "--quiet")
    assert r.returncode == 0, r.stderr
    table = {(Path(row["image"]).name, row["model"]): row
             for row in csv.DictReader((out / "scores.csv").open(encoding="utf-8"))}
    several = 0
    for path in sorted((out / "records").glob("*.json")):
        record = json.loads(path.read_text())
        for model, entry in record["models"].items():
            assert entry["status"] == "ok", entry
            mask = cv2.imread(str(out / entry["mask"]), cv2.IMREAD_UNCHANGED)
            labels = list(entry["area_fraction"])
            expected = {label: _regions(mask, i) for i, label in enumerate(labels, start=1)}
            assert entry["components"] == expected, (record["name"], model)
            assert all(type(n) is int for n in entry["components"].values())
            assert json.loads(table[Path(record["image"]).name, model]["components"]) == expected
            several += sum(n > 1 for n in expected.values())
    assert several >= 3, "the masks should have several regions each for the count to mean something"


def test_the_python_api_gives_int_counts_equal_to_the_cli(world, tmp_path):
    from legitseg import Predictor

    manifest, photos = world
    out = tmp_path / "out"
    assert invoke_cli("run", photos, "-m", manifest, "-o", out, "--device", "cpu", "--backend", "torch",
                      "--quiet").returncode == 0
    rows = {(Path(r["image"]).name, r["model"]): r
            for r in map(json.loads, (out / "scores.jsonl").read_text().splitlines())}
    predictor = Predictor(manifest, device="cpu", backend="torch")
    predictions = list(predictor.predict(photos)) + [predictor.predict_one(photos / "p0.png")]
    for pred in predictions:
        for model in SEGMENTERS:
            res = pred[model]
            assert res.ok and isinstance(res.components, dict)
            assert all(type(n) is int for n in res.components.values())
            assert res.components == rows[Path(pred.image).name, model]["components"]
            assert res.components == {label: _regions(res.mask, i)
                                      for i, label in enumerate(res.area_fraction, start=1)}


def test_a_ray_actor_counts_before_its_results_leave_it(world):
    """The driver's few writer threads get results whose regions are already counted."""
    import pickle

    import torch

    from legitseg.engines.ray_data import _decode, _ModelActor
    from legitseg.images.sources import Source
    from legitseg.inference.runners import prep_for
    from legitseg.manifest.spec import load_manifest
    from legitseg.models.factory import load_model

    manifest, photos = world
    specs = list(load_manifest(manifest).models.values())
    preps = list(dict.fromkeys(prep_for(load_model(s)) for s in specs))
    rows = [_decode({"i": i, "source": pickle.dumps(Source(p, p.stem))}, preps, 10**8)
            for i, p in enumerate(sorted(photos.iterdir())[:3])]
    actor = _ModelActor(specs, ["torch"] * len(specs), "cpu", "fp32", 3, False, 10**8, torch.get_num_threads())
    packed = actor({"i": np.array([r["i"] for r in rows]), "item": np.array([r["item"] for r in rows], dtype=object)})
    for blob in packed["result"]:
        for output in pickle.loads(blob).outputs.values():
            assert type(output.result.counted) is dict
            assert output.result.counted == {label: _regions(output.result.mask, i)
                                             for i, label in enumerate(output.result.area_fraction, start=1)}


def test_a_count_that_fails_fails_that_image_alone(world, tmp_path, monkeypatch):
    """Counting moved from the postprocessing pool to the writer; an OpenCV error there still fails
    one image's entry (error_kind postprocess, exit 1), not the run."""
    manifest, photos = world
    count = postprocess.count_components
    shape = cv2.imread(str(photos / "p2.png")).shape[:2]  # the world's photos differ in size
    assert sum(cv2.imread(str(p)).shape[:2] == shape for p in photos.iterdir()) == 1
    seen: list[tuple[int, int]] = []

    def failing(mask, label, binary=False):
        seen.append(mask.shape)
        if mask.shape == shape:
            raise cv2.error("connectedComponents: injected failure")
        return count(mask, label, binary)

    monkeypatch.setattr(postprocess, "count_components", failing)
    out = tmp_path / "out"
    r = invoke_cli("run", photos, "-m", manifest, "-o", out, "--device", "cpu", "--backend", "torch", "--quiet")
    assert r.returncode == 1, r.stderr
    records = {p.stem: json.loads(p.read_text()) for p in (out / "records").glob("*.json")}
    assert len(records) == 6 and seen
    for name, record in records.items():
        failed = name.startswith("p2")
        assert (record["status"] == "failed") is failed, (name, record["status"])
        if failed:
            entries = [e for e in record["models"].values() if e["status"] != "ok"]
            assert entries and all(e["error_kind"] == "postprocess" and "injected failure" in e["error"]
                                   for e in entries), record["models"]
