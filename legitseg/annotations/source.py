"""What an export reads from OUT: records one at a time, and each segmentation result with
what traces it (the run that computed it, the weights' sha256, the labels and colours).

Records are read one by one in name order, so an OUT of any size costs the memory of one
image's masks; the run files (`runs/*.json`, a few per OUT) are read once up front for
the colours each run drew with and the models each run selected. No printing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from legitseg.errors import UsageError
from legitseg.images.sources import OUT_MARKER
from legitseg.output.overlay import colour, hex_colour
from legitseg.output.records import ImageRecord, ModelEntry, RecordError
from legitseg.output.writers import RECORDS, RUNS

log = logging.getLogger(__name__)
# Pillow refuses images it takes for decompression bombs with its own error type.
_READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class Unexported(Exception):
    """One (image, model) result that cannot be exported; the export goes on without it."""


@dataclass(frozen=True)
class Category:
    """One label of one model: a COCO category, a GeoJSON classification, a DICOM segment."""

    id: int
    model: str
    label: str
    class_index: int
    colour: str  # "#rrggbb"


@dataclass
class Result:
    """One segmentation model's ok result on one image."""

    record: ImageRecord
    model: str
    entry: ModelEntry
    categories: list[Category]  # class 1 first
    out: Path

    @property
    def run_id(self) -> str | None:
        return self.record.producer(self.model)

    def mask(self) -> np.ndarray:
        """The mask (H, W) at the record's size. Raises Unexported."""
        path = self.out / str(self.entry.mask)
        try:
            with Image.open(path) as im:
                mask = np.asarray(im)
        except _READ_ERRORS as err:
            raise Unexported(f"mask {path} cannot be read: {err}") from err
        if mask.ndim != 2 or list(mask.shape) != list(self.record.size or []):
            raise Unexported(f"mask {path} is {mask.shape[::-1]} but the record says the image is "
                             f"{(self.record.size or [])[::-1]} (width, height)")
        return mask

    def probabilities(self) -> np.ndarray | None:
        """The saved probability map (C, H, W), or None when the run did not save one. Raises Unexported."""
        if not self.entry.probability_map:
            return None
        path = self.out / self.entry.probability_map
        try:
            with np.load(path) as npz:
                probs = npz["probabilities"]
        except (OSError, ValueError, KeyError) as err:
            raise Unexported(f"probability map {path} cannot be read: {err}") from err
        if probs.ndim != 3 or list(probs.shape[1:]) != list(self.record.size or []):
            raise Unexported(f"probability map {path} has shape {probs.shape}, not (C, {self.record.size})")
        return probs

    def class_probability(self, probs: np.ndarray, class_index: int) -> np.ndarray:
        """The probability of `class_index` per pixel (binary maps hold the foreground only)."""
        return probs[0] if probs.shape[0] == 1 else probs[class_index]


def check_out(out: Path) -> None:
    """Raises UsageError when `out` is not a legitseg output folder."""
    if not out.is_dir() or not ((out / OUT_MARKER).exists() or (out / RECORDS).is_dir()):
        raise UsageError(f"{out} is not a legitseg output folder (no {RECORDS}/ and no {OUT_MARKER} in it)")


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        log.warning("cannot read %s (%s); its colours are not used", path, err)
        return None
    return data if isinstance(data, dict) else None


@dataclass
class OutReader:
    """OUT's records in name order, each turned into the results to export."""

    out: Path
    models: list[str] | None = None
    paths: list[Path] = field(default_factory=list)
    run_models: dict[str, dict[str, Any]] = field(default_factory=dict)  # run_id -> models part
    categories: dict[tuple[str, str], Category] = field(default_factory=dict)
    seen: set[str] = field(default_factory=set)  # models met in the records
    unreadable: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_out(self.out)
        root = self.out / RECORDS
        self.paths = sorted(p for p in root.rglob("*.json") if p.is_file()) if root.is_dir() else []
        for path in sorted((self.out / RUNS).glob("*.json")) + [self.out / "run.json"]:
            data = _read_json(path) if path.is_file() else None
            if data is not None and isinstance(data.get("models"), dict):
                self.run_models.setdefault(str(data.get("run_id", path.stem)), data["models"])
        if self.models and self.run_models:
            known = {m for models in self.run_models.values() for m in models}
            unknown = [m for m in self.models if m not in known]
            if unknown:
                raise UsageError(f"--models: {', '.join(unknown)} never ran into {self.out}; "
                                 f"its runs ran: {', '.join(sorted(known)) or 'none'}")

    def records(self) -> Iterator[ImageRecord]:
        for path in self.paths:
            try:
                yield ImageRecord.from_json(json.loads(path.read_text(encoding="utf-8")))
            except (OSError, ValueError, RecordError) as err:
                log.warning("skipping %s: not a valid record (%s)", path, err)
                self.unreadable.append(str(path.relative_to(self.out)))

    def selected(self, model: str) -> bool:
        return self.models is None or model in self.models

    def _colours(self, model: str, run_id: str | None, entry: ModelEntry) -> dict[str, str]:
        recorded = ((self.run_models.get(run_id or "") or {}).get(model) or {}).get("colors")
        if isinstance(recorded, dict):
            return {str(k): str(v) for k, v in recorded.items()}
        return dict(entry.overlay_colors or {})

    def results(self, record: ImageRecord) -> tuple[list[Result], list[tuple[str, str]]]:
        """The selected ok segmentation results of a record, and (model, why) for those that
        cannot be exported from what the record says."""
        found, problems = [], []
        for model, entry in record.models.items():
            if not self.selected(model):
                continue
            self.seen.add(model)
            if entry.task != "segmentation" or not entry.ok:
                continue
            labels = list((entry.area_fraction or {}).keys())
            if not entry.mask or not labels or not record.size:
                problems.append((model, "the record names no mask, labels or image size"))
                continue
            result = Result(record, model, entry, [], self.out)
            colours = self._colours(model, result.run_id, entry)
            for i, label in enumerate(labels, 1):
                key = (model, label)
                if key not in self.categories:
                    self.categories[key] = Category(len(self.categories) + 1, model, label, i,
                                                    colours.get(label) or hex_colour(colour(i)))
                result.categories.append(self.categories[key])
            found.append(result)
        return found, problems

    def severity(self, record: ImageRecord) -> dict[str, dict[str, Any]]:
        """The selected ok severity results of a record: grade, score and their provenance."""
        out = {}
        for model, entry in record.models.items():
            if self.selected(model) and entry.task == "severity" and entry.ok:
                self.seen.add(model)
                out[model] = {"grade": entry.grade, "score": entry.score,
                              "probabilities": entry.probabilities, "run_id": record.producer(model),
                              "weights_sha256": entry.weights_sha256}
        return out
