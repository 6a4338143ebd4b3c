"""The ONNX Runtime backend: parity per architecture, the cache, backend choice, `run` with
both backends, and `legitseg export` with its sidecar (docs/onnx.md).

Tiny real models (timm test encoders), exported for real; nothing is mocked but a
failing forward pass where the gate must see one.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from legitseg.cli import app
from legitseg.errors import UsageError
from legitseg.export import read_sidecar
from legitseg.fsio import cache_root
from legitseg.inference.ort_runner import OrtRunner, available_cores, make_session
from legitseg.inference.ort_runner import gate as ort_gate
from legitseg.inference.registry import choose_backend
from legitseg.inference.torch_runner import TorchRunner
from legitseg.manifest.spec import load_manifest
from legitseg.models.factory import load_model
from legitseg.models.onnx_export import cache_folder, cached_onnx
from legitseg.options import Environment
from tests.conftest import run_cli

CPU = torch.device("cpu")
VIT = "tu-test_vit.r160_in1k"
TOLERANCE = 1e-4


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A cache folder of this test's own."""
    monkeypatch.setenv("LEGITSEG_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "onnx"


@pytest.fixture(autouse=True)
def _log_to_caplog():
    """The CLI's logging set-up stops propagation; let caplog see warnings again."""
    root = logging.getLogger("legitseg")
    saved = root.handlers[:], root.propagate, root.level
    root.handlers[:], root.propagate = [], True
    root.setLevel(logging.INFO)
    yield
    root.handlers[:], root.propagate = saved[:2]
    root.setLevel(saved[2])


def load(kit, name: str):
    return load_model(load_manifest(kit.write()).models[name])


def gate(loaded, tolerance: float = TOLERANCE):
    """The gate as a run calls it, with the cache folder the test's environment names."""
    return ort_gate(loaded, TorchRunner(loaded, CPU), tolerance, cache_dir=cache_root())


def images(folder: Path, sizes=((70, 90), (45, 33), (128, 200)), seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, (h, w) in enumerate(sizes):
        # smooth pictures, so that masks are not pure noise
        small = rng.integers(0, 256, (max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
        cv2.imwrite(str(folder / f"img{i}.png"), cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC))
    return folder


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


# -- every smp architecture: exported and gated, or torch with the reason ------------------
SMALL = {  # small decoders keep each case to a second or two on two cores
    "Unet": {"decoder_channels": [16, 16, 16, 16, 16]},
    "UnetPlusPlus": {"decoder_channels": [16, 16, 16, 16, 16]},
    "MAnet": {"decoder_channels": [16, 16, 16, 16, 16], "decoder_pab_channels": 16},
    "Linknet": {},
    "FPN": {"decoder_pyramid_channels": 32, "decoder_segmentation_channels": 32},
    "PSPNet": {"psp_out_channels": 32},
    "DeepLabV3": {"decoder_channels": 32},
    "DeepLabV3Plus": {"decoder_channels": 32},
    "PAN": {"decoder_channels": 32},
    "UPerNet": {"decoder_channels": 32},
    "Segformer": {"decoder_segmentation_channels": 32},
    "DPT": {"decoder_intermediate_channels": [16, 32, 64, 64], "decoder_fusion_channels": 16},
}
PAD = {"resize": "pad", "input_size": (64, 64)}  # pad models probe at input_size when it is given
ARCHITECTURES = [
    # (case, arch, fields, backend, why torch)
    ("Unet", "Unet", {}, "onnxruntime", None),
    ("Unet-pad", "Unet", PAD, "onnxruntime", None),
    ("UnetPlusPlus", "UnetPlusPlus", {}, "onnxruntime", None),
    ("MAnet", "MAnet", {}, "onnxruntime", None),
    ("Linknet", "Linknet", {}, "onnxruntime", None),
    ("FPN", "FPN", {"classes": 3}, "onnxruntime", None),
    # PSP pooling (bins 1, 2, 3, 6) exports only when the pooled map is a multiple of 6
    # and of fixed size: 96 / 8 = 12 exports, 64 / 8 = 8 and any `pad` model do not.
    ("PSPNet", "PSPNet", {"input_size": (96, 96)}, "onnxruntime", None),
    ("PSPNet-64", "PSPNet", {}, "torch", "adaptive_avg_pool2d"),
    ("PSPNet-pad", "PSPNet", PAD, "torch", "adaptive_avg_pool2d"),
    ("DeepLabV3", "DeepLabV3", {}, "onnxruntime", None),
    ("DeepLabV3Plus", "DeepLabV3Plus", {"classes": 2}, "onnxruntime", None),
    ("DeepLabV3Plus-pad", "DeepLabV3Plus", PAD, "onnxruntime", None),
    ("PAN", "PAN", {"input_size": (128, 128)}, "onnxruntime", None),  # PAN needs >= 128 px even in torch
    # UPerNet's PSP head pools the stride-32 map: 192 / 32 = 6 exports, 64 / 32 = 2 does not.
    ("UPerNet", "UPerNet", {"input_size": (192, 192)}, "onnxruntime", None),
    ("UPerNet-64", "UPerNet", {}, "torch", "adaptive_avg_pool2d"),
    ("Segformer", "Segformer", {}, "onnxruntime", None),
    ("Segformer-pad", "Segformer", PAD, "onnxruntime", None),
    # DPT exports at its ViT encoder's native size only; elsewhere timm resizes the
    # position embedding with antialiased bicubic interpolation, which ONNX lacks.
    ("DPT", "DPT", {"encoder": VIT, "input_size": (160, 160)}, "onnxruntime", None),
    ("DPT-64", "DPT", {"encoder": VIT}, "torch", "upsample_bicubic2d_aa"),
]


@pytest.mark.slow
@pytest.mark.parametrize("case, arch, fields, backend, why", ARCHITECTURES, ids=[a[0] for a in ARCHITECTURES])
def test_each_architecture_exports_and_passes_the_gate_or_falls_back_to_torch(
        kit, cache, caplog, case, arch, fields, backend, why):
    kit.add("m", arch=arch, arch_params=SMALL[arch], **fields)
    result = gate(load(kit, "m"))
    assert result.runner.backend == backend, result.reason
    if backend == "onnxruntime":
        assert isinstance(result.runner, OrtRunner)
        assert result.reason is None and 0 <= result.parity <= TOLERANCE
        assert result.runner.parity == result.parity
    else:
        assert type(result.runner) is TorchRunner and result.runner.parity is None
        assert why in result.reason and "ONNX export failed" in result.reason
        assert "model 'm': ONNX export failed: " in caplog.text
        assert "using the torch backend for this model" in caplog.text
        assert len(result.reason) < 400  # one line, not the exporter's graph dump


def test_every_smp_architecture_has_a_case():
    from legitseg.manifest.smp_names import ARCHITECTURES as SMP

    assert {a for _, a, *_ in ARCHITECTURES} == set(SMP) == set(SMALL)


@pytest.mark.parametrize("fields", [
    dict(classes=5, temperature=2.0, pooling="max"),
    dict(classes=3, in_channels=1, normalize={"mean": [0.5], "std": [0.25]}),
    dict(classes=4, resize="pad"),
], ids=["temperature-max-pool", "one-channel", "pad"])
def test_severity_classifiers_pass_the_gate(kit, cache, fields):
    kit.add("grade", task="severity", **fields)
    result = gate(load(kit, "grade"))
    assert result.runner.backend == "onnxruntime", result.reason
    assert result.parity <= TOLERANCE


# -- the gate ----------------------------------------------------------------------------------
def test_a_difference_above_the_tolerance_falls_back_to_torch_with_the_figure(kit, cache, caplog):
    kit.add("lesion", arch_params=SMALL["Unet"])
    loaded = load(kit, "lesion")
    result = gate(loaded, tolerance=1e-12)
    assert type(result.runner) is TorchRunner
    assert 1e-12 < result.parity < TOLERANCE
    assert result.runner.parity is None  # the gate never changes the reference it was given
    figure = result.figures.relative
    assert f"differ from torch's: logits differ from torch by {figure:.3g} of the largest logit > parity " \
           "tolerance 1e-12" in caplog.text


def test_nan_from_onnx_runtime_fails_the_gate(kit, cache, monkeypatch):
    kit.add("lesion", arch_params=SMALL["Unet"])
    loaded = load(kit, "lesion")
    monkeypatch.setattr(OrtRunner, "forward", lambda self, x: torch.full((x.shape[0], 1, *x.shape[2:]), math.nan))
    result = gate(loaded)
    assert type(result.runner) is TorchRunner and result.parity == math.inf
    assert result.runner.parity is None  # run.json is JSON: no Infinity


# -- which backend -----------------------------------------------------------------------------
@pytest.mark.parametrize("requested, manifest, device, precision, want", [
    (None, "auto", "cpu", "fp32", "onnxruntime"),
    (None, "auto", "cpu", "bf16", "torch"),
    (None, "auto", "cuda", "fp32", "torch"),
    ("auto", "torch", "cpu", "fp32", "onnxruntime"),  # the command line wins over the manifest
    ("torch", "onnxruntime", "cpu", "fp32", "torch"),
    (None, "torch", "cpu", "fp32", "torch"),
    (None, "onnxruntime", "cpu", "fp32", "onnxruntime"),
    (None, "onnxruntime", "cuda:1", "fp16", "torch"),  # manifest default on a GPU machine: warn, torch
])
def test_backend_choice(kit, requested, manifest, device, precision, want):
    kit.add("m", backend=manifest)
    spec = load_manifest(kit.write()).models["m"]
    assert choose_backend(requested, spec, torch.device(device), precision) == want


@pytest.mark.parametrize("device, precision", [("cuda", "fp32"), ("cpu", "bf16")])
def test_onnxruntime_asked_for_where_it_cannot_run_is_a_usage_error(kit, device, precision):
    kit.add("m")
    spec = load_manifest(kit.write()).models["m"]
    with pytest.raises(UsageError, match="runs on the CPU in fp32 only"):
        choose_backend("onnxruntime", spec, torch.device(device), precision)


def test_threads_default_to_the_cores_and_follow_the_environment(kit):
    assert Environment.read({}).ort_threads is None
    assert Environment.read({"LEGITSEG_ORT_THREADS": "1"}).ort_threads == 1
    for bad in ("0", "two", "-3"):
        with pytest.raises(UsageError, match="LEGITSEG_ORT_THREADS"):
            Environment.read({"LEGITSEG_ORT_THREADS": bad})
    kit.add("m", arch_params=SMALL["Unet"])
    data = cached_onnx(load(kit, "m"), None).data
    assert make_session(data).get_session_options().intra_op_num_threads == available_cores()
    assert make_session(data, 1).get_session_options().intra_op_num_threads == 1


# -- the cache ---------------------------------------------------------------------------------
def test_cache_is_reused_then_rebuilt_when_the_weights_change(kit, cache, tmp_path):
    kit.add("lesion", arch_params=SMALL["Unet"])
    folder = images(tmp_path / "img")
    manifest = kit.write()
    r = invoke("run", str(folder), "-m", str(manifest), "-o", str(tmp_path / "a"))
    assert r.exit_code == 0, r.output
    assert "lesion: exported to ONNX" in r.stderr
    first = sorted(cache.iterdir())
    assert [p.suffix for p in first] == [".json", ".onnx"]
    stamp = first[1].stat().st_mtime_ns

    r = invoke("run", str(folder), "-m", str(manifest), "-o", str(tmp_path / "b"))
    assert r.exit_code == 0, r.output
    assert "lesion: using cached ONNX graph" in r.stderr and "exported" not in r.stderr
    assert sorted(cache.iterdir()) == first and first[1].stat().st_mtime_ns == stamp

    kit.add("lesion", arch_params=SMALL["Unet"], seed=7)  # new weights, new sha256 in the manifest
    r = invoke("run", str(folder), "-m", str(kit.write()), "-o", str(tmp_path / "c"))
    assert r.exit_code == 0, r.output
    assert "lesion: exported to ONNX" in r.stderr
    assert len(list(cache.glob("*.onnx"))) == 2


@pytest.mark.parametrize("damage, message", [
    (lambda onnx, meta: onnx.write_bytes(onnx.read_bytes()[:-10] + b"0123456789"), "is corrupt"),
    (lambda onnx, meta: onnx.write_bytes(b""), "is corrupt"),
    (lambda onnx, meta: meta.write_text("{not json"), "is unreadable"),
    (lambda onnx, meta: meta.unlink(), "is unreadable"),
    (lambda onnx, meta: meta.write_text(json.dumps({**json.loads(meta.read_text()), "fields": {"opset": 9}})),
     "does not describe this model"),
], ids=["flipped-bytes", "empty", "bad-json", "no-metadata", "stale-metadata"])
def test_a_damaged_cache_entry_is_rebuilt_never_trusted(kit, cache, caplog, damage, message):
    kit.add("lesion", arch_params=SMALL["Unet"])
    loaded = load(kit, "lesion")
    graph = cached_onnx(loaded, cache.parent)
    assert not graph.reused
    damage(graph.path, graph.path.with_suffix(".json"))
    again = cached_onnx(loaded, cache.parent)
    assert not again.reused and message in caplog.text
    assert again.data == graph.data  # rebuilt: the same export as before
    assert cached_onnx(loaded, cache.parent).reused  # and trusted again once whole


def test_an_unwritable_cache_warns_and_uses_the_export_for_this_run(kit, tmp_path, monkeypatch, caplog):
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("LEGITSEG_CACHE_DIR", str(tmp_path / "file"))
    kit.add("lesion", arch_params=SMALL["Unet"])
    result = gate(load(kit, "lesion"))
    assert result.runner.backend == "onnxruntime" and result.graph.path is None
    assert "cannot write the ONNX cache" in caplog.text


def test_cache_location(tmp_path):
    def onnx_folder(environ):
        return cache_folder(Environment.read(environ).cache_dir)

    assert onnx_folder({"LEGITSEG_CACHE_DIR": str(tmp_path)}) == tmp_path / "onnx"
    assert onnx_folder({"XDG_CACHE_HOME": str(tmp_path / "xdg")}) == tmp_path / "xdg" / "legitseg" / "onnx"
    assert onnx_folder({"HOME": str(tmp_path / "home")}) == tmp_path / "home" / ".cache" / "legitseg" / "onnx"


def test_without_a_cache_folder_the_graph_is_exported_and_kept_nowhere(kit, cache):
    kit.add("lesion", arch_params=SMALL["Unet"])
    graph = cached_onnx(load(kit, "lesion"), None)
    assert graph.path is None and not graph.reused and not cache.exists()


# -- `run` with both backends ------------------------------------------------------------------
@pytest.fixture
def three_models(kit):
    kit.add("lesion", input_size=(64, 96), threshold=0.45, arch_params=SMALL["Unet"], seed=1)
    kit.add("regions", arch="FPN", classes=3, resize="pad", arch_params=SMALL["FPN"], seed=2)
    kit.add("grade", task="severity", classes=5, temperature=1.5, seed=3)
    return kit.write()


def test_run_results_agree_between_backends_within_the_gate(three_models, tmp_path):
    folder = images(tmp_path / "img")
    outs = {}
    for backend in ("torch", "onnxruntime"):
        outs[backend] = tmp_path / backend
        r = invoke("run", str(folder), "-m", str(three_models), "-o", str(outs[backend]),
                   "--backend", backend, "--save-probabilities", "--batch-size", "2")
        assert r.exit_code == 0, r.output
    run_json = {b: json.loads((o / "run.json").read_text()) for b, o in outs.items()}
    for name in ("lesion", "regions", "grade"):
        assert run_json["torch"]["models"][name]["backend"] == "torch"
        assert run_json["torch"]["models"][name]["parity"] is None
        assert run_json["onnxruntime"]["models"][name]["backend"] == "onnxruntime"
        assert run_json["onnxruntime"]["models"][name]["parity"] <= TOLERANCE
    for record in sorted((outs["onnxruntime"] / "records").iterdir()):
        ort_rec = json.loads(record.read_text())
        torch_rec = json.loads((outs["torch"] / "records" / record.name).read_text())
        for name, entry in ort_rec["models"].items():
            other = torch_rec["models"][name]
            assert entry["backend"] == "onnxruntime" and other["backend"] == "torch"
            assert entry["parity"] == run_json["onnxruntime"]["models"][name]["parity"]
            if name == "grade":
                assert entry["probabilities"] == pytest.approx(other["probabilities"], abs=TOLERANCE)
                assert entry["grade"] == other["grade"]
                continue
            p_ort = np.load(outs["onnxruntime"] / entry["probability_map"])["probabilities"].astype(np.float32)
            p_torch = np.load(outs["torch"] / other["probability_map"])["probabilities"].astype(np.float32)
            # stored as float16: one unit in the last place near 1.0 is 1e-3
            np.testing.assert_allclose(p_ort, p_torch, atol=TOLERANCE + 1e-3, rtol=0)
            m_ort = cv2.imread(str(outs["onnxruntime"] / entry["mask"]), cv2.IMREAD_UNCHANGED)
            m_torch = cv2.imread(str(outs["torch"] / other["mask"]), cv2.IMREAD_UNCHANGED)
            assert (m_ort != m_torch).mean() < 1e-3


def test_models_the_gate_refuses_run_on_torch_and_stdout_stays_clean(kit, tmp_path):
    """A real process: the exporter's C++ graph dump must reach neither stdout (--jsonl) nor stderr."""
    kit.add("psp", arch="PSPNet", arch_params=SMALL["PSPNet"])  # 64x64: cannot be exported
    kit.add("strict", arch_params=SMALL["Unet"], parity_tolerance=1e-12)  # the manifest sets the gate
    kit.add("lesion", arch_params=SMALL["Unet"], seed=1)
    out = tmp_path / "out"
    r = run_cli("run", str(images(tmp_path / "img")), "-m", str(kit.write()), "-o", str(out), "--jsonl")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert {(row["model"], row["backend"]) for row in rows} == {
        ("psp", "torch"), ("strict", "torch"), ("lesion", "onnxruntime")}
    assert "model 'psp': ONNX export failed: " in r.stderr and "graph(" not in r.stderr
    assert "model 'strict': ONNX Runtime's outputs differ from torch's: logits differ from torch by" in r.stderr
    assert len(r.stderr.splitlines()) < 30
    models = json.loads((out / "run.json").read_text())["models"]
    assert (models["psp"]["backend"], models["psp"]["parity"]) == ("torch", None)
    assert models["strict"]["backend"] == "torch" and 1e-12 < models["strict"]["parity"] < TOLERANCE
    assert models["lesion"]["backend"] == "onnxruntime" and models["lesion"]["parity"] <= TOLERANCE
    gate_figures = models["strict"]["parity_gate"]
    assert gate_figures["passed"] is False and gate_figures["tolerance"] == 1e-12 < gate_figures["relative"]
    assert models["lesion"]["parity_gate"]["passed"] is True and models["psp"]["parity_gate"] is None
    record = json.loads(next((out / "records").iterdir()).read_text())
    assert record["models"]["strict"]["parity"] == models["strict"]["parity"]


def test_backend_on_the_command_line_is_validated(three_models, tmp_path):
    r = invoke("run", str(images(tmp_path / "img")), "-m", str(three_models), "-o", str(tmp_path / "o"),
               "--backend", "tensorrt")
    assert r.exit_code == 2 and "--backend 'tensorrt': choose auto, torch or onnxruntime" in r.output


# -- `legitseg export` -------------------------------------------------------------------------
def preprocess(rgb: np.ndarray, sidecar: dict) -> np.ndarray:
    """SPEC 4.2 from the sidecar alone: what a server elsewhere would do."""
    if sidecar["resize"] == "stretch":
        h, w = sidecar["input_size"]
        flag = {"linear": cv2.INTER_LINEAR, "area": cv2.INTER_AREA, "cubic": cv2.INTER_CUBIC,
                "nearest": cv2.INTER_NEAREST}[sidecar["interpolation"]]
        rgb = cv2.resize(rgb, (w, h), interpolation=flag)
    mean, std = (np.array(sidecar["normalize"][k], np.float32) for k in ("mean", "std"))
    x = ((rgb.astype(np.float32) / 255 - mean) / std).transpose(2, 0, 1)[None]
    if sidecar["resize"] == "pad":
        s = sidecar["pad_to_multiple_of"]
        x = np.pad(x, ((0, 0), (0, 0), (0, -x.shape[2] % s), (0, -x.shape[3] % s)))
    return np.ascontiguousarray(x)


def test_export_writes_onnx_and_a_sidecar_that_reproduces_run(three_models, tmp_path):
    folder = images(tmp_path / "img")
    out = tmp_path / "out"
    r = invoke("run", str(folder), "-m", str(three_models), "-o", str(out), "--backend", "torch",
               "--save-probabilities")
    assert r.exit_code == 0, r.output
    spec = load_manifest(three_models).models
    for name in ("lesion", "regions", "grade"):
        target = tmp_path / "served" / f"{name}.onnx"
        r = invoke("export", name, "-o", str(target), "-m", str(three_models))
        assert r.exit_code == 0, r.output
        sidecar = read_sidecar(target)  # checks the file's sha256 against the sidecar's
        s = spec[name]
        assert r.stdout.split()[:2] == [str(target), "sha256"] and sidecar["onnx_sha256"] in r.stdout
        assert (sidecar["name"], sidecar["task"], sidecar["classes"], sidecar["weights_sha256"]) == (
            name, s.task, s.classes, s.sha256)
        assert sidecar["labels"] == list(s.label_names)
        assert sidecar["resize"] == s.resize and sidecar["interpolation"] == s.interpolation
        assert sidecar["input_size"] == (list(s.input_size) if s.resize == "stretch" else None)
        assert sidecar["threshold"] == (s.threshold if name == "lesion" else None)
        assert sidecar["temperature"] == (s.temperature if name == "grade" else None)
        assert 0 <= sidecar["parity"]["max_abs_difference"] <= sidecar["parity"]["tolerance"] == TOLERANCE
        assert sidecar["opset"] == 17 and sidecar["versions"]["onnx"]

        session = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
        for record in sorted((out / "records").iterdir()):
            rec = json.loads(record.read_text())
            rgb = cv2.cvtColor(cv2.imread(rec["image"]), cv2.COLOR_BGR2RGB)
            (logits,) = session.run([sidecar["output"]["name"]], {sidecar["input"]["name"]: preprocess(rgb, sidecar)})
            entry = rec["models"][name]
            t = sidecar["temperature"] or 1.0
            z = logits[0] / t
            if sidecar["task"] == "severity":
                p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
                assert p.tolist() == pytest.approx(entry["probabilities"], abs=TOLERANCE)
                continue
            h, w = rec["size"]
            if sidecar["resize"] == "pad":
                z = z[:, :h, :w]
            up = torch.nn.functional.interpolate(torch.from_numpy(np.ascontiguousarray(z))[None], size=(h, w),
                                                 mode="bilinear", align_corners=False)[0]
            p = (torch.sigmoid(up) if sidecar["output"]["activation"] == "sigmoid" else torch.softmax(up, 0)).numpy()
            stored = np.load(out / entry["probability_map"])["probabilities"].astype(np.float32)
            np.testing.assert_allclose(p, stored, atol=TOLERANCE + 1e-3, rtol=0)


def test_export_checks_the_sha256_before_exporting(kit, tmp_path):
    kit.add("lesion", arch_params=SMALL["Unet"])
    manifest = kit.write()
    weights = tmp_path / "weights" / "lesion.safetensors"
    weights.write_bytes(weights.read_bytes() + b" ")
    target = tmp_path / "lesion.onnx"
    r = invoke("export", "lesion", "-o", str(target), "-m", str(manifest))
    assert r.exit_code == 3 and "sha256 mismatch" in r.output
    assert not target.exists() and not target.with_suffix(".json").exists()


def test_export_refuses_a_model_it_cannot_export_and_writes_nothing(kit, tmp_path):
    kit.add("psp", arch="PSPNet", arch_params=SMALL["PSPNet"])
    target = tmp_path / "psp.onnx"
    r = invoke("export", "psp", "-o", str(target), "-m", str(kit.write()))
    assert r.exit_code == 4 and "ONNX export failed" in r.output and "adaptive_avg_pool2d" in r.output
    assert not target.exists()


@pytest.mark.parametrize("args, code, message", [
    (["lesion", "-o", "lesion.txt"], 2, "must end in .onnx"),
    (["nope", "-o", "x.onnx"], 2, "unknown model(s) nope"),
])
def test_export_usage_errors(kit, tmp_path, args, code, message):
    kit.add("lesion", arch_params=SMALL["Unet"])
    r = invoke("export", *args, "-m", str(kit.write()))
    assert r.exit_code == code and message in r.output
