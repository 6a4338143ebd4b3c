"""Spec -> real smp model with verified weights (SPEC section 3).

Every smp architecture is built with the timm test encoder, saved, loaded back
through `load_model`, and must give exactly the saved model's outputs. Every
accepted weights format is checked the same way on one architecture.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import segmentation_models_pytorch as smp
import torch
from safetensors.torch import save_file
from torch import nn

from legitseg.errors import EXIT_INTEGRITY, ManifestError, WeightsError
from legitseg.manifest.spec import ModelSpec
from legitseg.models.factory import SeverityClassifier, build_module, load_model, resolve_normalize
from legitseg.models.weights import hashed_file, sha256_file
from tests.conftest import TINY

ARCHITECTURES = [a.__name__ for a in smp._MODEL_ARCHITECTURES]
# PAN's pyramid pools the deepest feature map down to 1/8 of its size: 64 px is too small.
INPUT_SIZE = {"PAN": 128}
# DPT's default decoder (30M parameters, made for ViT encoders) is slimmed to keep the suite
# fast; 'ignore' because a CNN encoder has no cls token to read out (smp warns otherwise).
ARCH_PARAMS = {"DPT": {"decoder_readout": "ignore", "decoder_intermediate_channels": [16, 32, 64, 64],
                       "decoder_fusion_channels": 32}}


def make_spec(weights: Path, **fields) -> ModelSpec:
    fields.setdefault("task", "segmentation")
    if fields["task"] == "segmentation":
        fields.setdefault("arch", "Unet")
    fields.setdefault("encoder", TINY)
    fields.setdefault("input_size", (64, 64))
    sha = sha256_file(hashed_file(weights)) if hashed_file(weights).exists() else "0" * 64
    return ModelSpec(name="m", weights=weights, sha256=sha, **fields)


def trained(spec: ModelSpec, seed: int = 0) -> nn.Module:
    """A model whose every tensor differs from a fresh build, so a tensor that is not loaded shows."""
    torch.manual_seed(seed)
    module = build_module(spec)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.mul_(torch.empty_like(t).uniform_(0.5, 1.5))
            else:
                t.add_(0.05 * torch.randn_like(t))
    return module.eval()


def outputs(module: nn.Module, size: tuple[int, int], in_channels: int = 3) -> torch.Tensor:
    x = torch.randn(2, in_channels, *size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        return module(x)


def assert_round_trip(saved: nn.Module, spec: ModelSpec) -> None:
    """load_model(spec) gives the saved model: every tensor, and the outputs, exactly."""
    loaded = load_model(spec)
    assert not loaded.module.training
    got_state, saved_state = loaded.module.state_dict(), saved.state_dict()
    assert list(got_state) == list(saved_state)
    for key, value in saved_state.items():
        assert torch.equal(got_state[key], value), key
    size = spec.input_size
    expected, got = outputs(saved, size, spec.in_channels), outputs(loaded.module, size, spec.in_channels)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """These models are tiny: on a shared 2-core machine, intra-op threads cost more than they save."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- every architecture ---------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_smp_architecture_builds_and_loads_safetensors(arch, tmp_path):
    size = INPUT_SIZE.get(arch, 64)
    path = tmp_path / f"{arch}.safetensors"
    fields = {"arch": arch, "classes": 2, "input_size": (size, size), "arch_params": ARCH_PARAMS.get(arch, {})}
    saved = trained(make_spec(path, **fields))
    assert type(saved).__name__ == arch
    save_file({k: v.contiguous() for k, v in saved.state_dict().items()}, str(path))
    assert_round_trip(saved, make_spec(path, **fields))
    assert outputs(saved, (size, size)).shape == (2, 2, size, size)


def test_architecture_names_are_case_insensitive(tmp_path):
    spec = make_spec(tmp_path / "w.safetensors", arch="deeplabv3PLUS")
    assert spec.arch == "DeepLabV3Plus"
    assert type(build_module(spec)) is smp.DeepLabV3Plus


