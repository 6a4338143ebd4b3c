"""models.yaml -> validated, typed model specs (SPEC section 2).

Nothing here imports torch: `legitseg models list` and the CLI's argument checks
stay fast. Names of smp architectures and encoders come from a snapshot of the
pinned smp release (`_smp_names.py`); `tu-` (timm) encoder names are checked by
the factory, which has timm at hand.
"""

from __future__ import annotations

import difflib
import hashlib
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from legitseg.errors import ManifestError, UsageError
from legitseg.manifest.choices import AUTO, BACKEND_CHOICES
from legitseg.manifest.colours import check_colors, check_labels, parse_colors
from legitseg.manifest.messages import format_validation, refuse_non_finite
from legitseg.manifest.modes import check_ensemble, check_modes, check_tile_size, expand_tta
from legitseg.manifest.quality import QualityPolicy, check_quality_models
from legitseg.manifest.referral import ReferPolicy, check_referral
from legitseg.manifest.safe_yaml import load_yaml, short
from legitseg.manifest.smp_names import ARCHITECTURES, ENCODERS

NAME_RE = re.compile(r"^[a-z0-9_-]+$")
_ARCH_BY_LOWER = {a.lower(): a for a in ARCHITECTURES}
# Fields of smp.create_model that the manifest owns, plus options that would change
# what the model returns (activation, aux head) or make smp download weights.
FORBIDDEN_ARCH_PARAMS = {
    "encoder_weights": "it would make smp download pretrained weights; legitseg only loads local weights",
    "encoder_name": "it is set by the manifest field 'encoder'",
    "in_channels": "it is set by the manifest field 'in_channels'",
    "classes": "it is set by the manifest field 'classes'",
    "arch": "it is set by the manifest field 'arch'",
    "activation": "legitseg applies the activation itself (sigmoid or softmax after resizing)",
    "aux_params": "legitseg reads only the mask output; to load weights trained with aux_params, "
                  "set ignore_keys: ['classification_head.*']",
}
SEVERITY_ONLY = ("temperature", "class_values", "pooling")
SEGMENTATION_ONLY = ("arch", "arch_params", "threshold", "colors")

SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")


