"""models.yaml -> typed specs (SPEC section 2). Refusals through the CLI: tests/test_cli_models.py."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from legitseg.errors import EXIT_INTEGRITY, EXIT_USAGE, ManifestError, UsageError
from legitseg.manifest.spec import load_manifest, parse_manifest

SHA_A = "9f2c" + "0" * 60
SHA_B = "41AA" + "0" * 60

# SPEC section 2's example, verbatim apart from the hashes.
SPEC_EXAMPLE = f"""
version: 1
models:
  erythema_segmenter:               # name: [a-z0-9_-]+, unique
    task: segmentation              # segmentation | severity
    arch: DeepLabV3Plus             # any smp architecture (case-insensitive)
    encoder: efficientnet-b2        # any smp encoder name, incl. tu-<timm name>
    in_channels: 3                  # default 3
    classes: 1                      # default 1 (binary)
    labels: [background, erythema]
    weights: weights/erythema.safetensors   # relative to the manifest file
    sha256: {SHA_A}
    input_size: [512, 512]
    resize: stretch                 # stretch (default) | pad   (see 4.2)
    interpolation: linear           # linear (default) | area | cubic | nearest
    normalize: {{mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225]}}
    threshold: 0.5                  # binary models only (default 0.5)
    arch_params: {{encoder_output_stride: 16}}  # passed through to smp.create_model
  erythema_classifier:
    task: severity
    encoder: efficientnet-b2
    classes: 10
    weights: weights/erythema_cls.pt
    sha256: {SHA_B}
    input_size: [384, 384]
    temperature: 1.0                # softmax(logits / temperature), default 1.0
    class_values: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]   # optional; default 0..classes-1
    pooling: avg                    # avg (default) | max
"""


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A folder with the weights files the example names (parsing only checks they exist)."""
    (tmp_path / "weights").mkdir()
    for name in ("erythema.safetensors", "erythema_cls.pt", "w.safetensors"):
        (tmp_path / "weights" / name).write_bytes(b"not read by the parser")
    return tmp_path


def one_model(**fields) -> str:
    body = {"task": "segmentation", "arch": "Unet", "encoder": "resnet18",
            "weights": "weights/w.safetensors", "sha256": SHA_A, "input_size": "[64, 64]", **fields}
    lines = "\n".join(f"    {k}: {v}" for k, v in body.items() if v is not None)
    return f"version: 1\nmodels:\n  lesion:\n{lines}\n"


def test_the_spec_example_parses_to_typed_values(root):
    path = root / "models.yaml"
    path.write_text(SPEC_EXAMPLE)
    m = load_manifest(path)
    assert list(m.models) == ["erythema_segmenter", "erythema_classifier"]
    seg, cls = m.models["erythema_segmenter"], m.models["erythema_classifier"]
    assert (seg.name, seg.task, seg.arch, seg.encoder) == ("erythema_segmenter", "segmentation",
                                                           "DeepLabV3Plus", "efficientnet-b2")
    assert seg.weights == (root / "weights" / "erythema.safetensors").absolute()
    assert seg.sha256 == SHA_A
    assert seg.input_size == (512, 512)
    assert seg.normalize.mean == (0.485, 0.456, 0.406) and seg.normalize.std == (0.229, 0.224, 0.225)
    assert seg.arch_params == {"encoder_output_stride": 16}
    assert seg.label_names == ("background", "erythema")
    assert (cls.task, cls.arch, cls.classes, cls.pooling, cls.temperature) == ("severity", None, 10, "avg", 1.0)
    assert cls.sha256 == SHA_B.lower()  # hashes compare lower-case
    assert cls.values == tuple(float(i) for i in range(10))
    assert m.path == path
    assert m.sha256 == hashlib.sha256(SPEC_EXAMPLE.encode()).hexdigest()