# -- every weights format ---------------------------------------------------------------
class _Lightning(nn.Module):
    """What a LightningModule holding the network as `self.model` saves: keys `model.*`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model


def _prefixed(state: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in state.items()}


# name -> (file suffix, what torch.save writes for a module); "safetensors" and
# "save_pretrained" are written by their own libraries.
PICKLED_FORMATS = {
    "bare state_dict .pt": (".pt", lambda m: m.state_dict()),
    "bare state_dict .pth": (".pth", lambda m: m.state_dict()),
    "bare state_dict .ckpt": (".ckpt", lambda m: m.state_dict()),
    "bare state_dict .bin": (".bin", lambda m: m.state_dict()),
    "upper-case suffix .PTH": (".PTH", lambda m: m.state_dict()),
    "nested under state_dict": (".ckpt", lambda m: {"state_dict": m.state_dict(), "epoch": 7}),
    "nested under model_state_dict": (".pth", lambda m: {
        "model_state_dict": m.state_dict(), "epoch": 7, "best_dice": 0.81,
        "optimizer_state_dict": torch.optim.SGD(m.parameters(), lr=0.1).state_dict()}),
    "nested under model": (".pt", lambda m: {"model": m.state_dict(), "args": {"lr": 1e-3}}),
    "prefix module. (DataParallel)": (".pt", lambda m: nn.DataParallel(m).state_dict()),
    "prefix model. (Lightning)": (".ckpt", lambda m: {"state_dict": _Lightning(m).state_dict(), "global_step": 9}),
    # torch.compile(m).state_dict() gives these keys; compiling costs ~15 s here, so written directly.
    "prefix _orig_mod. (torch.compile)": (".pt", lambda m: _prefixed(m.state_dict(), "_orig_mod.")),
    "prefixes module._orig_mod.": (".pt", lambda m: _prefixed(m.state_dict(), "module._orig_mod.")),
}


FORMAT_CASES = [
    *(("segmentation", fmt) for fmt in [*PICKLED_FORMATS, "safetensors", "save_pretrained"]),
    # The classifier's keys (encoder.*, classification_head.*) through the common wrappers.
    *(("severity", fmt) for fmt in ["safetensors", "nested under model_state_dict", "prefix model. (Lightning)"]),
]


@pytest.mark.parametrize(("task", "fmt"), FORMAT_CASES)
def test_every_weights_format_loads_to_the_same_outputs(task, fmt, tmp_path):
    fields = {"task": task, "classes": 3}
    if fmt == "safetensors":
        path = tmp_path / "w.safetensors"
    elif fmt == "save_pretrained":
        path = tmp_path / "pretrained"
    else:
        path = tmp_path / f"w{PICKLED_FORMATS[fmt][0]}"
    saved = trained(make_spec(path, **fields))
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in saved.state_dict().items()}, str(path))
    elif fmt == "save_pretrained":
        saved.save_pretrained(str(path))
        assert (path / "model.safetensors").is_file() and (path / "config.json").is_file()
    else:
        torch.save(PICKLED_FORMATS[fmt][1](saved), path)
    assert_round_trip(saved, make_spec(path, **fields))


def test_save_pretrained_folder_with_arch_params_round_trips(tmp_path):
    path = tmp_path / "pretrained"
    fields = {"arch": "FPN", "classes": 2, "arch_params": {"decoder_segmentation_channels": 64}}
    saved = trained(make_spec(path, **fields))
    saved.save_pretrained(str(path))
    assert_round_trip(saved, make_spec(path, **fields))


@pytest.mark.parametrize(("edit", "manifest_fields", "expected"), [
    (None, {"arch": "FPN"}, "_model_class: manifest 'FPN', config.json 'Unet'"),
    (None, {"classes": 3}, "classes: manifest 3, config.json 2"),
    (None, {"encoder": "resnet18"}, f"encoder_name: manifest 'resnet18', config.json '{TINY}'"),
    (None, {"arch_params": {"decoder_channels": [128, 64, 32, 16, 8]}},
     "decoder_channels: manifest [128, 64, 32, 16, 8], config.json [256, 128, 64, 32, 16]"),
    ({"in_channels": 1}, {}, "in_channels: manifest 3, config.json 1"),
])
def test_save_pretrained_config_must_agree_with_the_manifest(tmp_path, edit, manifest_fields, expected):
    path = tmp_path / "pretrained"
    trained(make_spec(path, classes=2)).save_pretrained(str(path))
    if edit:
        cfg = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**cfg, **edit}))
    with pytest.raises(WeightsError) as err:
        load_model(make_spec(path, **{"classes": 2, **manifest_fields}))
    assert err.value.exit_code == EXIT_INTEGRITY
    assert "config.json disagrees with the manifest" in str(err.value)
    assert expected in str(err.value)


def test_save_pretrained_folder_without_config_is_refused(tmp_path):
    path = tmp_path / "pretrained"
    trained(make_spec(path)).save_pretrained(str(path))
    (path / "config.json").unlink()
    with pytest.raises(WeightsError, match="has no config.json"):
        load_model(make_spec(path))


def test_severity_model_from_a_folder_is_refused(tmp_path):
    folder = tmp_path / "classifier"
    folder.mkdir()
    spec = make_spec(folder / "x.safetensors", task="severity", classes=3)
    save_file({k: v.contiguous() for k, v in build_module(spec).state_dict().items()},
              str(folder / "model.safetensors"))
    (folder / "config.json").write_text("{}")
    with pytest.raises(WeightsError, match="save_pretrained folders hold segmentation models"):
        load_model(make_spec(folder, task="severity", classes=3))


# -- severity classifier --------------------------------------------------------------
@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_severity_model_is_encoder_plus_smp_classification_head(tmp_path, pooling):
    module = build_module(make_spec(tmp_path / "w.pt", task="severity", classes=5, pooling=pooling))
    assert isinstance(module, SeverityClassifier)
    linear = module.classification_head[3]
    assert (linear.in_features, linear.out_features) == (module.encoder.out_channels[-1], 5)
    pool = module.classification_head[0]
    assert isinstance(pool, nn.AdaptiveAvgPool2d if pooling == "avg" else nn.AdaptiveMaxPool2d)
    assert {k.split(".")[0] for k in module.state_dict()} == {"encoder", "classification_head"}
    # The same key names smp uses for a segmentation model's aux_params head.
    seg = smp.Unet(TINY, encoder_weights=None, aux_params={"classes": 5, "pooling": pooling, "dropout": 0})
    assert {k for k in module.state_dict() if k.startswith("classification_head")} == {
        k for k in seg.state_dict() if k.startswith("classification_head")}
    assert outputs(module.eval(), (64, 64)).shape == (2, 5)


def test_one_channel_model_builds_and_loads(tmp_path):
    path = tmp_path / "w.safetensors"
    spec = make_spec(path, in_channels=1, classes=2)
    saved = trained(spec)
    save_file({k: v.contiguous() for k, v in saved.state_dict().items()}, str(path))
    assert_round_trip(saved, make_spec(path, in_channels=1, classes=2))


# -- normalisation comes from local settings -----------------------------------------------
@pytest.mark.parametrize(("fields", "mean", "std"), [
    ({"normalize": {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]}}, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6)),
    ({"encoder": "resnet18"}, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ({"encoder": "efficientnet-b2"}, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ({"encoder": "mit_b0"}, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ({"encoder": TINY}, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # timm's pretrained_cfg for test_resnet
    ({"encoder": "tu-resnet18"}, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ({"encoder": "resnet18", "in_channels": 1}, (0.449,), (0.226,)),
])
def test_resolve_normalize_without_a_hub(tmp_path, fields, mean, std, no_network):
    got_mean, got_std = resolve_normalize(make_spec(tmp_path / "w.pt", **fields))
    assert got_mean == pytest.approx(mean, abs=1e-3)
    assert got_std == pytest.approx(std, abs=1e-3)


# -- factory refusals ---------------------------------------------------------------
@pytest.mark.parametrize(("encoder", "expected"), [
    ("tu-resnet51", "field 'encoder': unknown timm model 'resnet51' in 'tu-resnet51'; similar: "),
    ("tu-resnet18.no_such_tag", "smp cannot build Unet + tu-resnet18.no_such_tag"),
])
def test_unknown_timm_encoder_is_a_manifest_error(tmp_path, encoder, expected):
    with pytest.raises(ManifestError) as err:
        build_module(make_spec(tmp_path / "w.pt", encoder=encoder))
    assert err.value.exit_code == EXIT_INTEGRITY
    assert expected in str(err.value)
    if "similar" in expected:
        assert "resnet50" in str(err.value).split("similar: ")[1]


def test_arch_params_smp_rejects_is_a_manifest_error(tmp_path):
    spec = make_spec(tmp_path / "w.pt", arch="Unet", arch_params={"decoder_chanels": [16, 8, 8, 8, 8]})
    with pytest.raises(ManifestError, match=r"smp cannot build Unet \+ tu-test_resnet.r160_in1k.*decoder_chanels"):
        build_module(spec)


# -- no network ---------------------------------------------------------------------
@pytest.fixture
def no_network(monkeypatch):
    """Fail the test if anything tries to reach a hub or open a socket (a guard, not a mock of smp)."""
    import huggingface_hub
    import huggingface_hub.file_download
    import segmentation_models_pytorch.base.hub_mixin
    import segmentation_models_pytorch.encoders
    import timm.models._builder
    import timm.models._hub
    import torch.hub

    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError(f"network access attempted: {args!r}")

    targets = [
        (huggingface_hub, "hf_hub_download"),
        (huggingface_hub.file_download, "hf_hub_download"),
        (segmentation_models_pytorch.encoders, "hf_hub_download"),
        (segmentation_models_pytorch.encoders, "load_url"),
        (segmentation_models_pytorch.base.hub_mixin, "hf_hub_download"),
        (timm.models._builder, "load_state_dict_from_url"),
        (timm.models._builder, "load_state_dict_from_hf"),
        (timm.models._builder, "download_cached_file"),
        (timm.models._hub, "hf_hub_download"),
        (torch.hub, "load_state_dict_from_url"),
        (torch.hub, "download_url_to_file"),
        (socket.socket, "connect"),
        (socket, "create_connection"),
        (socket, "getaddrinfo"),
    ]
    for owner, attr in targets:
        monkeypatch.setattr(owner, attr, refuse)  # raising=True: a renamed target fails loudly
    yield calls
    assert calls == []


@pytest.mark.parametrize("fields", [
    {"arch": "Unet", "encoder": TINY},
    {"arch": "FPN", "encoder": "resnet18"},
    {"task": "severity", "encoder": "efficientnet-b0", "classes": 4},
])
def test_models_build_and_load_with_the_network_refused(tmp_path, fields, no_network):
    path = tmp_path / "w.safetensors"
    saved = trained(make_spec(path, **fields))
    save_file({k: v.contiguous() for k, v in saved.state_dict().items()}, str(path))
    loaded = load_model(make_spec(path, **fields))
    assert loaded.parameters == sum(p.numel() for p in saved.parameters())


# -- the production models (PR-001) -------------------------------------------------------
PRODUCTION = {
    "erythema_b1": {"arch": "DeepLabV3Plus", "encoder": "efficientnet-b1", "classes": 1},
    "erythema_b2": {"arch": "DeepLabV3Plus", "encoder": "efficientnet-b2", "classes": 1},
    "lesion_r101": {"arch": "Unet", "encoder": "resnet101", "classes": 3},
    "severity_b2": {"task": "severity", "encoder": "efficientnet-b2", "classes": 10},
}
PR001_SECONDS = 30.0

# Runs in a fresh interpreter so that the time includes importing torch, smp and timm.
# Sockets are refused before anything is imported; HF_HUB_OFFLINE=1 as always.
COLD_START = """
import json, socket, sys, time
started = time.perf_counter()
def refuse(*a, **k):
    raise OSError("network access attempted")
