"""Everything legitseg writes under OUT (SPEC section 5), each file atomically.

Every file is written under a temporary name in its own folder, flushed to disk
and renamed into place, so a reader (or a run after a SIGKILL) never sees a
partial file under a final name. The per-image record is written last: it is
the unit of completion.
"""

from __future__ import annotations

import csv
import io
import json
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from legitseg.errors import RuntimeFailure
from legitseg.pipeline.sources import Source

TMP_SUFFIX = ".legitseg-tmp"
RECORDS = "records"
MASKS = "masks"
PROBABILITIES = "probabilities"
CSV_FIELDS = (
    "image", "model", "status", "error", "mask", "probability_map",
    "area_fraction", "components", "score", "grade", "probabilities", "backend",
)


@dataclass
class ImageOutcome:
    """What became of one image: its record as written, and its rows for this run's models."""

    source: Source
    record: dict[str, Any]
    rows: list[dict[str, Any]]

    @property
    def ok(self) -> bool:
        return self.record["status"] == "ok"


def _tmp_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.{os.getpid()}-{secrets.token_hex(4)}{TMP_SUFFIX}")


def atomic_write(final: Path, data: bytes) -> None:
    """Write `data` to `final` via a temporary file in the same folder and a rename.

    OSError (disk full, read-only, permissions) becomes RuntimeFailure (exit 4);
    the temporary file is removed and an existing `final` is left untouched.
    """
    tmp = _tmp_name(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
    except OSError as err:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # the folder itself is gone or read-only: nothing left to clean
        raise RuntimeFailure(f"cannot write {final}: {err.strerror or err}") from err


def encode_png(mask: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", mask)
    if not ok:
        raise RuntimeFailure(f"OpenCV could not encode a {mask.dtype} mask of shape {mask.shape} as PNG")
    return buf.tobytes()


def encode_npz(probabilities: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, probabilities=probabilities.astype(np.float16, copy=False))
    return buf.getvalue()


def mask_path(name: str, model: str) -> str:
    return f"{MASKS}/{model}/{name}.png"


def probability_path(name: str, model: str) -> str:
    return f"{PROBABILITIES}/{model}/{name}.npz"


def record_path(out: Path, name: str) -> Path:
    return out / RECORDS / f"{name}.json"


def write_record(out: Path, name: str, record: dict[str, Any]) -> None:
    atomic_write(record_path(out, name), (json.dumps(record, indent=1, sort_keys=False) + "\n").encode())


def read_record(out: Path, name: str) -> dict[str, Any] | None:
    """The record of an earlier run, or None when there is none or it cannot be parsed."""
    try:
        data = json.loads(record_path(out, name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def iter_records(out: Path) -> Iterator[dict[str, Any]]:
    root = out / RECORDS
    if not root.is_dir():
        return
    paths = sorted(p for p in root.rglob("*.json") if p.is_file())
    for p in paths:
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # only complete records are ever renamed into place; skip foreign files
        if isinstance(data, dict) and "models" in data:
            yield data


def record_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (image, model) of a record, in the record's model order."""
    rows = []
    for model, entry in record.get("models", {}).items():
        row = {"image": record["image"], "model": model, "status": entry.get("status", "failed")}
        for key in CSV_FIELDS[3:]:
            if key in entry and entry[key] is not None:
                row[key] = entry[key]
        rows.append(row)
    return rows


def rebuild_summaries(out: Path) -> int:
    """Rewrite scores.jsonl and scores.csv from all records (never duplicated). Returns row count."""
    jsonl = io.StringIO()
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    count = 0
    for record in iter_records(out):
        for row in record_rows(record):
            jsonl.write(json.dumps(row, ensure_ascii=False) + "\n")
            writer.writerow(
                {k: json.dumps(v) if isinstance(v, dict | list) else v for k, v in row.items()}
            )
            count += 1
    atomic_write(out / "scores.jsonl", jsonl.getvalue().encode())
    atomic_write(out / "scores.csv", table.getvalue().encode())
    return count


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write(path, (json.dumps(data, indent=2) + "\n").encode())


def remove_stale_tmp(out: Path) -> int:
    """Delete temporary files left by a killed run. Call only while holding OUT's lock."""
    removed = 0
    for p in out.rglob(f"*{TMP_SUFFIX}"):
        try:
            p.unlink()
            removed += 1
        except OSError:
            pass  # vanished or not removable: it never carries a final name, so it is harmless
    return removed