def test_defaults(root):
    m = parse_manifest(one_model(), root / "models.yaml")
    spec = m.models["lesion"]
    assert spec.in_channels == 3
    assert spec.classes == 1
    assert spec.labels is None and spec.label_names == ("background", "lesion")
    assert spec.resize == "stretch"
    assert spec.interpolation == "linear"
    assert spec.normalize is None  # resolved from the encoder by the factory
    assert spec.threshold == 0.5
    assert spec.arch_params == {}
    assert spec.temperature == 1.0 and spec.pooling == "avg" and spec.class_values is None
    assert spec.backend == "auto"


@pytest.mark.parametrize(("fields", "labels"), [
    ({"classes": 3}, ("background", "class_1", "class_2")),
    ({"classes": 3, "labels": "[bg, erythema, scale]"}, ("bg", "erythema", "scale")),
    ({"task": "severity", "arch": None, "classes": 3}, ("grade_0", "grade_1", "grade_2")),
])
def test_label_names(root, fields, labels):
    assert parse_manifest(one_model(**fields), root / "m.yaml").models["lesion"].label_names == labels


def test_severity_class_values(root):
    text = one_model(task="severity", arch=None, classes=3, class_values="[0, 2.5, 10]")
    assert parse_manifest(text, root / "m.yaml").models["lesion"].values == (0.0, 2.5, 10.0)


@pytest.mark.parametrize("written", ["unet", "UNET", "deeplabv3plus", "Segformer", "upernet", "dpt"])
def test_architecture_is_case_insensitive_and_canonicalised(root, written):
    arch = parse_manifest(one_model(arch=written), root / "m.yaml").models["lesion"].arch
    assert arch.lower() == written.lower()
    assert arch in ("Unet", "DeepLabV3Plus", "Segformer", "UPerNet", "DPT")


def test_pad_models_need_no_input_size(root):
    spec = parse_manifest(one_model(resize="pad", input_size=None), root / "m.yaml").models["lesion"]
    assert spec.input_size is None and spec.probe_size == (256, 256)


def test_weights_resolve_against_the_manifest_folder_not_the_cwd(root, tmp_path_factory, monkeypatch):
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    path = root / "models.yaml"
    path.write_text(one_model())
    assert load_manifest(path).models["lesion"].weights == (root / "weights" / "w.safetensors").absolute()
    absolute = root / "weights" / "w.safetensors"
    path.write_text(one_model(weights=str(absolute)))
    assert load_manifest(path).models["lesion"].weights == absolute


def test_yaml_anchors_and_merge_keys_share_settings(root):
    text = f"""
version: 1
common: &common
  task: segmentation
  encoder: resnet18
  input_size: [64, 64]
  weights: weights/w.safetensors
  sha256: {SHA_A}
models:
  a: {{<<: *common, arch: Unet}}
  b: {{<<: *common, arch: FPN, classes: 2}}
"""
    # A top-level 'common' is an unknown field; anchors must live inside a model.
    with pytest.raises(ManifestError, match="field 'common': unknown field"):
        parse_manifest(text, root / "m.yaml")
    text = f"""
version: 1
models:
  a: &a
    task: segmentation
    arch: Unet
    encoder: resnet18
    input_size: [64, 64]
    weights: weights/w.safetensors
    sha256: {SHA_A}
  b:
    <<: *a
    arch: FPN
    classes: 2
"""
    m = parse_manifest(text, root / "m.yaml")
    assert (m.models["b"].arch, m.models["b"].classes, m.models["b"].encoder) == ("FPN", 2, "resnet18")


@pytest.mark.parametrize(("text", "expected"), [
    ("version: 1\nversion: 1\nmodels: {}\n", "duplicate top-level key 'version' at line 2 (first at line 1)"),
    (one_model() + "  lesion:\n    task: severity\n", "duplicate model name 'lesion' at line 10 (first at line 3)"),
    (one_model(classes="2\n    classes: 3"), "model 'lesion': duplicate field 'classes' at line 11 (first at line 10)"),
    (one_model(normalize="\n      mean: [0.5, 0.5, 0.5]\n      mean: [0.4, 0.4, 0.4]\n      std: [1, 1, 1]"),
     "model 'lesion', field 'normalize': duplicate key 'mean' at line 12 (first at line 11)"),
])
def test_duplicate_keys_name_the_model_and_field(root, text, expected):
    with pytest.raises(ManifestError) as err:
        parse_manifest(text, root / "m.yaml")
    assert str(err.value) == f"{root / 'm.yaml'}: {expected}"


