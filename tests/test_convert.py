"""Lightning-style checkpoints: a one-line refusal at load, and `legitseg models convert`.

The checkpoints are written the way PyTorch Lightning writes them (torch.save of a
dict with `state_dict` under `model.` prefixes, `hyper_parameters` holding a
pathlib path and an argparse Namespace, optimizer state), around a real tiny smp model.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pathlib
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from typer.testing import CliRunner

from legitseg.cli import app
from legitseg.errors import EXIT_INTEGRITY, EXIT_OK, EXIT_USAGE
from legitseg.manifest.spec import ModelSpec
from legitseg.models.factory import build_module, load_model
from tests.conftest import TINY


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "4000"})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny real Unet and a Lightning-style checkpoint of it."""
    root = tmp_path_factory.mktemp("lightning")
    torch.manual_seed(3)
    spec = ModelSpec(name="lesion", task="segmentation", arch="Unet", encoder=TINY, weights=root / "x",
                     sha256="0" * 64, input_size=(64, 64))
    module = build_module(spec).eval()
    ckpt = root / "epoch=3-step=40.ckpt"
    torch.save({
        "epoch": 3, "global_step": 40, "pytorch-lightning_version": "2.4.0",
        "state_dict": {f"model.{k}": v for k, v in module.state_dict().items()},
        "hyper_parameters": {"data_dir": pathlib.PosixPath("/data/derm/train"), "lr": 1e-3,
                             "args": argparse.Namespace(batch_size=8, arch="Unet")},
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]}],
        "lr_schedulers": [], "callbacks": {},
    }, ckpt)
    return module, ckpt


def manifest_for(folder: Path, weights: Path) -> Path:
    entry = {"task": "segmentation", "arch": "Unet", "encoder": TINY, "input_size": [64, 64],
             "weights": str(weights), "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}
    path = folder / "models.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "models": {"lesion": entry}}))
    return path


def test_a_lightning_checkpoint_is_refused_in_one_line_that_says_how_to_convert(tmp_path, trained):
    _, ckpt = trained
    r = invoke("models", "check", "-m", manifest_for(tmp_path, ckpt))
    assert r.exit_code == EXIT_INTEGRITY
    line = next(x for x in r.stderr.splitlines() if x.startswith("legitseg: FAILED lesion: "))
    assert line == (
        f"legitseg: FAILED lesion: model 'lesion': {ckpt} holds objects other than tensors and plain containers "
        "(torch.load with weights_only=True refused it: Unsupported global: GLOBAL pathlib.PosixPath was not "
        "an allowed global by default.). legitseg never unpickles code or objects from a weights file; this "
        "looks like a training checkpoint (Lightning keeps hyper_parameters in it): extract the weights with "
        f"`legitseg models convert {ckpt} {ckpt.with_suffix('.safetensors')}` and pin the new file's sha256.")
    assert "weights_only=False" not in r.stderr and "weights_only` set to `False`" not in r.stderr


def test_convert_writes_the_state_dict_and_prints_the_sha256_to_pin(tmp_path, trained):
    module, ckpt = trained
    out = tmp_path / "lesion.safetensors"
    r = invoke("models", "convert", ckpt, out)
    assert r.exit_code == EXIT_OK, r.output
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    assert r.stdout == f"{digest}  {out}\n"
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["source"] == ckpt.name
    assert meta["source_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    # The converted file passes `models check` and loads to exactly the trained tensors.
    manifest = manifest_for(tmp_path, out)
    assert invoke("models", "check", "-m", manifest).exit_code == EXIT_OK
    from legitseg.manifest.spec import load_manifest

    loaded = load_model(load_manifest(manifest).models["lesion"])
    for k, v in module.state_dict().items():
        assert torch.equal(loaded.module.state_dict()[k], v), k
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_convert_with_an_explicit_key(tmp_path, trained):
    _, ckpt = trained
    r = invoke("models", "convert", ckpt, tmp_path / "a.safetensors", "--key", "state_dict")
    assert r.exit_code == EXIT_OK, r.output
    r = invoke("models", "convert", ckpt, tmp_path / "b.safetensors", "--key", "weights")
    assert r.exit_code == EXIT_INTEGRITY
    assert (f"{ckpt} has no entry 'weights' (top-level keys: epoch, global_step, pytorch-lightning_version, "
            "state_dict, hyper_parameters, optimizer_states, lr_schedulers, callbacks)") in r.stderr
    r = invoke("models", "convert", ckpt, tmp_path / "c.safetensors", "--key", "hyper_parameters")
    assert r.exit_code == EXIT_INTEGRITY
    assert "is a dict without tensors at the top level" in r.stderr
    assert not (tmp_path / "b.safetensors").exists() and not (tmp_path / "c.safetensors").exists()


@pytest.mark.parametrize(("name", "expected"), [
    ("out.pt", "out.pt: the output must be a .safetensors file"),
    ("exists.safetensors", "exists.safetensors exists; legitseg never overwrites a weights file (remove it first)"),
])
def test_convert_refuses_bad_outputs(tmp_path, trained, name, expected):
    _, ckpt = trained
    (tmp_path / "exists.safetensors").write_bytes(b"pinned elsewhere")
    r = invoke("models", "convert", ckpt, tmp_path / name)
    assert r.exit_code == EXIT_USAGE
    assert f"{tmp_path}/{expected}" in r.stderr
    assert (tmp_path / "exists.safetensors").read_bytes() == b"pinned elsewhere"


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_convert_never_runs_code_from_a_checkpoint(tmp_path, trained):
    module, _ = trained
    marker = tmp_path / "MARKER"
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": {"x": _RunsCode(marker)}}, ckpt)
    r = invoke("models", "convert", ckpt, tmp_path / "evil.safetensors")
    assert r.exit_code == EXIT_INTEGRITY
    assert f"{ckpt} holds objects that convert does not rebuild (posix.system)" in r.stderr \
        or f"{ckpt} holds objects that convert does not rebuild (os.system)" in r.stderr
    assert not marker.exists() and not (tmp_path / "evil.safetensors").exists()
