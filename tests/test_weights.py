"""sha256 pinning and safe reading of weights files (SPEC section 3, legitseg/models/weights.py)."""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from legitseg.errors import EXIT_INTEGRITY, WeightsError
from legitseg.models.weights import (
    clean_keys,
    hashed_file,
    load_strict,
    parse_state_dict,
    read_verified,
    sha256_file,
    verify_sha256,
)
from tests.conftest import invoke_cli


def small_state() -> dict[str, torch.Tensor]:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).state_dict()


# -- hashing --------------------------------------------------------------------------
def test_sha256_file_streams_to_the_same_digest_as_hashlib(tmp_path):
    data = os.urandom(3 * 1024 + 17)
    path = tmp_path / "w.bin"
    path.write_bytes(data)
    assert sha256_file(path, chunk=1024) == hashlib.sha256(data).hexdigest()


def test_a_save_pretrained_folder_is_pinned_by_its_model_safetensors(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x")
    assert hashed_file(tmp_path) == tmp_path / "model.safetensors"
    assert hashed_file(tmp_path / "model.safetensors") == tmp_path / "model.safetensors"


def test_read_verified_returns_exactly_the_hashed_bytes(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"abc")
    assert read_verified(path, hashlib.sha256(b"abc").hexdigest(), "m") == b"abc"


@pytest.mark.parametrize("check", [read_verified, verify_sha256])
def test_sha256_mismatch_names_model_file_and_both_digests(tmp_path, check):
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"abc")
    pinned = "0" * 64
    with pytest.raises(WeightsError) as err:
        check(path, pinned, "lesion")
    assert err.value.exit_code == EXIT_INTEGRITY
    assert str(err.value) == (
        f"model 'lesion': sha256 mismatch for {path}: manifest pins {pinned}, "
        f"file has {hashlib.sha256(b'abc').hexdigest()}. Refusing to load it.")


def test_unreadable_weights_are_a_weights_error(tmp_path):
    with pytest.raises(WeightsError, match=r"model 'lesion': cannot read weights .*model.safetensors"):
        read_verified(tmp_path, "0" * 64, "lesion")  # a folder without model.safetensors


# -- formats ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["w.onnx", "w.h5", "w.npz", "w.pkl", "weights", "w.safetensors.gz"])
def test_unsupported_suffix_lists_the_accepted_formats(tmp_path, name):
    with pytest.raises(WeightsError) as err:
        parse_state_dict(b"whatever", tmp_path / name, "lesion")
    assert str(err.value) == (
        f"model 'lesion': unsupported weights format {name!r}; accepted: .safetensors, "
        ".pt/.pth/.ckpt/.bin (torch.save state_dict), or an smp save_pretrained folder")