def test_every_problem_of_a_model_is_reported_at_once(root):
    with pytest.raises(ManifestError) as err:
        parse_manifest(one_model(classes=0, resize="crop", colour="red"), root / "m.yaml")
    lines = str(err.value).splitlines()
    assert len(lines) == 3
    assert all(line.startswith(f"{root / 'm.yaml'}: model 'lesion', field '") for line in lines)


def test_manifest_errors_exit_3(root):
    with pytest.raises(ManifestError) as err:
        load_manifest(root / "absent.yaml")
    assert err.value.exit_code == EXIT_INTEGRITY
    assert str(err.value) == f"{root / 'absent.yaml'}: manifest not found (use -m or $LEGITSEG_MANIFEST)"


def test_select_keeps_the_order_given_and_refuses_unknown_names(root):
    text = SPEC_EXAMPLE
    m = parse_manifest(text, root / "m.yaml")
    assert [s.name for s in m.select(None)] == ["erythema_segmenter", "erythema_classifier"]
    picked = m.select(["erythema_classifier", "erythema_segmenter", "erythema_classifier"])
    assert [s.name for s in picked] == ["erythema_classifier", "erythema_segmenter"]
    with pytest.raises(UsageError) as err:
        m.select(["erythema_segmenter", "scaling"])
    assert err.value.exit_code == EXIT_USAGE
    assert str(err.value) == (f"{root / 'm.yaml'}: unknown model(s) scaling; "
                              "the manifest has: erythema_segmenter, erythema_classifier")


def test_specs_are_frozen(root):
    spec = parse_manifest(one_model(), root / "m.yaml").models["lesion"]
    with pytest.raises(ValueError):
        spec.classes = 5


# -- non-finite numbers are refused everywhere -------------------------------------------------
@pytest.mark.parametrize(("fields", "expected"), [
    ({"normalize": "{mean: [0.5, .nan, 0.5], std: [0.2, 0.2, 0.2]}"}, "field 'normalize.mean.1': nan"),
    ({"normalize": "{mean: [0.5, 0.5, 0.5], std: [0.2, .inf, 0.2]}"}, "field 'normalize.std.1': inf"),
    ({"threshold": ".NaN"}, "field 'threshold': nan"),
    ({"threshold": "-.inf"}, "field 'threshold': -inf"),
    ({"parity_tolerance": ".nan"}, "field 'parity_tolerance': nan"),
    ({"arch_params": "{encoder_output_stride: .inf}"}, "field 'arch_params.encoder_output_stride': inf"),
    ({"arch_params": "{decoder_channels: [256, 1.0e+999, 64]}"}, "field 'arch_params.decoder_channels.1': inf"),
    ({"task": "severity", "arch": None, "classes": 3, "temperature": ".inf"}, "field 'temperature': inf"),
    ({"task": "severity", "arch": None, "classes": 3, "class_values": "[0, .nan, 2]"},
     "field 'class_values.1': nan"),
], ids=["mean", "std", "threshold nan", "threshold -inf", "parity_tolerance", "arch_params", "nested arch_params",
        "temperature", "class_values"])
def test_non_finite_numbers_are_refused_naming_model_and_field(root, fields, expected):
    with pytest.raises(ManifestError) as err:
        parse_manifest(one_model(**fields), root / "m.yaml")
    assert err.value.exit_code == EXIT_INTEGRITY
    assert str(err.value) == (f"{root / 'm.yaml'}: model 'lesion', {expected} is not a finite number; "
                              "NaN and infinity are refused")


