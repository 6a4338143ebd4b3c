"""The record format, defined once: what a model produced for an image, and the per-image record.

`ModelOutput` is what the engine hands to a sink (logits, a finished result, or
an error with its kind). `ModelEntry` and `ImageRecord` are the JSON written to
`OUT/records/<name>.json` with their round trip (`to_json` / `from_json`) and
their table rows (`rows`). Resume decisions (`ImageRecord.done_for`) read the
same types, so the writer and the reader can never disagree on a key.

Pure data: no torch, no file layout (that is `writers.Sink`'s).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from legitseg.fsio import dumps

if TYPE_CHECKING:
    import numpy as np

    from legitseg.manifest.quality import Quality
    from legitseg.manifest.spec import ModelSpec

# Version of the output format. 1: records without settings digests (legitseg 0.1.0
# before the wave-2 layout); 2: every entry carries the digest of its model settings.
FORMAT_VERSION = 2
CSV_FIELDS = (
    "image", "model", "status", "error", "mask", "probability_map",
    "area_fraction", "components", "score", "grade", "probabilities", "backend",
    "run_id", "computed",
)
_ENTRY_ROW_FIELDS = CSV_FIELDS[3:12]
# Columns added to every row when the record has a `quality` block (a `quality:` policy ran):
# scores.* of a run without one keep CSV_FIELDS only (docs/quality.md).
QUALITY_FIELDS = ("adequate", "quality_reasons", "quality_measures")
# Row columns of models with uncertainty on (docs/uncertainty.md); scores.csv has them only
# when a row does, so outputs without uncertainty keep their columns.
UNCERTAINTY_FIELDS = ("uncertainty", "refer")
# Error kinds. A failure of one of these kinds repeats on the same bytes with the same
# model; a rerun skips such an image unless asked to retry (`--retry-failed`).
DETERMINISTIC_ERRORS = frozenset({"image", "postprocess"})
# Manifest fields that do not change what a model computes.
_NOT_SETTINGS = {"name", "weights", "sha256", "backend", "parity_tolerance", "colors"}


class RecordError(ValueError):
    """A record file that is not a legitseg record."""


def _judged(uncertainty: dict[str, Any] | None, referral: dict[str, Any] | None) -> dict[str, Any]:
    """The uncertainty measures and the refer policy's verdict, as entry fields (when computed)."""
    out: dict[str, Any] = {}
    if uncertainty is not None:
        out["uncertainty"] = uncertainty
    if referral is not None:
        out["refer"] = bool(referral["refer"])
        out["referral"] = {k: v for k, v in referral.items() if k != "refer"}
    return out


# A result owns its formats: `values` go into record entries (hence rows) and API objects,
# `arrays` into API objects only, `files` are written under the entry field that names them
# (`writers.FILES` says where and how). Nothing else maps a result's fields.
@dataclass
class SegmentationResult:
    mask: np.ndarray  # (H, W) uint8, or uint16 above 255 classes
    probabilities: np.ndarray | None  # (C, H, W) float16 when kept
    area_fraction: dict[str, float]
    counted: dict[str, int] | Callable[[], dict[str, int]]  # `components`, or what counts them on its first read
    uncertainty: dict[str, Any] | None = None  # measures, with uncertainty on
    referral: dict[str, Any] | None = None  # refer policy's verdict: refer, measure, value, above

    @property  # read first by the Sink's writer thread, right before it encodes the mask (docs/architecture.md)
    def components(self) -> dict[str, int]:
        self.counted = self.counted() if callable(self.counted) else self.counted
        return self.counted

    def values(self) -> dict[str, Any]:
        return {"area_fraction": self.area_fraction, "components": self.components,
                **_judged(self.uncertainty, self.referral)}

    def arrays(self) -> dict[str, Any]:
        return {"mask": self.mask, "probabilities": self.probabilities}

    def files(self) -> dict[str, np.ndarray]:
        """Entry field -> the array written to the file it names (probabilities only when kept)."""
        out = {"mask": self.mask}
        if self.probabilities is not None:
            out["probability_map"] = self.probabilities
        return out


