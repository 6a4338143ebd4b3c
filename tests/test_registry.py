"""One list per concept: the backend, precision and engine names with their capabilities
(legitseg/manifest/choices.py) and everything derived from them; the environment read once.
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
import warnings
from typing import get_args

import pytest
import torch
from typer.testing import CliRunner

from legitseg.cli import app
from legitseg.errors import UsageError
from legitseg.manifest import choices
from legitseg.manifest.choices import (
    AUTO,
    AUTO_ORDER,
    BACKEND_CHOICES,
    BACKENDS,
    DEFAULT_MAX_PIXELS,
    ENGINES,
    PRECISIONS,
)
from legitseg.manifest.spec import ModelSpec, load_manifest
from tests.conftest import REPO, TINY, ModelKit, invoke_cli


# -- the names: one list, everything else derived ------------------------------------------------
def test_manifest_literal_cli_help_and_builders_name_the_same_backends():
    from legitseg.inference.registry import BUILDERS

    assert get_args(ModelSpec.model_fields["backend"].annotation) == BACKEND_CHOICES == (AUTO, *BACKENDS)
    assert set(BUILDERS) == set(BACKENDS)
    for command in ("run", "verify"):
        shown = " ".join(CliRunner().invoke(app, [command, "--help"], terminal_width=400).output.split())
        assert " | ".join(BACKEND_CHOICES) in shown, command
    shown = " ".join(CliRunner().invoke(app, ["run", "--help"], terminal_width=400).output.split())
    for name in (*PRECISIONS, *ENGINES):
        assert f"{name} (" in shown, name


@pytest.mark.parametrize("option, value, message", [
    ("--backend", "tensorrt", "--backend 'tensorrt': choose auto, torch or onnxruntime"),
    ("--precision", "fp8", "--precision 'fp8': choose fp32, tf32, fp16 or bf16"),
    ("--engine", "dask", "--engine 'dask': choose local or ray"),
    ("--precision", "fp16", "--precision fp16 needs a CUDA device; on the CPU use fp32 or bf16"),
])
def test_a_name_outside_the_table_is_exit_2_naming_the_choices(tmp_path, option, value, message):
    kit = ModelKit(tmp_path)
    kit.add("m")
    (tmp_path / "img").mkdir()
    r = invoke_cli("run", str(tmp_path / "img"), "-m", str(kit.write()), "-o", str(tmp_path / "out"),
                   "--device", "cpu", option, value)
    assert r.returncode == 2 and f"legitseg: error: {message}" in r.stderr
    assert not (tmp_path / "out").exists()


def test_auto_always_finds_a_backend_and_torch_runs_everywhere():
    for device in ("cpu", "cuda"):
        for precision, p in PRECISIONS.items():
            if device in p.devices:
                assert BACKENDS[choices.auto_backend(device, precision)].fits(device, precision)
                assert BACKENDS[AUTO_ORDER[-1]].fits(device, precision)
    assert choices.auto_backend("cpu", "fp32") == "onnxruntime"
    assert choices.auto_backend("cpu", "bf16") == choices.auto_backend("cuda", "fp32") == "torch"


def test_a_backend_the_manifest_asks_for_where_it_cannot_run_falls_back_with_a_warning(tmp_path, caplog):
    from legitseg.inference.registry import choose_backend

    kit = ModelKit(tmp_path)
    kit.add("m", backend="onnxruntime")
    spec = load_manifest(kit.write()).models["m"]
    assert choose_backend(None, spec, torch.device("cpu"), "bf16") == "torch"
    assert "manifest asks for backend onnxruntime but the onnxruntime backend runs on the CPU in fp32 only" \
        in caplog.text
    with pytest.raises(UsageError, match="--backend onnxruntime: .* use --backend torch or auto"):
        choose_backend("onnxruntime", spec, torch.device("cpu"), "bf16")


def test_precision_tables_cover_every_precision():
    from legitseg.inference.precision import VARIANT_TOLERANCE, autocast_dtype

    assert set(VARIANT_TOLERANCE) == set(PRECISIONS)
    assert [autocast_dtype(p) for p in PRECISIONS] == [None, None, torch.float16, torch.bfloat16]


def test_the_user_guide_shows_the_tables_the_code_has():
    assert choices.docs_tables() in (REPO / "docs" / "user-guide.md").read_text()


def test_max_pixels_has_one_default_everywhere():
    from legitseg import api
    from legitseg.cli.run import run
    from legitseg.options import RunConfig

    defaults = [inspect.signature(api.run).parameters["max_pixels"].default,
                inspect.signature(api.Predictor).parameters["max_pixels"].default,
                inspect.signature(run).parameters["max_pixels"].default,
                RunConfig.__dataclass_fields__["max_pixels"].default]
    assert defaults == [DEFAULT_MAX_PIXELS] * 4


def test_stride_padding_is_one_rule_for_runs_checks_and_exports(tmp_path):
    from legitseg.images.geometry import stride_padding
    from legitseg.models.factory import load_model

    assert [stride_padding(h, w, 32) for h, w in ((64, 64), (65, 33), (1, 95))] == [(0, 0), (31, 31), (31, 1)]
    kit = ModelKit(tmp_path)
    kit.add("pad", resize="pad", input_size=(70, 90))
    kit.add("stretch", input_size=(64, 96))
    models = load_manifest(kit.write()).models
    assert load_model(models["pad"]).probe_input_size() == (96, 96)
    assert load_model(models["stretch"]).probe_input_size() == (64, 96)


# -- the environment: read once, handed down -----------------------------------------------------
def test_environment_is_read_once_into_the_config(tmp_path, monkeypatch):
    from legitseg.options import Environment, RunConfig

    monkeypatch.setenv("LEGITSEG_GPU_DECODE", "0")
    monkeypatch.setenv("LEGITSEG_ORT_THREADS", "3")
    monkeypatch.setenv("LEGITSEG_PROFILE", str(tmp_path / "p.json"))
    monkeypatch.setenv("LEGITSEG_CACHE_DIR", str(tmp_path / "c"))
    kit = ModelKit(tmp_path)
    kit.add("m")
    m = load_manifest(kit.write())
    cfg = RunConfig(inputs=["x"], out=tmp_path / "out", manifest=m, models=list(m.models.values()))
    monkeypatch.setenv("LEGITSEG_ORT_THREADS", "5")  # later changes do not reach a config already made
    assert cfg.env == Environment(tmp_path / "c", False, 3, tmp_path / "p.json")
    assert cfg.env.build_settings().ort_threads == 3


def test_profile_variable_reaches_the_engine_through_the_config(tmp_path):
    kit = ModelKit(tmp_path)
    kit.add("m")
    from tests.images import picture, save

    save(tmp_path / "img" / "a.png", picture(40, 50, seed=1))
    profile = tmp_path / "profile.json"
    r = invoke_cli("run", str(tmp_path / "img"), "-m", str(kit.write()), "-o", str(tmp_path / "out"),
                   "--device", "cpu", "--backend", "torch", env={"LEGITSEG_PROFILE": str(profile)})
    assert r.returncode == 0, r.stderr
    assert json.loads(profile.read_text())["images"] == 1


def test_a_bad_environment_value_is_exit_2_before_anything_is_written(tmp_path):
    kit = ModelKit(tmp_path)
    kit.add("m")
    (tmp_path / "img").mkdir()
    r = invoke_cli("run", str(tmp_path / "img"), "-m", str(kit.write()), "-o", str(tmp_path / "out"),
                   "--backend", "torch", env={"LEGITSEG_ORT_THREADS": "two"})
    assert r.returncode == 2 and "$LEGITSEG_ORT_THREADS='two'" in r.stderr
    assert not (tmp_path / "out").exists()


# -- no process-wide state installed by importing or building ------------------------------------
def test_importing_the_factory_installs_no_warnings_filter():
    # smp, timm and torch may install filters of their own when imported: those come first.
    code = ("import warnings, segmentation_models_pytorch, safetensors.torch, timm, torch, legitseg.models.weights\n"
            "before = list(warnings.filters)\n"
            "import legitseg.models.factory\n"
            "print(warnings.filters == before)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120,
                       env={"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert r.stdout.strip() == "True", r.stderr


def test_building_a_model_leaves_the_callers_warnings_filters_alone(tmp_path):
    from legitseg.models.factory import build_module

    kit = ModelKit(tmp_path)
    kit.add("m", encoder=TINY)
    spec = load_manifest(kit.write()).models["m"]
    before = list(warnings.filters)
    build_module(spec)
    assert warnings.filters == before