def test_corrupt_safetensors_is_a_weights_error(tmp_path):
    with pytest.raises(WeightsError, match=r"w.safetensors is not a valid safetensors file"):
        parse_state_dict(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage", tmp_path / "w.safetensors", "m")


def test_truncated_checkpoint_is_a_weights_error(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(small_state(), path)
    with pytest.raises(WeightsError, match=r"cannot read .*w.pt as a torch checkpoint"):
        parse_state_dict(path.read_bytes()[:200], path, "m")


@pytest.mark.parametrize(("obj", "expected"), [
    ({"epoch": 3, "optimizer": {"lr": 0.1}}, "is a dict without tensors at the top level or under "
                                             "state_dict, model_state_dict, model (top-level keys: epoch, optimizer)"),
    ({"state_dict": {"a": 1}}, "is a dict without tensors at the top level"),
    ([torch.zeros(1)], "holds a list, not a state_dict"),
    (torch.zeros(3), "holds a Tensor, not a state_dict"),
])
def test_checkpoints_without_a_state_dict_are_refused(tmp_path, obj, expected):
    path = tmp_path / "w.pt"
    torch.save(obj, path)
    with pytest.raises(WeightsError) as err:
        parse_state_dict(path.read_bytes(), path, "m")
    assert expected in str(err.value)


def test_nested_state_dict_keys_are_tried_in_order(tmp_path):
    path = tmp_path / "w.ckpt"
    a, b = {"x": torch.zeros(1)}, {"x": torch.ones(1)}
    torch.save({"model": b, "state_dict": a, "hyper_parameters": {"lr": 1}}, path)
    assert torch.equal(parse_state_dict(path.read_bytes(), path, "m")["x"], a["x"])


@pytest.mark.parametrize(("key", "clean"), [
    ("encoder.conv1.weight", "encoder.conv1.weight"),
    ("module.encoder.conv1.weight", "encoder.conv1.weight"),
    ("model.encoder.conv1.weight", "encoder.conv1.weight"),
    ("_orig_mod.encoder.conv1.weight", "encoder.conv1.weight"),
    ("module._orig_mod.encoder.conv1.weight", "encoder.conv1.weight"),
    ("model.module.decoder.x", "decoder.x"),
    # Only leading wrappers go: smp's timm encoders have `encoder.model.*` keys.
    ("encoder.model.conv1.weight", "encoder.model.conv1.weight"),
])
def test_clean_keys_strips_only_leading_wrapper_prefixes(key, clean):
    assert list(clean_keys({key: torch.zeros(1)})) == [clean]


# -- strict loading ----------------------------------------------------------------
def test_strict_load_lists_missing_unexpected_and_misshaped(tmp_path):
    module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    state = {k: v.clone() for k, v in module.state_dict().items()}
    del state["1.running_var"]
    state["2.weight"] = torch.zeros(1)
    state["0.weight"] = torch.zeros(5, 3, 3, 3)
    with pytest.raises(WeightsError) as err:
        load_strict(module, state, "lesion", tmp_path / "w.pt")
    msg = str(err.value)
    assert msg.startswith(f"model 'lesion': weights {tmp_path / 'w.pt'} do not fit the manifest's model")
    assert "missing: 1.running_var; unexpected: 2.weight; " in msg
    assert "mis-shaped: 0.weight: file (5, 3, 3, 3) vs model (4, 3, 3, 3)" in msg


def test_strict_load_shows_ten_keys_and_the_count():
    module = nn.Sequential(*[nn.Linear(2, 2) for _ in range(8)])
    with pytest.raises(WeightsError) as err:
        load_strict(module, {}, "m", Path("w.pt"))
    assert "missing: 0.bias, 0.weight, 1.bias" in str(err.value)
    assert ", ... (16 in all)" in str(err.value)


def test_strict_load_accepts_an_exact_state_and_strips_prefixes():
    source, target = nn.Linear(3, 2), nn.Linear(3, 2)
    load_strict(target, {f"module.{k}": v for k, v in source.state_dict().items()}, "m", Path("w.pt"))
    assert torch.equal(target.weight, source.weight) and torch.equal(target.bias, source.bias)


# -- pickles that would run code ------------------------------------------------------------
class _RunsCode:
    """Unpickling this calls os.system: what a malicious or careless checkpoint can do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickles_that_would_run_code_are_refused_and_never_run(tmp_path):
    """Through the CLI (in this process, so a payload that ran would write the marker here): both
    files are pinned by their true sha256, yet nothing runs."""
    marker = tmp_path / "MARKER"
    zip_ckpt = tmp_path / "weights" / "zip.pt"  # torch.save's zip format, payload beside real tensors
    raw_ckpt = tmp_path / "weights" / "raw.pth"  # a plain pickle stream (legacy format)
    zip_ckpt.parent.mkdir()
    torch.save({"state_dict": small_state(), "callback": _RunsCode(marker)}, zip_ckpt)
    raw_ckpt.write_bytes(pickle.dumps({"state_dict": _RunsCode(marker)}, protocol=2))
    models = {
        name: {"task": "segmentation", "arch": "Unet", "encoder": "resnet18", "input_size": [64, 64],
               "weights": f"weights/{path.name}", "sha256": sha256_file(path)}
        for name, path in (("zipped", zip_ckpt), ("raw", raw_ckpt))
    }
    manifest = tmp_path / "models.yaml"
    manifest.write_text(yaml.safe_dump({"version": 1, "models": models}))

    r = invoke_cli("models", "check", "-m", str(manifest), cwd=tmp_path, env={"COLUMNS": "3000"})

    assert r.returncode == EXIT_INTEGRITY, r.stdout + r.stderr
    assert not marker.exists()
    for name, path in (("zipped", zip_ckpt), ("raw", raw_ckpt)):
        assert (f"model '{name}': {path} holds objects other than tensors and plain containers "
                "(torch.load with weights_only=True refused it: ") in r.stderr
    assert "GLOBAL posix.system" in r.stderr or "GLOBAL os.system" in r.stderr
    assert "weights_only` set to `False`" not in r.stderr  # torch's advice to disable the guard is dropped
    assert "2 of 2 model(s) failed the check" in r.stderr
    # Control: the payload is live, so the absent marker above means something.
    pickle.loads(raw_ckpt.read_bytes())
    assert marker.exists()
