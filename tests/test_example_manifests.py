"""The production-shaped manifests in docs/examples/ load and run (SPEC sections 2 and 3).

Each manifest is copied next to randomly initialised weights of its own
architecture (the real encoder, e.g. resnet101), with `sha256` set to that file's
hash, then loaded with load_manifest + load_model and run once at a small size.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from legitseg.manifest.spec import ModelSpec, load_manifest
from legitseg.models.factory import build_module, load_model
from legitseg.models.weights import sha256_file

os.environ["HF_HUB_OFFLINE"] = "1"

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"
# A smaller input than the manifests' own, so the large encoders run quickly on a CPU.
PROBE = (64, 64)

CASES = {
    "erythema_segmenter.yaml": ("DeepLabV3Plus", "efficientnet-b2", (1, 1, *PROBE)),
    "lesion_segmenter.yaml": ("Unet", "resnet101", (1, 3, *PROBE)),
    "severity_classifier.yaml": (None, "efficientnet-b2", (1, 10)),
    # one manifest per accuracy mode (docs/accuracy.md)
    "tta.yaml": ("DeepLabV3Plus", "efficientnet-b2", (1, 1, *PROBE)),
    "ensemble.yaml": ("DeepLabV3Plus", "efficientnet-b2", (1, 1, *PROBE)),
    "letterbox.yaml": ("Unet", "resnet34", (1, 3, *PROBE)),
    "tiling.yaml": ("Unet", "resnet34", (1, 1, *PROBE)),
}
MODES = {"tta.yaml": {"tta": ("hflip", "vflip", "rot180")}, "ensemble.yaml": {"is_ensemble": True},
         "letterbox.yaml": {"resize": "letterbox"}, "tiling.yaml": {"resize": "tile", "tile_size": (512, 512)}}


def test_every_example_manifest_is_covered():
    assert sorted(p.name for p in EXAMPLES.glob("*.yaml")) == sorted(CASES)


@pytest.mark.slow
@pytest.mark.parametrize("filename", sorted(CASES))
def test_example_manifest_loads_and_runs(filename: str, tmp_path: Path):
    arch, encoder, out_shape = CASES[filename]
    raw = yaml.safe_load((EXAMPLES / filename).read_text())
    ((name, body),) = raw["models"].items()
    assert body.get("arch") == arch and body["encoder"] == encoder

    files = body["weights"] if isinstance(body["weights"], list) else [body["weights"]]
    hashes = []
    for seed, file in enumerate(files):
        weights = tmp_path / file
        weights.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(seed)
        module = build_module(ModelSpec(name=name, **{**body, "weights": weights, "sha256": "0" * 64}))
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(weights))
        hashes.append(sha256_file(weights))
    body["sha256"] = hashes if isinstance(body["weights"], list) else hashes[0]
    manifest_path = tmp_path / filename
    manifest_path.write_text(yaml.safe_dump(raw, sort_keys=False))

    spec = load_manifest(manifest_path).models[name]
    assert [w for w, _ in spec.weight_files] == [(tmp_path / f).absolute() for f in files]
    for attr, value in MODES.get(filename, {}).items():
        assert getattr(spec, attr) == value
    loaded = load_model(spec)
    assert len(loaded.members) == (len(files) if len(files) > 1 else 0)
    assert loaded.mean == (0.485, 0.456, 0.406) and loaded.std == (0.229, 0.224, 0.225)
    with torch.inference_mode():
        out = loaded.module(torch.zeros(1, 3, *PROBE))
    assert tuple(out.shape) == out_shape
    assert torch.isfinite(out).all()
