"""`legitseg models list|check|hash` and `legitseg info` (SPEC section 6).

Every refusal of a manifest or weights file is asserted on both the exit code
(3) and the message. Most tests use typer's CliRunner; a few run a real process.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from legitseg.cli import app
from legitseg.errors import EXIT_INTEGRITY, EXIT_OK, EXIT_USAGE
from legitseg.manifest.smp_names import ARCHITECTURES
from tests.conftest import TINY, ModelKit, run_cli


def invoke(*args: str, env: dict | None = None):
    # Wide enough that rich never folds a long problem message inside a table cell.
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "4000", **(env or {})})


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, dict]:
    """Tiny real models saved once for the module: manifest entries with absolute weights paths."""
    kit = ModelKit(tmp_path_factory.mktemp("kit"))
    kit.add("lesion")
    kit.add("grade", task="severity", classes=3, fmt="pt")
    kit.add("scse", arch_params={"decoder_attention_type": "scse"})
    kit.add("pretrained", fmt="pretrained")
    kit.add("fpn", arch="FPN")
    return {name: {**entry, "weights": str(kit.root / entry["weights"])} for name, entry in kit.models.items()}


def write_manifest(folder: Path, models: dict[str, dict], name: str = "models.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump({"version": 1, "models": models}, sort_keys=False))
    return path


def tsv_rows(stdout: str) -> tuple[list[str], dict[str, list[str]]]:
    """Header and rows (by model name) of the tab-separated text printed when stdout is not a terminal."""
    lines = stdout.splitlines()
    rows = [line.split("\t") for line in lines[1:]]
    assert all(len(r) == len(lines[0].split("\t")) for r in rows), stdout
    return lines[0].split("\t"), {r[0]: r for r in rows}


def edited(entry: dict, **changes) -> dict:
    """`entry` with fields changed; a value of None removes the field."""
    out = {**entry, **changes}
    return {k: v for k, v in out.items() if v is not None}


# -- manifest refusals: `models list`, exit 3 ------------------------------------------------
# (id, how the lesion entry changes, text expected after "<manifest>: ")
FIELD_REFUSALS = [
    ("unknown field", {"colour": "red"}, "model 'lesion', field 'colour': unknown field"),
    ("name inside a model", {"name": "other"}, "model 'lesion': field 'name': unknown field (the key is the name)"),
    ("classes wrong type", {"classes": "three"},
     "model 'lesion', field 'classes': Input should be a valid integer, unable to parse string as an integer"),
    ("classes negative", {"classes": -2}, "model 'lesion', field 'classes': Input should be greater than or equal to 1"),
    ("sha256 too short", {"sha256": "abc123"},
     "model 'lesion', field 'sha256': String should match pattern '^[0-9a-fA-F]{64}$'"),
    ("sha256 not hex", {"sha256": "g" * 64}, "model 'lesion', field 'sha256': String should match pattern"),
    ("unknown resize", {"resize": "crop"}, "model 'lesion', field 'resize': invalid value 'crop'; valid: 'stretch', 'pad', 'letterbox' or 'tile'"),
    ("unknown interpolation", {"interpolation": "lanczos"},
     "model 'lesion', field 'interpolation': invalid value 'lanczos'; valid: 'linear', 'area', 'cubic' or 'nearest'"),
    ("unknown task", {"task": "detection"},
     "model 'lesion', field 'task': invalid value 'detection'; valid: 'segmentation', 'severity' or 'quality'"),
    ("in_channels 4", {"in_channels": 4}, "model 'lesion', field 'in_channels': invalid value 4; valid: 1 or 3"),
    ("threshold 1.5", {"threshold": 1.5}, "model 'lesion', field 'threshold': Input should be less than 1"),
    ("input_size one number", {"input_size": [512]}, "model 'lesion', field 'input_size.1': Field required"),
    ("input_size too small", {"input_size": [4, 64]},
     "model 'lesion', field 'input_size.0': Input should be greater than or equal to 8"),
    ("bad model name", {}, "model 'Lesion!', field 'name': model name 'Lesion!' must match [a-z0-9_-]+"),
    ("unknown arch", {"arch": "Unet3"},
     "model 'lesion', field 'arch': unknown architecture 'Unet3'; valid: " + ", ".join(ARCHITECTURES)),
    ("segmentation without arch", {"arch": None},
     "model 'lesion': 'arch' is required for segmentation models; valid: " + ", ".join(ARCHITECTURES)),
    ("unknown smp encoder", {"encoder": "resnet19"},
     "model 'lesion', field 'encoder': unknown encoder 'resnet19'; similar: resnet18"),
    ("missing weights file", {"weights": "weights/absent.safetensors"}, "model 'lesion': weights file not found: "),
    ("arch_params.encoder_weights", {"arch_params": {"encoder_weights": "imagenet"}},
     "model 'lesion', field 'arch_params': arch_params.encoder_weights is not allowed: "
     "it would make smp download pretrained weights; legitseg only loads local weights"),
    ("arch_params.classes", {"arch_params": {"classes": 3}},
     "model 'lesion', field 'arch_params': arch_params.classes is not allowed: it is set by the manifest field 'classes'"),
    ("arch_params.in_channels", {"arch_params": {"in_channels": 1}},
     "model 'lesion', field 'arch_params': arch_params.in_channels is not allowed: it is set by the manifest field 'in_channels'"),
    ("arch_params.encoder_name", {"arch_params": {"encoder_name": "resnet18"}},
     "model 'lesion', field 'arch_params': arch_params.encoder_name is not allowed: it is set by the manifest field 'encoder'"),
    ("arch_params.activation", {"arch_params": {"activation": "sigmoid"}},
     "model 'lesion', field 'arch_params': arch_params.activation is not allowed: "
     "legitseg applies the activation itself (sigmoid or softmax after resizing)"),
    ("arch_params.aux_params", {"arch_params": {"aux_params": {"classes": 2}}},
     "model 'lesion', field 'arch_params': arch_params.aux_params is not allowed: "
     "legitseg reads only the mask output; to load weights trained with aux_params, "
     "set ignore_keys: ['classification_head.*']"),
    ("severity field on segmentation", {"temperature": 2.0},
     "model 'lesion': field(s) temperature only apply to task 'severity'"),
    ("threshold on multi-class", {"classes": 3, "threshold": 0.3},
     "model 'lesion': 'threshold' only applies to binary models (classes: 1); multi-class masks use argmax"),
    ("labels wrong length", {"labels": ["background", "a", "b"]},
     "model 'lesion': labels has 3 names but this model has 2 (class 0 is background)"),
    ("stretch without input_size", {"input_size": None},
     "model 'lesion': 'input_size' [height, width] is required when resize is 'stretch'"),
    ("normalize channels", {"normalize": {"mean": [0.5], "std": [0.2]}},
     "model 'lesion': normalize has 1 channels but in_channels is 3"),
    ("normalize std zero", {"normalize": {"mean": [0.5, 0.5, 0.5], "std": [0.2, 0, 0.2]}},
     "model 'lesion', field 'normalize': std values must be > 0, got [0.2, 0.0, 0.2]"),
    ("normalize unequal", {"normalize": {"mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2]}},
     "model 'lesion', field 'normalize': mean has 3 values but std has 2"),
]
SEVERITY_REFUSALS = [
    ("segmentation field on severity", {"arch": "Unet", "threshold": 0.4},
     "model 'grade': field(s) arch, threshold only apply to task 'segmentation'"),
    ("severity with one class", {"classes": 1}, "model 'grade': severity models need classes >= 2"),
    ("class_values wrong length", {"class_values": [0, 1]}, "model 'grade': class_values has 2 values but classes is 3"),
    ("unknown pooling", {"pooling": "gem"}, "model 'grade', field 'pooling': invalid value 'gem'; valid: 'avg' or 'max'"),
    ("temperature zero", {"temperature": 0}, "model 'grade', field 'temperature': Input should be greater than 0"),
]


@pytest.mark.parametrize(("changes", "expected"), [
    pytest.param(*c[1:], id=c[0], marks=()) for c in FIELD_REFUSALS])
def test_models_list_refuses_bad_fields(tmp_path, weights, changes, expected):
    name = "Lesion!" if "'Lesion!'" in expected else "lesion"
    path = write_manifest(tmp_path, {name: edited(weights["lesion"], **changes)})
    r = invoke("models", "list", "-m", path)
    assert r.exit_code == EXIT_INTEGRITY
    assert f"legitseg: error: {path}: {expected}" in r.stderr
    assert r.stdout == ""


@pytest.mark.parametrize(("changes", "expected"), [c[1:] for c in SEVERITY_REFUSALS],
                         ids=[c[0] for c in SEVERITY_REFUSALS])
def test_models_list_refuses_bad_severity_fields(tmp_path, weights, changes, expected):
    path = write_manifest(tmp_path, {"grade": edited(weights["grade"], **changes)})
    r = invoke("models", "list", "-m", path)
    assert r.exit_code == EXIT_INTEGRITY
    assert f"legitseg: error: {path}: {expected}" in r.stderr


def _lesion_text(weights: dict) -> str:
    return yaml.safe_dump({"version": 1, "models": {"lesion": weights["lesion"]}}, sort_keys=False)


def test_models_list_refuses_a_python_yaml_tag_without_running_it(tmp_path, weights):
    marker = tmp_path / "MARKER"
    text = _lesion_text(weights).replace("classes: 1", f"classes: !!python/object/apply:os.system ['touch {marker}']")
    path = tmp_path / "models.yaml"
    path.write_text(text)
    r = invoke("models", "list", "-m", path)
    assert r.exit_code == EXIT_INTEGRITY
    assert (f"legitseg: error: {path}: unsupported YAML tag at line 6 (could not determine a constructor "
            "for the tag 'tag:yaml.org,2002:python/object/apply:os.system'); manifests are plain YAML, "
            "Python tags are refused") in r.stderr
    assert not marker.exists()
    # Control: an unsafe loader would have run it.
    yaml.unsafe_load(text)
    assert marker.exists()


@pytest.mark.parametrize(("edit", "expected"), [
    (lambda t: t + "  lesion:\n    task: severity\n", "duplicate model name 'lesion' at line "),
    (lambda t: t.replace("classes: 1", "classes: 1\n    classes: 2"),
     "model 'lesion': duplicate field 'classes' at line 7 (first at line 6)"),
    (lambda t: t + "version: 1\n", "duplicate top-level key 'version' at line "),
    (lambda t: t + "sha256: " + "0" * 64 + "\n", "field 'sha256': unknown field; valid top-level fields: version, models"),
    (lambda t: t.replace("version: 1", "version: 2"), "field 'version': invalid value 2; valid: 1"),
    (lambda t: "version: 1\nmodels: {}\n", "'models' is empty"),
    (lambda t: "- version: 1\n", "expected a mapping with 'version' and 'models', got list"),
    (lambda t: t.replace("classes: 1", "classes: [1"), "not valid YAML: "),
    (lambda t: t.replace("classes: 1", "classes: !!python/name:os.system ''"), "unsupported YAML tag at line 6"),
], ids=["duplicate model", "duplicate field", "duplicate top-level key", "unknown top-level field",
        "version 2", "no models", "not a mapping", "YAML syntax", "python/name tag"])
def test_models_list_refuses_bad_yaml(tmp_path, weights, edit, expected):
    path = tmp_path / "models.yaml"
    path.write_text(edit(_lesion_text(weights)))
    r = invoke("models", "list", "-m", path)
    assert r.exit_code == EXIT_INTEGRITY
    assert f"legitseg: error: {path}: {expected}" in r.stderr


def test_missing_manifest_exits_3(tmp_path):
    r = invoke("models", "list", "-m", tmp_path / "nope.yaml")
    assert r.exit_code == EXIT_INTEGRITY
    assert f"{tmp_path / 'nope.yaml'}: manifest not found (use -m or $LEGITSEG_MANIFEST)" in r.stderr


def test_refusal_from_a_real_process(tmp_path, weights):
    path = tmp_path / "models.yaml"
    path.write_text(_lesion_text(weights).replace("classes: 1", "classes: 1\n    classes: 2"))
    r = run_cli("models", "list", "-m", str(path))
    assert r.returncode == EXIT_INTEGRITY
    assert r.stderr.strip() == (f"legitseg: error: {path}: model 'lesion': duplicate field 'classes' "
                                "at line 7 (first at line 6)")
    assert "Traceback" not in r.stderr and r.stdout == ""


@pytest.mark.parametrize("command", ["list", "check"])
def test_nan_in_a_manifest_exits_3_naming_model_and_field(tmp_path, weights, command):
    text = _lesion_text(weights) + "    normalize: {mean: [0.5, 0.5, .nan], std: [0.2, 0.2, 0.2]}\n"
    path = tmp_path / "models.yaml"
    path.write_text(text)
    r = invoke("models", command, "-m", path)
    assert r.exit_code == EXIT_INTEGRITY
    assert r.stderr == (f"legitseg: error: {path}: model 'lesion', field 'normalize.mean.2': nan is not a "
                        "finite number; NaN and infinity are refused\n")


def test_an_alias_bomb_exits_3_at_once(tmp_path, weights):
    levels = ["      a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"] + [
        f"      a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    path = tmp_path / "models.yaml"
    path.write_text(_lesion_text(weights) + "    arch_params:\n" + "\n".join(levels) + "\n")
    r = invoke("models", "check", "-m", path)
    assert r.exit_code == EXIT_INTEGRITY
    assert "expands to more than 100000 values through aliases (*name)" in r.stderr
    assert "refused as an alias bomb" in r.stderr and len(r.stderr) < 500


# -- weights refusals: `models check`, exit 3 ------------------------------------------------
def _check_fails(tmp_path: Path, models: dict[str, dict], name: str = "lesion") -> str:
    """Run `models check`, assert exit 3 and return the problem cell of model `name`."""
    path = write_manifest(tmp_path, models)
    r = invoke("models", "check", "-m", path)
    assert r.exit_code == EXIT_INTEGRITY, r.output
    assert f"1 of {len(models)} model(s) failed the check" in r.stderr
    header, rows = tsv_rows(r.stdout)
    assert rows[name][1] == "FAILED"
    # Each failure's message is also one plain, unfolded line on stderr.
    line = next(x for x in r.stderr.splitlines() if x.startswith(f"legitseg: FAILED {name}: "))
    problem = line.removeprefix(f"legitseg: FAILED {name}: ")
    assert rows[name][header.index("error")] == problem
    return problem


def test_check_refuses_a_sha256_mismatch(tmp_path, weights):
    problem = _check_fails(tmp_path, {"lesion": edited(weights["lesion"], sha256="ab" * 32)})
    actual = hashlib.sha256(Path(weights["lesion"]["weights"]).read_bytes()).hexdigest()
    assert problem == (f"model 'lesion': sha256 mismatch for {weights['lesion']['weights']}: "
                       f"manifest pins {'ab' * 32}, file has {actual}. Refusing to load it.")


def test_check_refuses_misshaped_tensors(tmp_path, weights):
    problem = _check_fails(tmp_path, {"lesion": edited(weights["lesion"], classes=3)})
    assert problem == (
        f"model 'lesion': weights {weights['lesion']['weights']} do not fit the manifest's model "
        "(check arch, encoder, classes, in_channels, arch_params): "
        "mis-shaped: segmentation_head.0.bias: file (1,) vs model (3,), "
        "segmentation_head.0.weight: file (1, 16, 3, 3) vs model (3, 16, 3, 3)")


def test_check_lists_missing_keys(tmp_path, weights):
    entry = edited(weights["lesion"], arch_params={"decoder_attention_type": "scse"})
    problem = _check_fails(tmp_path, {"lesion": entry})
    assert "do not fit the manifest's model" in problem
    assert "missing: decoder.blocks.0.attention1.attention.cSE.1.bias, " in problem
    assert re.search(r", \.\.\. \(\d+ in all\)$", problem)
    assert "unexpected" not in problem


def test_check_lists_unexpected_keys(tmp_path, weights):
    problem = _check_fails(tmp_path, {"lesion": edited(weights["scse"], arch_params=None)})
    assert "unexpected: decoder.blocks.0.attention1.attention.cSE.1.bias, " in problem
    assert "missing" not in problem


def test_check_refuses_another_encoders_weights(tmp_path, weights):
    problem = _check_fails(tmp_path, {"lesion": edited(weights["lesion"], encoder="resnet18")})
    assert "missing: encoder.bn1.bias, " in problem and "unexpected: encoder.model." in problem


def test_check_refuses_an_unsupported_suffix(tmp_path, weights):
    onnx = tmp_path / "lesion.onnx"
    onnx.write_bytes(Path(weights["lesion"]["weights"]).read_bytes())
    entry = edited(weights["lesion"], weights=str(onnx), sha256=hashlib.sha256(onnx.read_bytes()).hexdigest())
    problem = _check_fails(tmp_path, {"lesion": entry})
    assert problem == ("model 'lesion': unsupported weights format 'lesion.onnx'; accepted: .safetensors, "
                       ".pt/.pth/.ckpt/.bin (torch.save state_dict), or an smp save_pretrained folder")


def test_check_refuses_an_unknown_timm_encoder(tmp_path, weights):
    problem = _check_fails(tmp_path, {"lesion": edited(weights["lesion"], encoder="tu-test_resnett")})
    assert problem.startswith("model 'lesion': field 'encoder': unknown timm model 'test_resnett' in "
                              "'tu-test_resnett'; similar: test_resnet")


def test_check_refuses_a_save_pretrained_config_that_disagrees(tmp_path, weights):
    folder = tmp_path / "pretrained"
    src = Path(weights["pretrained"]["weights"])
    folder.mkdir()
    for f in ("model.safetensors", "config.json"):
        (folder / f).write_bytes((src / f).read_bytes())
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "classes": 2}))
    problem = _check_fails(tmp_path, {"lesion": edited(weights["pretrained"], weights=str(folder))})
    assert problem == (f"model 'lesion': {folder}/config.json disagrees with the manifest: "
                       "classes: manifest 1, config.json 2")


def test_check_reports_each_model_and_fails_if_one_fails(tmp_path, weights):
    models = {"lesion": weights["lesion"], "grade": edited(weights["grade"], classes=4)}
    problem = _check_fails(tmp_path, models, name="grade")
    assert "mis-shaped: classification_head.3.bias: file (3,) vs model (4,)" in problem


def test_check_unknown_model_name_is_a_usage_error(tmp_path, weights):
    path = write_manifest(tmp_path, {"lesion": weights["lesion"]})
    r = invoke("models", "check", "-m", path, "--models", "lesion,scaling")
    assert r.exit_code == EXIT_USAGE
    assert f"{path}: unknown model(s) scaling; the manifest has: lesion" in r.stderr


def test_a_stretch_size_off_the_stride_fails_check_and_run_before_out_exists(tmp_path, weights):
    from tests.images import picture, save

    path = write_manifest(tmp_path, {"fpn": edited(weights["fpn"], input_size=[100, 100])})
    expected = ("model 'fpn', field 'input_size': [100, 100] is not divisible by 32, the output stride of "
                f"FPN + {TINY}; with resize 'stretch' the model is fed exactly this size, so height and "
                "width must be multiples of 32: nearest valid sizes [96, 96] or [128, 128]")
    r = invoke("models", "check", "-m", path)
    assert r.exit_code == EXIT_INTEGRITY, r.output
    assert f"legitseg: FAILED fpn: {expected}\n" in r.stderr
    image = save(tmp_path / "in" / "a.png", picture(120, 90))
    out = tmp_path / "out"
    r = invoke("run", image, "-m", path, "-o", out)
    assert r.exit_code == EXIT_INTEGRITY, r.output
    assert expected in r.stderr
    assert not out.exists()


# -- models check / list when all is well -------------------------------------------------------
def test_check_prints_build_time_parameters_and_weight_memory(tmp_path, weights):
    from legitseg.manifest.spec import load_manifest
    from legitseg.models.factory import build_module

    path = write_manifest(tmp_path, {k: weights[k] for k in ("lesion", "grade", "pretrained")})
    r = invoke("models", "check", "-m", path)
    assert r.exit_code == EXIT_OK, r.output
    header, rows = tsv_rows(r.stdout)
    assert header == ["model", "result", "build_s", "parameters", "weights_mb", "output", "input_size", "resize",
                      "normalize", "threshold", "error"]
    manifest = load_manifest(path)
    for name, spec in manifest.models.items():
        module = build_module(spec)
        params = sum(p.numel() for p in module.parameters())
        mb = sum(t.numel() * t.element_size() for t in module.state_dict().values()) / 1e6
        cells = rows[name]
        assert cells[1] == "ok"
        assert 0 < float(cells[2]) < 30
        assert cells[3] == f"{params:,}"
        assert cells[4] == f"{mb:.1f}"
        want = "[1, 3] float32" if spec.task == "severity" else "[1, 1, 64, 64] float32"
        assert cells[5] == want
        # The tiny timm encoder's own mean/std, as resolved for the built model.
        assert cells[6:] == ["64x64", "stretch", "mean [0.5, 0.5, 0.5] std [0.5, 0.5, 0.5] (encoder default)",
                             "-" if spec.task == "severity" else "0.5", "-"]
    assert "FAILED" not in r.stderr


def test_list_shows_the_manifest_without_reading_weights(tmp_path, weights):
    pad = edited(weights["lesion"], resize="pad", input_size=None)
    path = write_manifest(tmp_path, {"lesion": weights["lesion"], "grade": weights["grade"], "pad": pad})
    r = invoke("models", "list", "-m", path)
    assert r.exit_code == EXIT_OK, r.output
    header, rows = tsv_rows(r.stdout)
    assert header == ["name", "task", "arch", "encoder", "classes", "input_size", "resize", "interpolation",
                      "normalize", "threshold", "weights", "sha256"]
    assert rows["lesion"] == ["lesion", "segmentation", "Unet", TINY, "1", "64x64", "stretch", "linear",
                              "encoder default", "0.5", weights["lesion"]["weights"], weights["lesion"]["sha256"]]
    assert rows["grade"][:10] == ["grade", "severity", "-", TINY, "3", "64x64", "stretch", "linear",
                                  "encoder default", "-"]
    assert rows["pad"][5:7] == ["native", "pad"]
    # One warning line per model whose normalize falls back to the encoder's default.
    warnings = [line for line in r.stderr.splitlines() if "no normalize in the manifest" in line]
    assert len(warnings) == 3 and all(" legitseg WARNING model '" in w for w in warnings)


def test_weights_beside_the_manifest_are_listed_relative(tmp_path, weights):
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "a.safetensors").write_bytes(Path(weights["lesion"]["weights"]).read_bytes())
    path = write_manifest(tmp_path, {"lesion": edited(weights["lesion"], weights="w/a.safetensors")})
    r = invoke("models", "list", "-m", path)
    assert tsv_rows(r.stdout)[1]["lesion"][10] == "w/a.safetensors"


@pytest.mark.parametrize("how", ["env", "cwd"])
def test_manifest_defaults_to_env_then_cwd(tmp_path, weights, monkeypatch, how):
    path = write_manifest(tmp_path, {"lesion": weights["lesion"]})
    monkeypatch.delenv("LEGITSEG_MANIFEST", raising=False)
    if how == "env":
        r = invoke("models", "list", env={"LEGITSEG_MANIFEST": str(path)})
    else:
        monkeypatch.chdir(tmp_path)
        r = invoke("models", "list")
    assert r.exit_code == EXIT_OK, r.output
    assert "lesion" in tsv_rows(r.stdout)[1]


# -- models hash ---------------------------------------------------------------------
def test_hash_prints_the_sha256_of_a_file(weights):
    file = Path(weights["grade"]["weights"])
    r = invoke("models", "hash", file)
    assert r.exit_code == EXIT_OK
    assert r.stdout == f"{hashlib.sha256(file.read_bytes()).hexdigest()}  {file}\n"
    assert r.stdout.split()[0] == weights["grade"]["sha256"]


def test_hash_of_a_save_pretrained_folder_is_that_of_its_model_safetensors(weights):
    folder = Path(weights["pretrained"]["weights"])
    r = invoke("models", "hash", folder)
    assert r.exit_code == EXIT_OK
    digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert r.stdout == f"{digest}  {folder / 'model.safetensors'}\n"


def test_hash_of_a_missing_file_is_a_usage_error(tmp_path):
    r = invoke("models", "hash", tmp_path / "absent.pt")
    assert r.exit_code == EXIT_USAGE
    assert f"cannot read {tmp_path / 'absent.pt'}: No such file or directory" in r.stderr


# -- info ------------------------------------------------------------------------------
def test_info_prints_versions_and_the_lock_status():
    from legitseg.provenance import lock_mismatches

    r = invoke("info")
    assert r.exit_code == EXIT_OK, r.output
    for key, dist in [("torch", "torch"), ("segmentation_models_pytorch", "segmentation-models-pytorch"),
                      ("timm", "timm"), ("opencv", "opencv-python-headless"), ("numpy", "numpy")]:
        assert re.search(rf"│ {key} +│ {re.escape(metadata.version(dist))} +│", r.stdout), key
    diffs = lock_mismatches()
    if diffs is None:
        assert "requirements_lock.txt not found" in r.stdout
    elif diffs:
        assert "differs" in r.stdout and all(d in r.stdout for d in diffs)
    else:
        assert "all installed versions match requirements_lock.txt" in r.stdout


def test_info_encoders_lists_smp_encoder_names():
    import segmentation_models_pytorch as smp

    r = invoke("info", "--encoders")
    assert r.exit_code == EXIT_OK
    names = set(r.stdout.splitlines())
    assert set(smp.encoders.encoders) <= names
    assert "(plus tu-<any timm model name>)" in names


# -- no torch for the light commands ---------------------------------------------------------
NO_TORCH = """
import sys
from typer.testing import CliRunner
from legitseg.cli import app
r = CliRunner().invoke(app, sys.argv[1:])
assert r.exit_code == 0, r.output
loaded = sorted(m for m in ("torch", "segmentation_models_pytorch", "timm") if m in sys.modules)
assert not loaded, f"{sys.argv[1:]} imported {loaded}"
print(r.output)
"""


@pytest.mark.parametrize("args", [
    ["--help"], ["--version"], ["models", "--help"], ["run", "--help"], ["models", "list"], ["models", "hash"],
    ["models", "list", "--json"],
], ids=lambda a: " ".join(a))
def test_light_commands_do_not_import_torch(tmp_path, args):
    weights = tmp_path / "lesion.safetensors"
    weights.write_bytes(b"list and hash never parse the weights")
    manifest = write_manifest(tmp_path, {"lesion": {
        "task": "segmentation", "arch": "Unet", "encoder": "resnet18", "input_size": [64, 64],
        "weights": weights.name, "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}})
    extra = {"list": ["-m", str(manifest)], "--json": ["-m", str(manifest)], "hash": [str(weights)]}.get(args[-1], [])
    r = subprocess.run([sys.executable, "-c", NO_TORCH, *args, *extra], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    if args[-1] == "list":
        assert "lesion" in r.stdout
    if args[-1] == "hash":
        assert r.stdout.startswith(hashlib.sha256(weights.read_bytes()).hexdigest())


# -- JSON and the table on a terminal ---------------------------------------------------------
def test_list_json_gives_each_models_effective_settings(tmp_path, weights):
    given = {"mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3]}
    models = {"lesion": edited(weights["lesion"], normalize=given, threshold=0.3), "grade": weights["grade"]}
    r = invoke("models", "list", "-m", write_manifest(tmp_path, models), "--json")
    assert r.exit_code == EXIT_OK, r.output
    records = json.loads(r.stdout)
    assert [m["name"] for m in records] == ["lesion", "grade"]
    lesion, grade = records
    assert lesion["normalize"] == {"source": "manifest", **given}
    assert (lesion["threshold"], lesion["input_size"], lesion["resize"]) == (0.3, [64, 64], "stretch")
    assert lesion["sha256"] == weights["lesion"]["sha256"] and lesion["ignore_keys"] == []
    assert grade["normalize"] == {"source": "encoder default", "mean": None, "std": None}
    assert (grade["threshold"], grade["temperature"], grade["class_values"]) == (None, 1.0, [0.0, 1.0, 2.0])
    warnings = [line for line in r.stderr.splitlines() if "no normalize" in line]
    assert len(warnings) == 1 and "model 'grade': no normalize in the manifest" in warnings[0]


def test_check_json_gives_the_resolved_normalize_and_the_outcome(tmp_path, weights):
    models = {"lesion": weights["lesion"], "grade": edited(weights["grade"], classes=4)}
    r = invoke("models", "check", "-m", write_manifest(tmp_path, models), "--json")
    assert r.exit_code == EXIT_INTEGRITY
    lesion, grade = json.loads(r.stdout)
    assert lesion["ok"] is True and lesion["error"] is None
    assert lesion["normalize"] == {"source": "encoder default", "mean": [0.5] * 3, "std": [0.5] * 3}
    assert lesion["output_shape"] == [1, 1, 64, 64] and lesion["dtype"] == "float32"
    assert grade["ok"] is False and "mis-shaped: classification_head.3.bias" in grade["error"]
    assert ("using the default of encoder tu-test_resnet.r160_in1k: mean [0.5, 0.5, 0.5], std [0.5, 0.5, 0.5]"
            in r.stderr)


def test_list_on_a_terminal_is_a_table(tmp_path, weights):
    import os
    import pty

    path = write_manifest(tmp_path, {"lesion": weights["lesion"]})
    pid, fd = pty.fork()
    if pid == 0:  # child: stdout is the terminal
        os.environ.update(COLUMNS="200", TERM="dumb")
        os.execv(sys.executable, [sys.executable, "-m", "legitseg", "models", "list", "-m", str(path)])
    out = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    _, status = os.waitpid(pid, 0)
    text = out.decode()
    assert os.waitstatus_to_exitcode(status) == EXIT_OK, text
    assert "┃ name" in text and "│ lesion" in text and "\t" not in text
