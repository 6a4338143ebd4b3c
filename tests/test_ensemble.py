"""Checkpoint ensembles (docs/accuracy.md): several weights files of one architecture, one
sha256 each, probabilities averaged into one model's outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from legitseg.cli import app
from legitseg.errors import ManifestError
from legitseg.manifest.spec import load_manifest
from tests import reference_modes as ref
from tests.conftest import ModelKit
from tests.modes_kit import decoded, legit_probs, photos, reference_modules, runners


def ensemble(kit: ModelKit, name: str, members: int, **fields) -> dict:
    """An ensemble entry made of `members` ModelKit models with different seeds."""
    entries = [kit.add(f"{name}_{i}", seed=10 + i, **fields) for i in range(members)]
    for i in range(members):
        del kit.models[f"{name}_{i}"]
    entry = {**entries[0], "weights": [e["weights"] for e in entries], "sha256": [e["sha256"] for e in entries]}
    kit.models[name] = entry
    return entry


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ensemble")
    kit = ModelKit(root)
    ensemble(kit, "folds", 3, classes=1)
    ensemble(kit, "folds_tta", 2, classes=3, tta=["hflip"])
    ensemble(kit, "graders", 2, task="severity", arch=None, classes=4)
    return kit, kit.write(), photos(root / "img", [(75, 101), (50, 40)])


@pytest.mark.parametrize("name", ["folds", "folds_tta", "graders"])
def test_ensemble_matches_the_reference_on_both_backends(setup, name):
    kit, manifest, files = setup
    modules = reference_modules(kit, name)
    entry = kit.models[name]
    by_backend = runners(manifest, name)
    assert len(by_backend["torch"].members) == len(entry["weights"])
    for path in files:
        rgb = decoded(path)
        want = ref.stretch(modules, rgb, entry, list(entry.get("tta", [])))
        single = ref.stretch(modules[:1], rgb, entry, list(entry.get("tta", [])))
        assert np.abs(want - single).max() > 1e-3  # the members differ, so the mean is not one member
        for backend, runner in by_backend.items():
            got = legit_probs(runner, rgb)
            assert np.abs(got - want).max() < 1e-4, (backend, np.abs(got - want).max())


def test_one_run_writes_one_mask_and_records_every_members_sha256(setup, tmp_path):
    kit, manifest, files = setup
    out = tmp_path / "out"
    args = ["run", str(files[0].parent), "-o", str(out), "-m", str(manifest), "--models", "folds",
            "--device", "cpu"]
    assert CliRunner().invoke(app, args).exit_code == 0
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["folds"]
    record = json.loads(next((out / "records").glob("*.json")).read_text())
    assert record["models"]["folds"]["weights_sha256"] == kit.models["folds"]["sha256"]
    run = json.loads((out / "run.json").read_text())
    assert len(run["models"]["folds"]["weights"]) == 3
    # Each member was gated on its own (the default backend on the CPU): run.json keeps every figure.
    assert run["models"]["folds"]["backend"] == "onnxruntime"
    gates = run["models"]["folds"]["parity_gate"]["members"]
    assert len(gates) == 3 and all(g["passed"] is True and g["compared"] > 0 for g in gates), gates
    rerun = CliRunner().invoke(app, [*args, "--jsonl"])
    assert all(not json.loads(line)["computed"] for line in rerun.stdout.splitlines())


def test_a_changed_member_file_is_refused_naming_it(setup, tmp_path):
    kit, manifest, files = setup
    second = kit.root / kit.models["folds"]["weights"][1]
    saved = second.read_bytes()
    try:
        second.write_bytes(saved[:-1] + bytes([saved[-1] ^ 1]))
        result = CliRunner().invoke(app, ["run", str(files[0]), "-o", str(tmp_path / "o"), "-m", str(manifest),
                                          "--models", "folds", "--device", "cpu"])
    finally:
        second.write_bytes(saved)
    assert result.exit_code == 3
    assert "sha256 mismatch" in result.output and second.name in result.output


@pytest.mark.parametrize("weights, sha, message", [
    (["a.safetensors", "b.safetensors"], ["a" * 64], "'weights' lists 2 files but 'sha256' has 1 values"),
    (["a.safetensors", "b.safetensors"], "a" * 64, "must both be single values or both lists"),
    (["a.safetensors", "b.safetensors"], ["a" * 64, "A" * 64], "the same sha256 is listed twice"),
])
def test_bad_ensemble_fields_are_refused(tmp_path, weights, sha, message):
    for w in weights:
        (tmp_path / w).write_bytes(b"x")
    body = {"task": "segmentation", "arch": "Unet", "encoder": "resnet18", "weights": weights, "sha256": sha,
            "input_size": [64, 64]}
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "models": {"m": body}}))
    with pytest.raises(ManifestError) as err:
        load_manifest(path)
    assert message in str(err.value) and "model 'm'" in str(err.value)


def test_models_list_shows_every_member(setup):
    _, manifest, _ = setup
    result = CliRunner().invoke(app, ["models", "list", "-m", str(manifest), "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert len(rows["folds"]["weights"]) == 3 and len(rows["folds"]["sha256"]) == 3