@dataclass
class SeverityResult:
    probabilities: list[float]
    grade: int
    score: float
    uncertainty: dict[str, Any] | None = None
    referral: dict[str, Any] | None = None

    def values(self) -> dict[str, Any]:
        return {"score": self.score, "grade": self.grade, "probabilities": self.probabilities,
                **_judged(self.uncertainty, self.referral)}

    def arrays(self) -> dict[str, Any]:
        return {}

    def files(self) -> dict[str, np.ndarray]:
        return {}


@dataclass
class ModelOutput:
    """One model's output for one image, on its way from the engine to a sink.

    Exactly one of `logits` (not yet postprocessed), `device_copy`, `result` or `error` is
    set. `device_copy` is the GPU path's engine-private handle (engines/transfer.py): the
    image's masks and probabilities postprocessed on the device, on their way to the host in
    the batch's one copy. `error_kind` says what failed: image (read/decode), forward, oom, postprocess.
    """

    logits: Any = None
    device_copy: Any = None
    result: SegmentationResult | SeverityResult | None = None
    error: str | None = None
    error_kind: str | None = None

    @classmethod
    def failed(cls, error: str, kind: str) -> ModelOutput:
        return cls(error=error, error_kind=kind)

    @property
    def ok(self) -> bool:
        return self.error is None and self.result is not None

    def fields(self, *, arrays: bool = False) -> dict[str, Any]:
        """What a record entry says of this output (status, then the error or the result's values);
        with `arrays`, also the arrays an API result carries."""
        if self.error_kind == "inadequate":  # the quality policy skipped the models: not a failure
            return {"status": "inadequate", "error": self.error, **({"error_kind": self.error_kind} if arrays else {})}
        if not self.ok:
            return {"status": "failed", "error": self.error or "no result", "error_kind": self.error_kind}
        assert self.result is not None
        return {"status": "ok", **self.result.values(), **(self.result.arrays() if arrays else {})}


@dataclass(frozen=True)
class ModelInfo:
    """What a sink records about a model besides its results (and the API reports with them)."""

    name: str
    task: str
    weights_sha256: str
    settings: str  # settings_digest
    backend: str | None = None
    parity: float | None = None

    @classmethod
    def of(cls, runner: Any) -> ModelInfo:
        """The info of a built runner (anything with `name`, `loaded.spec`, `backend`, `parity`)."""
        spec = runner.loaded.spec
        return cls(runner.name, spec.task, spec.sha256, settings_digest(spec), runner.backend, runner.parity)

    def entry(self, output: ModelOutput, run_id: str | None) -> ModelEntry:
        """`output`'s record entry, before its files are written (they set `mask`, ...)."""
        base = dict(task=self.task, weights_sha256=self.weights_sha256, settings=self.settings, run_id=run_id)
        if not output.ok:
            return ModelEntry(**base, **output.fields())
        return ModelEntry(**base, backend=self.backend, parity=self.parity, **output.fields())


def settings_fields(spec: ModelSpec, *, exclude_defaults: bool = True) -> dict[str, Any]:
    """The model settings that shape its outputs (not its name, weights path or backend)."""
    return spec.model_dump(mode="json", exclude_defaults=exclude_defaults, exclude=_NOT_SETTINGS)


def settings_digest(spec: ModelSpec) -> str:
    """sha256 of `settings_fields(spec)` and the output format version.

    Fields left at their default are not part of it, so a new manifest field with a
    default does not invalidate earlier results; the format version is.
    """
    payload = {"format": FORMAT_VERSION, "spec": settings_fields(spec)}
    return hashlib.sha256(dumps(payload, sort_keys=True).encode()).hexdigest()


