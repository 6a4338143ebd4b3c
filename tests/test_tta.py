"""Test-time augmentation (docs/accuracy.md): views undone on the outputs, probabilities
averaged, all views of a batch in one forward call, recorded in the settings digest."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from legitseg.cli import app
from legitseg.errors import ManifestError
from legitseg.images.decode import prepare
from legitseg.inference.modes import ModeRunner, invert_view, view_array
from legitseg.manifest.spec import load_manifest
from tests import reference_modes as ref
from tests.conftest import ModelKit
from tests.modes_kit import decoded, legit_probs, photos, reference_modules, runners

MODELS = {
    "binary": dict(classes=1, tta=["hflip"]),
    "multi": dict(classes=3, tta="flips"),
    "turns": dict(classes=1, tta=["rot90", "rot270", "vflip"], seed=2),
    "grader": dict(task="severity", arch=None, classes=4, tta="flips", seed=3),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("tta")
    kit = ModelKit(root)
    for name, fields in MODELS.items():
        kit.add(name, **fields)
    kit.add("plain", classes=1)
    return kit, kit.write(), photos(root / "img", [(75, 101), (120, 64)])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_tta_matches_the_reference_on_both_backends(setup, name):
    kit, manifest, files = setup
    modules = reference_modules(kit, name)
    entry = kit.models[name]
    by_backend = runners(manifest, name)
    assert all(isinstance(r, ModeRunner) for r in by_backend.values())
    assert by_backend["onnxruntime"].backend == "onnxruntime"
    # The one graph's gate figures, as a plain model records them (run.json's parity_gate).
    gate = by_backend["onnxruntime"].parity_gate
    assert gate["passed"] is True and gate["probability"] == pytest.approx(by_backend["onnxruntime"].parity, rel=1e-5)
    for path in files:
        rgb = decoded(path)
        want = ref.stretch(modules, rgb, entry, list(load_manifest(manifest).models[name].tta))
        for backend, runner in by_backend.items():
            got = legit_probs(runner, rgb)
            assert got.shape == want.shape, backend
            assert np.abs(got - want).max() < 1e-4, (backend, np.abs(got - want).max())


def test_tta_changes_the_probabilities(setup):
    """A view that did nothing (not undone, or not run) would pass the reference test only by
    luck: the TTA average must differ from the plain prediction of the same weights."""
    kit, manifest, files = setup
    rgb = decoded(files[0])
    plain = ref.stretch(reference_modules(kit, "binary"), rgb, kit.models["binary"], [])
    tta = legit_probs(runners(manifest, "binary")["torch"], rgb)
    assert np.abs(plain - tta).max() > 1e-3


@pytest.mark.parametrize("view", ["hflip", "vflip", "rot90", "rot180", "rot270"])
def test_each_view_is_undone_exactly(view):
    import torch

    a = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)
    y = torch.from_numpy(view_array(a, view).transpose(2, 0, 1).copy())
    assert torch.equal(invert_view(y, view), torch.from_numpy(a.transpose(2, 0, 1).copy()))


class Counting:
    """A real runner that records the batch sizes it is called with."""

    def __init__(self, runner):
        self.runner, self.calls = runner, []

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def logits(self, arrays):
        self.calls.append(len(arrays))
        return self.runner.logits(arrays)


def test_views_go_through_forward_calls_no_larger_than_the_batch(setup):
    _, manifest, files = setup
    mode = runners(manifest, "multi")["torch"]
    counting = Counting(mode.members[0])
    mode.members = [counting]
    arrays = [prepare(decoded(f), mode.prep) for f in files]
    out = mode.logits(arrays)
    assert counting.calls == [2, 2, 2, 2]  # 2 images x (identity + hflip, vflip, rot180), 2 at a time
    assert len(out) == 2
    counting.calls.clear()
    assert len(mode.logits(arrays[:1])) == 1
    assert counting.calls == [1, 1, 1, 1]


def _write(root: Path, body: dict) -> Path:
    import yaml

    path = root / "m.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "models": {"m": body}}))
    return path


@pytest.mark.parametrize("tta, message", [
    (["hflip", "mirror"], "unknown view 'mirror'; valid: hflip, vflip, rot90, rot180, rot270 or flips"),
    (["flips", "hflip"], "a view is listed twice"),
    (["rot90"], "need a square input_size, got [64, 96]"),
])
def test_bad_tta_is_refused_naming_model_and_field(tmp_path, tta, message):
    kit = ModelKit(tmp_path)
    body = kit.add("m", input_size=[64, 96])
    with pytest.raises(ManifestError) as err:
        load_manifest(_write(tmp_path, {**body, "tta": tta}))
    assert "model 'm'" in str(err.value) and "field 'tta'" in str(err.value) or message in str(err.value)
    assert message in str(err.value)


def test_flips_expands_to_the_three_mirrorings(setup):
    _, manifest, _ = setup
    assert load_manifest(manifest).models["multi"].tta == ("hflip", "vflip", "rot180")


def _rows(out: Path) -> dict[str, dict]:
    return {(r["image"], r["model"]): r for r in map(json.loads, (out / "scores.jsonl").read_text().splitlines())}


def test_changing_tta_redoes_images_and_no_tta_restores_the_plain_results(setup, tmp_path):
    kit, manifest, files = setup
    out = tmp_path / "out"
    args = ["run", str(files[0].parent), "-o", str(out), "-m", str(manifest), "--models", "plain",
            "--device", "cpu", "--backend", "torch", "--jsonl"]
    cli = CliRunner()
    first = cli.invoke(app, args)
    assert first.exit_code == 0, first.output
    plain_masks = {p.name: p.read_bytes() for p in (out / "masks" / "plain").iterdir()}
    again = cli.invoke(app, args)
    assert all(not r["computed"] for r in _rows(out).values()), again.output
    with_tta = cli.invoke(app, [*args, "--tta"])
    assert with_tta.exit_code == 0
    assert all(r["computed"] for r in _rows(out).values())  # settings changed: redone
    tta_masks = {p.name: p.read_bytes() for p in (out / "masks" / "plain").iterdir()}
    assert tta_masks != plain_masks
    cli.invoke(app, [*args, "--tta"])
    assert all(not r["computed"] for r in _rows(out).values())  # same settings: skipped
    back = cli.invoke(app, [*args, "--no-tta"])
    assert back.exit_code == 0 and all(r["computed"] for r in _rows(out).values())
    assert {p.name: p.read_bytes() for p in (out / "masks" / "plain").iterdir()} == plain_masks
    run = json.loads((out / "run.json").read_text())
    assert run["arguments"]["tta"] is False