class Normalize(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @model_validator(mode="after")
    def _check(self) -> Normalize:
        if len(self.mean) != len(self.std):
            raise ValueError(f"mean has {len(self.mean)} values but std has {len(self.std)}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std values must be > 0, got {short(list(self.std))}")
        return self


class ModelSpec(BaseModel):
    """One model of the manifest. `weights` is absolute once loaded by `load_manifest`."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: str
    task: Literal["segmentation", "severity", "quality"]
    arch: str | None = None
    encoder: str
    in_channels: Literal[1, 3] = 3
    classes: int = Field(1, ge=1, le=65535)
    labels: tuple[str, ...] | None = None
    # One file, or several (an ensemble of checkpoints of one architecture) with one sha256 each.
    weights: Path | list[Path]
    sha256: str | list[str]
    input_size: tuple[Annotated[int, Field(ge=8, le=16384)], Annotated[int, Field(ge=8, le=16384)]] | None = None
    resize: Literal["stretch", "pad", "letterbox", "tile"] = "stretch"
    interpolation: Literal["linear", "area", "cubic", "nearest"] = "linear"
    # JPEGs much larger than input_size decoded at 1/2-1/8 by libjpeg (stretch only; docs/manifest.md).
    decode: Literal["full", "reduced"] = "full"
    normalize: Normalize | None = None
    threshold: float = Field(0.5, gt=0.0, lt=1.0)
    arch_params: dict[str, Any] = Field(default_factory=dict)
    temperature: float = Field(1.0, gt=0.0)
    class_values: tuple[float, ...] | None = None
    pooling: Literal["avg", "max"] = "avg"
    backend: Literal[BACKEND_CHOICES] = AUTO  # the names of manifest/choices.py, written there once
    # Under --precision fp16/bf16, the weights themselves in the half type (no autocast): a
    # different arithmetic, so asked for by name and part of the settings digest (docs/manifest.md).
    half_weights: bool = False
    # Largest logit difference between ONNX Runtime and torch, relative to the largest logit (docs/onnx.md).
    parity_tolerance: float = Field(1e-4, gt=0.0, le=1.0)
    # Glob patterns of keys in the weights file that the model does not have and that
    # are dropped before the strict load (e.g. the aux_params head: classification_head.*).
    ignore_keys: tuple[str, ...] = ()
    # Accuracy modes (docs/accuracy.md).
    tta: tuple[Literal["hflip", "vflip", "rot90", "rot180", "rot270"], ...] = ()
    tile_size: tuple[Annotated[int, Field(ge=8, le=16384)], Annotated[int, Field(ge=8, le=16384)]] | None = None
    overlap: float = Field(0.5, ge=0.0, lt=1.0)
    blend: Literal["gaussian", "constant"] = "gaussian"
    # Overlay colour per label name (`run --overlay`): "#rrggbb" or [r, g, b]; others from the default palette.
    colors: dict[str, tuple[int, int, int]] | None = None
    # Per-image uncertainty measures, and a referral policy on one of them (docs/uncertainty.md).
    uncertainty: bool = False
    refer: ReferPolicy | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError(f"model name {short(v)} must match [a-z0-9_-]+")
        return v

    @field_validator("sha256", mode="before")
    @classmethod
    def _sha_type(cls, v: Any) -> Any:
        for item in v if isinstance(v, list | tuple) else [v]:
            if isinstance(item, int | float):
                raise ValueError("sha256 was read as a number (YAML drops leading zeros); write it in quotes")
        return list(v) if isinstance(v, tuple) else v

    @field_validator("sha256")
    @classmethod
    def _sha(cls, v: str | list[str]) -> str | list[str]:
        for i, item in enumerate(v if isinstance(v, list) else [v]):
            if not SHA256_RE.match(item):
                where = f"item {i + 1}: " if isinstance(v, list) else ""
                raise ValueError(f"{where}String should match pattern '{SHA256_RE.pattern}'")
        return [s.lower() for s in v] if isinstance(v, list) else v.lower()

    @field_validator("weights", mode="before")
    @classmethod
    def _weights_list(cls, v: Any) -> Any:
        return list(v) if isinstance(v, tuple) else v

    @field_validator("tta", mode="before")
    @classmethod
    def _tta(cls, v: Any) -> Any:
        return expand_tta(v)

    @field_validator("tile_size", mode="before")
    @classmethod
    def _tile_size(cls, v: Any) -> Any:
        return check_tile_size(v)

    @field_validator("arch")
    @classmethod
    def _arch(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            return _ARCH_BY_LOWER[v.lower()]
        except KeyError:
            raise ValueError(
                f"unknown architecture {short(v)}; valid: {', '.join(ARCHITECTURES)}"
            ) from None

    @field_validator("encoder")
    @classmethod
    def _encoder(cls, v: str) -> str:
        if v.startswith("tu-") or v in ENCODERS:
            return v
        family = [e for e in ENCODERS if e.split("-")[0] == v.split("-")[0]]
        close = list(dict.fromkeys(family + difflib.get_close_matches(v, ENCODERS, n=6, cutoff=0.75)))[:12]
        hint = f"similar: {', '.join(close)}; " if close else ""
        raise ValueError(
            f"unknown encoder {short(v)}; {hint}valid: any of smp's {len(ENCODERS)} encoders "
            "(`legitseg info --encoders`) or tu-<timm model name>"
        )

    @field_validator("arch_params")
    @classmethod
    def _arch_params(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key in v:
            if key in FORBIDDEN_ARCH_PARAMS:
                raise ValueError(f"arch_params.{key} is not allowed: {FORBIDDEN_ARCH_PARAMS[key]}")
        return v

    @field_validator("ignore_keys")
    @classmethod
    def _ignore_keys(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in v:
            if not pattern.strip():
                raise ValueError("patterns must not be empty")
        if len(set(v)) != len(v):
            raise ValueError(f"a pattern is listed twice in {short(list(v))}")
        return v
    @field_validator("colors", mode="before")
    @classmethod
    def _colors(cls, v: Any) -> Any:
        return parse_colors(v)

    @model_validator(mode="after")
    def _cross(self) -> ModelSpec:
        given = self.model_fields_set
        if self.task == "segmentation":
            if self.arch is None:
                raise ValueError(f"'arch' is required for segmentation models; valid: {', '.join(ARCHITECTURES)}")
            wrong = [f for f in SEVERITY_ONLY if f in given]
            if wrong:
                raise ValueError(f"field(s) {', '.join(wrong)} only apply to task 'severity'")
            if "threshold" in given and self.classes != 1:
                raise ValueError("'threshold' only applies to binary models (classes: 1); multi-class masks use argmax")
            want = 2 if self.classes == 1 else self.classes
        else:
            wrong = [f for f in SEGMENTATION_ONLY if f in given]
            if wrong:
                raise ValueError(f"field(s) {', '.join(wrong)} only apply to task 'segmentation'")
            if self.task == "severity" and self.classes < 2:
                raise ValueError("severity models need classes >= 2")
            if self.class_values is not None and len(self.class_values) != self.classes:
                raise ValueError(
                    f"class_values has {len(self.class_values)} values but classes is {self.classes}"
                )
            want = self.classes
        if self.labels is not None and len(self.labels) != want:
            raise ValueError(f"labels has {len(self.labels)} names but this model has {want} (class 0 is background)")
        check_labels(self.label_names, given=self.labels is not None)
        check_colors(self)
        if self.resize in ("stretch", "letterbox") and self.input_size is None:
            raise ValueError(f"'input_size' [height, width] is required when resize is '{self.resize}'")
        if self.decode == "reduced" and self.resize != "stretch":
            raise ValueError(f"'decode: reduced' needs resize 'stretch', not '{self.resize}' (pad and tile models "
                             "see the photo's own pixels; letterbox is not supported)")
        check_modes(self, given)
        check_ensemble(self)
        check_referral(self)
        if self.normalize is not None and len(self.normalize.mean) != self.in_channels:
            raise ValueError(
                f"normalize has {len(self.normalize.mean)} channels but in_channels is {self.in_channels}"
            )
        return self

    # -- derived values the rest of the code uses ---------------------------------
    @property
    def weight_files(self) -> list[tuple[Path, str]]:
        """(weights path, sha256) of every file: one, or each member of an ensemble."""
        if isinstance(self.weights, list):
            return list(zip(self.weights, self.sha256, strict=True))
        return [(self.weights, self.sha256)]  # type: ignore[list-item]

    @property
    def is_ensemble(self) -> bool:
        return isinstance(self.weights, list)

    def member(self, index: int) -> ModelSpec:
        """The single-file spec of one ensemble member (the spec itself for a single file)."""
        if not self.is_ensemble:
            return self
        path, sha = self.weight_files[index]
        return self.model_copy(update={"weights": path, "sha256": sha})

    @property
    def label_names(self) -> tuple[str, ...]:
        if self.labels is not None:
            return self.labels
        if self.task != "segmentation":
            return tuple(f"grade_{i}" for i in range(self.classes)) if self.classes > 1 else ("quality",)
        if self.classes == 1:
            return ("background", self.name)
        return ("background",) + tuple(f"class_{i}" for i in range(1, self.classes))

    @property
    def values(self) -> tuple[float, ...]:
        """Severity class values (SPEC 4.4), default 0..classes-1; quality: i / (classes - 1), or 1."""
        if self.class_values is not None:
            return self.class_values
        if self.task == "quality":
            return (1.0,) if self.classes == 1 else tuple(i / (self.classes - 1) for i in range(self.classes))
        return tuple(float(i) for i in range(self.classes))

    @property
    def probe_size(self) -> tuple[int, int]:
        """The size used for dummy forwards: tile_size for tiled models, input_size, or 256x256
        for pad models without one."""
        if self.resize == "tile" and self.tile_size is not None:
            return self.tile_size
        return self.input_size or (256, 256)


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1]
    models: dict[str, ModelSpec]
    quality: QualityPolicy | None = None  # input adequacy (docs/quality.md); None: not measured
    path: Path = Path("models.yaml")
    sha256: str = ""

    @model_validator(mode="after")
    def _quality_models(self) -> Manifest:
        return check_quality_models(self)  # one quality model at most (docs/quality.md)

    def select(self, names: list[str] | None) -> list[ModelSpec]:
        """The models named (in the order given), or all of them; unknown names are a UsageError."""
        if not names:
            return list(self.models.values())
        unknown = [n for n in names if n not in self.models]
        if unknown:
            raise UsageError(
                f"{self.path}: unknown model(s) {', '.join(unknown)}; "
                f"the manifest has: {', '.join(self.models)}"
            )
        return [self.models[n] for n in dict.fromkeys(names)]


def parse_manifest(text: str, path: Path) -> Manifest:
    """Parse manifest text; relative weights paths resolve against `path`'s folder.

    Raises ManifestError naming the file, the model and the field.
    """
    try:
        raw = load_yaml(text)
    except ManifestError as err:
        raise ManifestError(f"{path}: {err}") from err
    if not isinstance(raw, dict):
        raise ManifestError(f"{path}: expected a mapping with 'version' and 'models', got {type(raw).__name__}")
    # Checked here, not only by pydantic: 'path' and 'sha256' are Manifest fields that
    # legitseg fills in, so a top-level 'sha256:' in the file would otherwise be ignored.
    unknown = [str(k) for k in raw if k not in ("version", "models", "quality")]
    if unknown:
        raise ManifestError(
            f"{path}: field {short(unknown[0])}: unknown field; valid top-level fields: version, models, quality"
        )
    refuse_non_finite(path, raw)
    models = raw.get("models")
    if isinstance(models, dict):
        if not models:
            raise ManifestError(f"{path}: 'models' is empty")
        for name, body in models.items():
            if not isinstance(body, dict):
                raise ManifestError(f"{path}: model {short(name)}: expected a mapping of fields")
            if "name" in body:
                raise ManifestError(f"{path}: model {short(name)}: field 'name': unknown field (the key is the name)")
            body["name"] = name
            weights = body.get("weights")
            if isinstance(weights, str):
                body["weights"] = (path.parent / weights).absolute()
            elif isinstance(weights, list):
                body["weights"] = [(path.parent / w).absolute() if isinstance(w, str) else w for w in weights]
    try:
        manifest = Manifest.model_validate(
            {**raw, "path": path, "sha256": hashlib.sha256(text.encode()).hexdigest()}
        )
    except ValidationError as err:
        raise ManifestError(format_validation(path, raw, err)) from err
    for spec in manifest.models.values():
        for weights, _ in spec.weight_files:
            try:
                found = weights.exists()
            except OSError as err:  # e.g. a name longer than the file system allows
                raise ManifestError(
                    f"{path}: model {spec.name!r}: field 'weights': cannot look up {short(str(weights))}: "
                    f"{err.strerror or err}") from err
            if not found:
                raise ManifestError(f"{path}: model {spec.name!r}: weights file not found: {weights}")
    return manifest


def load_manifest(path: str | Path) -> Manifest:
    """Read and validate a manifest file. Raises ManifestError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise ManifestError(f"{path}: manifest not found (use -m or $LEGITSEG_MANIFEST)") from err
    except (OSError, UnicodeDecodeError) as err:
        raise ManifestError(f"{path}: cannot read manifest: {err}") from err
    return parse_manifest(text, path)