@dataclass
class ModelEntry:
    """One model's part of a record."""

    task: str
    weights_sha256: str
    status: str  # ok | failed
    settings: str | None = None  # settings_digest; None in format-1 records
    # The run that computed this entry; None in records written before entries named it
    # (the record's own run_id, its last writer, then stands in: `producer`).
    run_id: str | None = None
    error: str | None = None
    error_kind: str | None = None
    backend: str | None = None
    parity: float | None = None
    mask: str | None = None
    probability_map: str | None = None
    area_fraction: dict[str, float] | None = None
    components: dict[str, int] | None = None
    score: float | None = None
    grade: int | None = None
    probabilities: list[float] | None = None
    overlay: str | None = None  # OUT-relative JPEG, written with `run --overlay`
    # Label -> "#rrggbb" the overlay was drawn with: a later `colors:` change must not
    # relabel an overlay drawn before it. None without an overlay, and in older records.
    overlay_colors: dict[str, str] | None = None
    # Uncertainty measures (with `uncertainty: true` or a `refer:` policy) and the policy's
    # verdict: `refer` true/false, `referral` {measure, value, above}. None otherwise.
    uncertainty: dict[str, Any] | None = None
    refer: bool | None = None
    referral: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # fields of newer versions, kept as read

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"task": self.task, "weights_sha256": self.weights_sha256}
        if self.settings is not None:
            out["settings"] = self.settings
        if self.run_id is not None:
            out["run_id"] = self.run_id
        out["status"] = self.status
        if not self.ok:
            out["error"] = self.error
            if self.error_kind is not None:
                out["error_kind"] = self.error_kind
        else:
            out["backend"] = self.backend
            out["parity"] = self.parity
        for key in ("mask", "probability_map", "area_fraction", "components", "score", "grade", "probabilities",
                    "overlay", "overlay_colors", "uncertainty", "refer", "referral"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        out.update(self.extra)
        return out

    @classmethod
    def from_json(cls, data: Any) -> ModelEntry:
        if not isinstance(data, dict) or not isinstance(data.get("task"), str):
            raise RecordError("model entry without a task")
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        values = {k: v for k, v in data.items() if k in known}
        values.setdefault("weights_sha256", "")
        values.setdefault("status", "failed")
        return cls(**values, extra={k: v for k, v in data.items() if k not in known})

    def matches(self, spec: ModelSpec, digest: str, legacy: bool) -> bool:
        """Same weights and same settings (format-1 records carry no settings: weights only)."""
        if self.weights_sha256 != spec.sha256:
            return False
        return self.settings == digest or (legacy and self.settings is None)


@dataclass
class ImageRecord:
    """Everything about one image in OUT: the unit of completion."""

    image: str  # the input path as given, printable
    name: str  # output name under OUT
    sha256: str | None
    size: list[int] | None
    status: str
    error: str | None
    models: dict[str, ModelEntry]
    legitseg: str
    run_id: str | None
    written_at: str | None
    source: str | None = None  # absolute path of the input (how a later run recognises it)
    format: int = 1
    # Input adequacy: measures and verdict (manifest.quality.Quality.to_json); only with a `quality:` policy.
    quality: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def failed(self) -> bool:
        """Something failed (an inadequate image whose models were skipped has not)."""
        return self.status not in ("ok", "inadequate")

    def to_json(self) -> dict[str, Any]:
        out = {
            "image": self.image, "name": self.name, "sha256": self.sha256, "size": self.size,
            "status": self.status, "error": self.error,
            "models": {k: e.to_json() for k, e in self.models.items()},
            "legitseg": self.legitseg, "run_id": self.run_id, "written_at": self.written_at,
        }
        if self.source is not None:
            out["source"] = self.source
        out["format"] = self.format
        if self.quality is not None:
            out["quality"] = self.quality
        out.update(self.extra)
        return out

    def to_bytes(self) -> bytes:
        return (dumps(self.to_json(), indent=1) + "\n").encode()

    @classmethod
    def from_json(cls, data: Any) -> ImageRecord:
        """Raises RecordError for anything that is not a record."""
        if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
            raise RecordError("not a legitseg record (no 'models' object)")
        if not isinstance(data.get("image"), str) or not isinstance(data.get("name"), str):
            raise RecordError("not a legitseg record (no 'image' or 'name')")
        known = {f for f in cls.__dataclass_fields__ if f not in ("extra", "models")}
        values = {k: data.get(k) for k in known if k in data}
        if not isinstance(values.get("quality", {}), dict):
            values.pop("quality")  # not a block this version wrote: the image is measured again
        values.setdefault("legitseg", "")
        values.setdefault("status", "failed")
        for k in ("sha256", "size", "error", "run_id", "written_at"):
            values.setdefault(k, None)
        models = {str(k): ModelEntry.from_json(v) for k, v in data["models"].items()}
        extra = {k: v for k, v in data.items() if k not in known and k != "models"}
        return cls(**values, models=models, extra=extra)

    def producer(self, model: str) -> str | None:
        """The run that computed `model`'s entry: the entry's own run_id, else (records written
        before entries carried one) the run that last wrote the record."""
        entry = self.models.get(model)
        return entry.run_id if entry is not None and entry.run_id is not None else self.run_id

    def rows(self, selected: set[str] | None = None, current_run: str | None = None) -> list[dict[str, Any]]:
        """One row per (image, model), in the record's model order; `selected` filters models.

        `run_id` is the run that computed the entry (`producer`); `computed` says whether that is
        `current_run` (false: the row was carried over, skipped as already done).
        """
        rows = []
        for model, entry in self.models.items():
            if selected is not None and model not in selected:
                continue
            data = entry.to_json()
            row = {"image": self.image, "model": model, "status": entry.status}
            for key in _ENTRY_ROW_FIELDS + UNCERTAINTY_FIELDS:
                if data.get(key) is not None:
                    row[key] = data[key]
            run_id = self.producer(model)
            if run_id is not None:
                row["run_id"] = run_id
            row["computed"] = current_run is not None and run_id == current_run
            if self.quality is not None:
                row["adequate"] = self.quality.get("adequate")
                row["quality_reasons"] = list(dict.fromkeys(r.get("reason") for r in self.quality.get("reasons") or []))
                row["quality_measures"] = self.quality.get("measures")
            rows.append(row)
        return rows

    def done_for(self, specs: list[ModelSpec], sha256: str, retry_failed: bool, overlay: bool = False) -> bool:
        """True when a rerun may skip this image for `specs`: same bytes, same weights and
        settings, and every model ok or failed in a way that would repeat; with `overlay`,
        every ok model also has its overlay."""
        if self.sha256 != sha256:
            return False
        legacy = self.format < 2
        for spec in specs:
            entry = self.models.get(spec.name)
            if entry is None or not entry.matches(spec, settings_digest(spec), legacy):
                return False
            # "inadequate": skipped by the quality policy; run.py's plan judged the record again first.
            if not entry.ok and entry.status != "inadequate" and (
                    retry_failed or entry.error_kind not in DETERMINISTIC_ERRORS):
                return False
            if overlay and entry.ok and entry.overlay is None:
                return False
        return True


@dataclass
class ImageResult:
    """One image through the engine: where it came from and each model's output.

    `error` is set when the image itself failed (read, decode); `outputs` then
    holds a failed ModelOutput per model.
    """

    image: str  # input path as given, printable
    name: str  # output name under OUT
    source: str  # absolute input path
    sha256: str | None
    size: tuple[int, int] | None
    outputs: dict[str, ModelOutput]
    error: str | None = None
    rgb: np.ndarray | None = None  # the oriented photograph, kept only when overlays are asked for
    quality: Quality | None = None  # measures and verdict, with a `quality:` policy