socket.socket.connect = socket.create_connection = socket.getaddrinfo = refuse
import torch
from legitseg.models.factory import load_model
from legitseg.manifest.spec import load_manifest
report = {"import_s": time.perf_counter() - started, "models": {}}
for spec in load_manifest(sys.argv[1]).models.values():
    loaded = load_model(spec)
    m = loaded.module
    with torch.inference_mode():
        shape = list(m(torch.zeros(1, 3, 64, 64)).shape)
    head = m.classification_head[3] if spec.task == "severity" else None
    report["models"][spec.name] = {
        "seconds": loaded.build_seconds, "class": type(m).__name__, "parameters": loaded.parameters,
        "weight_mb": loaded.weight_bytes / 1e6, "output": shape,
        "encoder_out": m.encoder.out_channels[-1], "head_in": head and head.in_features,
        "head_out": head and head.out_features}
print(json.dumps(report))
"""


@pytest.mark.slow
def test_production_models_build_from_a_manifest_offline_and_fast(kit, capsys):
    """PR-001 evidence; the printed table is what docs/model-build-times.md records."""
    for name, fields in PRODUCTION.items():
        kit.add(name, input_size=[384, 384], **fields)
    r = subprocess.run([sys.executable, "-c", COLD_START, str(kit.write())], capture_output=True,
                       text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert list(report["models"]) == list(PRODUCTION)
    lines = [f"fresh process: import torch + legitseg.models.factory {report['import_s']:.2f} s, then load_model "
             "(sha256 + parse + build + strict load):"]
    for name, fields in PRODUCTION.items():
        got = report["models"][name]
        # PR-001: from a cold interpreter to this model ready, with the network refused.
        assert report["import_s"] + got["seconds"] < PR001_SECONDS, (name, report["import_s"], got)
        if fields.get("task") == "severity":
            assert got["class"] == "SeverityClassifier"
            assert got["head_in"] == got["encoder_out"]
            assert got["head_out"] == 10 and got["output"] == [1, 10]
        else:
            assert got["class"] == fields["arch"]
            assert got["output"] == [1, fields["classes"], 64, 64]
        lines.append(f"  {name:12s} {fields.get('arch', 'severity'):14s} {fields['encoder']:16s} "
                     f"{got['parameters']:>11,} params {got['weight_mb']:6.1f} MB {got['seconds']:6.2f} s")
    with capsys.disabled():
        print("\n" + "\n".join(lines))


# -- HF_HUB_OFFLINE is set in one place --------------------------------------------------------
def test_hf_hub_offline_is_set_in_exactly_one_place():
    package = Path(__file__).resolve().parent.parent / "legitseg"
    setters = sorted(str(p.relative_to(package)) for p in package.rglob("*.py")
                     if 'os.environ["HF_HUB_OFFLINE"]' in p.read_text() or "HF_HUB_OFFLINE\", " in p.read_text())
    assert setters == ["__init__.py"]


def test_importing_the_factory_alone_turns_the_hub_off():
    # A fresh interpreter without HF_HUB_OFFLINE: importing legitseg.models.factory runs
    # legitseg/__init__ first, so huggingface_hub reads the variable already set.
    code = ("import legitseg.models.factory, huggingface_hub.constants as c, os; "
            "print(os.environ['HF_HUB_OFFLINE'], c.HF_HUB_OFFLINE)")
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "True"]


def test_normalize_never_asks_smp_for_preprocessing_params(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("get_preprocessing_params reaches a hub")

    monkeypatch.setattr(smp.encoders, "get_preprocessing_params", refuse)
    for encoder in ("resnet18", "efficientnet-b2", TINY):
        mean, std = resolve_normalize(make_spec(tmp_path / "w.pt", encoder=encoder))
        assert len(mean) == len(std) == 3


# -- stretch input sizes the architecture cannot take -----------------------------------------
def saved_spec(tmp_path: Path, **fields) -> ModelSpec:
    path = tmp_path / "w.safetensors"
    module = trained(make_spec(path, **fields))
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path))
    return make_spec(path, **fields)


@pytest.mark.parametrize(("fields", "stride", "choices"), [
    ({"arch": "FPN", "input_size": (100, 100)}, 32, "[96, 96] or [128, 128]"),
    ({"arch": "DeepLabV3Plus", "input_size": (100, 64)}, 16, "[96, 64] or [112, 64]"),
    ({"arch": "FPN", "input_size": (8, 64)}, 32, "[32, 64]"),
], ids=["FPN 100x100", "DeepLabV3Plus 100x64", "smaller than the stride"])
def test_stretch_size_off_the_stride_is_refused_at_load(tmp_path, fields, stride, choices):
    spec = saved_spec(tmp_path, **fields)
    # The real module refuses that shape too: the check says what smp would say per image.
    module = build_module(spec).eval()
    with pytest.raises(RuntimeError, match="divisible by"), torch.inference_mode():
        module(torch.zeros(1, 3, *spec.input_size))
    with pytest.raises(ManifestError) as err:
        load_model(spec)
    assert err.value.exit_code == EXIT_INTEGRITY
    assert str(err.value) == (
        f"model 'm', field 'input_size': {list(spec.input_size)} is not divisible by {stride}, the output "
        f"stride of {spec.arch} + {TINY}; with resize 'stretch' the model is fed exactly this size, so "
        f"height and width must be multiples of {stride}: nearest valid sizes {choices}")


@pytest.mark.parametrize("fields", [
    {"arch": "Unet", "input_size": (100, 100)},  # smp's Unet decoder resizes to each skip: any size
    {"task": "severity", "classes": 3, "input_size": (100, 100)},  # global pooling: any size
    {"arch": "FPN", "resize": "pad", "input_size": (100, 100)},  # padded to the stride at run time
], ids=["Unet", "severity", "pad"])
def test_sizes_a_model_takes_are_not_refused(tmp_path, fields):
    spec = saved_spec(tmp_path, **fields)
    loaded = load_model(spec)
    h, w = spec.input_size
    if spec.resize == "pad":
        h, w = h + (-h) % loaded.stride, w + (-w) % loaded.stride
    with torch.inference_mode():
        y = loaded.module(torch.zeros(1, 3, h, w))
    assert tuple(y.shape) == ((1, 3) if spec.task == "severity" else (1, 1, h, w))


# -- ignore_keys: weights trained with smp's aux_params ------------------------------------------
@pytest.fixture(scope="module")
def aux_model(tmp_path_factory):
    """A real smp Unet trained with aux_params (a classification head beside the mask), saved."""
    torch.manual_seed(5)
    module = smp.create_model("Unet", encoder_name=TINY, encoder_weights=None, classes=1,
                              aux_params={"classes": 4}).eval()
    path = tmp_path_factory.mktemp("aux") / "aux.safetensors"
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path))
    return module, path


def test_aux_params_weights_load_for_segmentation_with_ignore_keys(aux_model):
    module, path = aux_model
    with pytest.raises(WeightsError, match="unexpected: classification_head.3.bias, classification_head.3.weight"):
        load_model(make_spec(path))
    loaded = load_model(make_spec(path, ignore_keys=("classification_head.*",)))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        mask, _ = module(x)
        assert torch.equal(loaded.module(x), mask)


def test_aux_params_weights_load_as_a_severity_model_with_ignore_keys(aux_model):
    module, path = aux_model
    spec = make_spec(path, task="severity", classes=4, ignore_keys=("decoder.*", "segmentation_head.*"))
    loaded = load_model(spec)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        _, label = module(x)
        assert torch.equal(loaded.module(x), label)


@pytest.mark.parametrize(("patterns", "expected"), [
    (("classification_hed.*",), "'classification_hed.*' matches no key of {path} that the model lacks "
                                "(keys the model lacks: classification_head.3.bias, classification_head.3.weight)"),
    # Keys the model has are never dropped, so a pattern matching only those is a mistake too.
    (("classification_head.*", "encoder.*"), "'encoder.*' matches no key of {path} that the model lacks"),
])
def test_an_ignore_keys_pattern_that_matches_nothing_is_a_manifest_error(aux_model, patterns, expected):
    _, path = aux_model
    with pytest.raises(ManifestError) as err:
        load_model(make_spec(path, ignore_keys=patterns))
    assert err.value.exit_code == EXIT_INTEGRITY
    assert str(err.value).startswith("model 'm', field 'ignore_keys': " + expected.format(path=path))