@pytest.mark.parametrize("written", ["'nan'", "'inf'", "'-Infinity'"])
def test_non_finite_numbers_written_as_strings_are_refused_too(root, written):
    with pytest.raises(ManifestError) as err:
        parse_manifest(one_model(threshold=written), root / "m.yaml")
    assert str(err.value) == f"{root / 'm.yaml'}: model 'lesion', field 'threshold': Input should be a finite number"


# -- YAML that would cost unbounded memory or time ------------------------------------------------
def billion_laughs(levels: int = 9) -> str:
    lines = ["      a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, levels + 1):
        lines.append(f"      a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return one_model(arch_params="\n" + "\n".join(lines))


def test_an_alias_bomb_is_refused_before_it_is_expanded(root):
    # 9 levels of 9 aliases: 10^9 strings once expanded; refused from the node tree in milliseconds.
    with pytest.raises(ManifestError) as err:
        parse_manifest(billion_laughs(), root / "m.yaml")
    assert str(err.value) == (f"{root / 'm.yaml'}: the YAML expands to more than 100000 values through "
                              "aliases (*name) (from line 16); refused as an alias bomb")


def test_a_small_alias_tree_is_still_a_manifest(root):
    # Three levels (729 leaves) is within the bounds: the document parses, then smp's own
    # argument check would judge arch_params at build time.
    m = parse_manifest(billion_laughs(levels=3), root / "m.yaml")
    assert len(m.models["lesion"].arch_params["a3"]) == 9


def test_too_many_aliases_are_refused(root):
    text = one_model(labels="[background, &x lesion]", arch_params="{many: [" + ", ".join(["*x"] * 1001) + "]}")
    with pytest.raises(ManifestError) as err:
        parse_manifest(text, root / "m.yaml")
    assert str(err.value).startswith(f"{root / 'm.yaml'}: more than 1000 YAML aliases (*name), the last at line ")


def test_a_recursive_alias_is_refused(root):
    with pytest.raises(ManifestError) as err:
        parse_manifest(one_model(arch_params="&me {inner: *me}"), root / "m.yaml")
    assert str(err.value) == f"{root / 'm.yaml'}: recursive YAML alias at line 10 (a value contains itself)"


def test_deeply_nested_yaml_is_refused(root):
    with pytest.raises(ManifestError) as err:
        parse_manifest(one_model(arch_params="{x: " + "[" * 5000 + "]" * 5000 + "}"), root / "m.yaml")
    assert str(err.value) == f"{root / 'm.yaml'}: the YAML is nested too deeply"


@pytest.mark.parametrize(("fields", "start"), [
    ({"arch": "U" * 100_000}, "model 'lesion', field 'arch': unknown architecture 'UUUU"),
    ({"resize": "c" * 100_000}, "model 'lesion', field 'resize': invalid value 'cccc"),
    ({"encoder": "e" * 100_000}, "model 'lesion', field 'encoder': unknown encoder 'eeee"),
    ({"z" * 1000: 1}, "model 'lesion', field 'zzzz"),
])
def test_values_echoed_in_errors_are_capped(root, fields, start):
    with pytest.raises(ManifestError) as err:
        parse_manifest(one_model(**fields), root / "m.yaml")
    message = str(err.value).removeprefix(f"{root / 'm.yaml'}: ")
    assert message.startswith(start)
    assert "..." in message and len(message) < 600


def test_ignore_keys_is_a_list_of_glob_patterns(root):
    spec = parse_manifest(one_model(ignore_keys="['classification_head.*']"), root / "m.yaml").models["lesion"]
    assert spec.ignore_keys == ("classification_head.*",)
    assert parse_manifest(one_model(), root / "m.yaml").models["lesion"].ignore_keys == ()
    for written, message in (("['']", "patterns must not be empty"),
                             ("[a.*, a.*]", "a pattern is listed twice in ['a.*', 'a.*']")):
        with pytest.raises(ManifestError) as err:
            parse_manifest(one_model(ignore_keys=written), root / "m.yaml")
        assert str(err.value) == f"{root / 'm.yaml'}: model 'lesion', field 'ignore_keys': {message}"
