"""`legitseg report`: one self-contained HTML file describing an output folder (OUT).

Run provenance (run.json), a summary per model (ok/failed counts, area-fraction
distribution, grade histogram), a contact sheet of thumbnails (the photograph with each
segmentation mask tinted over it, embedded as small base64 JPEGs), the failed images with
their errors, and relative links to the full-size masks. The page loads nothing: a
Content-Security-Policy forbids every request except `data:` images.

A photograph is used for a thumbnail only when its bytes still have the sha256 of the
record (so a tint never lands on another picture); otherwise the mask is drawn on grey
and the card says why.
"""

from __future__ import annotations

import base64
import json
import logging
import os
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import cv2
import numpy as np

from legitseg import __version__
from legitseg.errors import ImageError, UsageError
from legitseg.pipeline.decode import check_header, decode_rgb, read_bytes, sha256_bytes
from legitseg.writers import atomic_write, iter_records

log = logging.getLogger(__name__)

# Okabe & Ito's colour-blind-safe palette, label 1 first (RGB).
PALETTE = [(230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66),
           (0, 114, 178), (213, 94, 0), (204, 121, 167)]
ALPHA = 0.45
JPEG_QUALITY = 75
HISTOGRAM_BINS = 10
TEMPLATE = "report.html.j2"


def colour(label_index: int) -> tuple[int, int, int]:
    """Colour of class `label_index` (>= 1)."""
    return PALETTE[(label_index - 1) % len(PALETTE)]


def tint(rgb: np.ndarray, mask: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """The photograph with every non-zero class filled semi-transparently and outlined.

    `mask` must have the photograph's height and width. Returns a new uint8 RGB array.
    """
    if rgb.shape[:2] != mask.shape[:2]:
        raise ValueError(f"mask {mask.shape[:2]} and photograph {rgb.shape[:2]} differ in size")
    out = rgb.astype(np.float32)
    labels = [int(v) for v in np.unique(mask) if v != 0]
    for v in labels:
        region = mask == v
        out[region] = (1 - alpha) * out[region] + alpha * np.array(colour(v), np.float32)
    out = np.clip(out + 0.5, 0, 255).astype(np.uint8)
    for v in labels:
        contours, _ = cv2.findContours((mask == v).astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, colour(v), 1)
    return out


def _fit(h: int, w: int, size: int) -> tuple[int, int]:
    scale = min(1.0, size / max(h, w))
    return max(1, round(h * scale)), max(1, round(w * scale))


def _jpeg_uri(rgb: np.ndarray) -> str:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise ImageError("OpenCV could not encode a thumbnail")
    return "data:image/jpeg;base64," + base64.b64encode(buf.tobytes()).decode("ascii")


def find_photograph(record: dict, bases: list[Path]) -> tuple[np.ndarray | None, str | None]:
    """Decoded upright RGB of the record's image, or (None, why not)."""
    image = record.get("image")
    if not isinstance(image, str):
        return None, "the record names no photograph"
    path = Path(image)
    candidates = [path] if path.is_absolute() else [path] + [b / path for b in bases]
    for candidate in candidates:
        if not candidate.is_file():
            continue
        try:
            data = read_bytes(candidate)
            if record.get("sha256") and sha256_bytes(data) != record["sha256"]:
                return None, f"{candidate} changed since the run (sha256 differs)"
            return decode_rgb(data, check_header(data, 1 << 40)), None
        except ImageError as err:
            return None, f"{candidate}: {err}"
    return None, f"photograph {image} not found"


def thumbnails(record: dict, out: Path, models: list[str], size: int, bases: list[Path]) -> dict[str, Any]:
    """One tinted JPEG (data URI) per segmentation model of the record, or the photograph alone."""
    rgb, why = find_photograph(record, bases)
    shape = tuple(record.get("size") or ()) or (rgb.shape[:2] if rgb is not None else None)
    result: dict[str, Any] = {"note": why, "images": []}
    if shape is None:
        return result
    h, w = _fit(shape[0], shape[1], size)
    base = (cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA) if rgb is not None
            else np.full((h, w, 3), 128, np.uint8))
    drawn = False
    for model in models:
        entry = (record.get("models") or {}).get(model) or {}
        if entry.get("task") != "segmentation" or entry.get("status") != "ok" or not entry.get("mask"):
            continue
        mask = cv2.imread(str(out / entry["mask"]), cv2.IMREAD_UNCHANGED)
        if mask is None:
            result["images"].append({"model": model, "uri": None, "note": f"mask {entry['mask']} cannot be read"})
            continue
        small = cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)
        result["images"].append({"model": model, "uri": _jpeg_uri(tint(base, small)), "note": None})
        drawn = True
    if not drawn and rgb is not None:
        result["images"].append({"model": None, "uri": _jpeg_uri(base), "note": None})
    return result


def _link(target: Path, report_dir: Path) -> str:
    return quote(Path(os.path.relpath(target, report_dir)).as_posix())


def _histogram(values: list[float], lo: float, hi: float, bins: int) -> list[dict[str, Any]]:
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    top = max(1, int(counts.max(initial=0)))
    return [{"lo": float(edges[i]), "hi": float(edges[i + 1]), "count": int(c), "pct": round(100 * c / top)}
            for i, c in enumerate(counts)]


def model_summaries(records: list[dict], models: list[str]) -> list[dict[str, Any]]:
    summaries = []
    for model in models:
        entries = [(r.get("models") or {}).get(model) for r in records]
        entries = [e for e in entries if isinstance(e, dict)]
        status = Counter(e.get("status", "failed") for e in entries)
        ok = [e for e in entries if e.get("status") == "ok"]
        task = next((e.get("task") for e in entries if e.get("task")), "?")
        s: dict[str, Any] = {"name": model, "task": task, "ok": status.get("ok", 0),
                             "failed": sum(n for k, n in status.items() if k != "ok"),
                             "absent": len(records) - len(entries), "labels": [], "grades": []}
        if task == "segmentation":
            labels: dict[str, list[float]] = {}
            for e in ok:
                for label, value in (e.get("area_fraction") or {}).items():
                    labels.setdefault(label, []).append(float(value))
            for i, (label, values) in enumerate(labels.items(), 1):
                hi = max(0.01, float(np.max(values)))
                s["labels"].append({
                    "name": label, "colour": "#{:02x}{:02x}{:02x}".format(*colour(i)), "n": len(values),
                    "min": float(np.min(values)), "median": float(np.median(values)),
                    "mean": float(np.mean(values)), "max": float(np.max(values)),
                    "histogram": _histogram(values, 0.0, hi, HISTOGRAM_BINS)})
        elif task == "severity":
            grades = [int(e["grade"]) for e in ok if isinstance(e.get("grade"), int)]
            k = max([len(e.get("probabilities") or []) for e in ok] + [max(grades, default=-1) + 1])
            counts = Counter(grades)
            top = max(counts.values(), default=1)
            s["grades"] = [{"grade": g, "count": counts.get(g, 0), "pct": round(100 * counts.get(g, 0) / top)}
                           for g in range(k)]
            scores = [float(e["score"]) for e in ok if isinstance(e.get("score"), int | float)]
            s["score_mean"] = float(np.mean(scores)) if scores else None
        summaries.append(s)
    return summaries


def _result_text(entry: dict) -> str:
    if entry.get("status") != "ok":
        return f"failed: {entry.get('error') or 'no reason recorded'}"
    if entry.get("task") == "severity":
        score = entry.get("score")
        return f"grade {entry.get('grade')}" + (f", score {score:.2f}" if isinstance(score, int | float) else "")
    areas = entry.get("area_fraction") or {}
    return ", ".join(f"{k} {100 * v:.1f}%" for k, v in areas.items()) or "ok"


def build_context(out: Path, dest: Path, max_thumbnails: int, thumbnail_size: int) -> dict[str, Any]:
    if not out.is_dir() or not (out / "records").is_dir():
        raise UsageError(f"{out} is not a legitseg output folder (no records/ folder in it)")
    try:
        run = json.loads((out / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        log.warning("%s: no readable run.json (%s); provenance comes from the records only", out, err)
        run = {}
    records = [r for r in iter_records(out) if isinstance(r.get("name"), str)]
    models: list[str] = list((run.get("models") or {}).keys())
    for r in records:
        models += [m for m in (r.get("models") or {}) if m not in models]
    seg_models = [m for m in models if any(((r.get("models") or {}).get(m) or {}).get("task") == "segmentation"
                                          for r in records)]
    manifest = run.get("manifest") or {}
    bases = [out.resolve().parent, Path(manifest["path"]).parent] if manifest.get("path") else [out.resolve().parent]
    report_dir = dest.resolve().parent
    cards, rows = [], []
    for i, r in enumerate(records):
        item = {
            "name": r["name"], "image": r.get("image"), "status": r.get("status", "?"), "error": r.get("error"),
            "results": [{"model": m, "text": _result_text(e),
                         "mask": _link(out.resolve() / e["mask"], report_dir) if e.get("mask") else None}
                        for m, e in (r.get("models") or {}).items() if isinstance(e, dict)],
        }
        if i < max_thumbnails:
            item["thumbs"] = thumbnails(r, out, seg_models, thumbnail_size, bases)
            cards.append(item)
        else:
            rows.append(item)
    legend = [{"model": s["name"], "labels": s["labels"]} for s in model_summaries(records, seg_models)]
    return {
        "title": f"legitseg report: {out.resolve().name}",
        "out": str(out.resolve()), "generated": datetime.now().astimezone().isoformat(timespec="seconds"),
        "legitseg": __version__, "run": run, "manifest": manifest,
        "arguments": json.dumps(run.get("arguments") or {}),
        "run_ids": Counter(str(r.get("run_id", "unknown")) for r in records).most_common(),
        "summaries": model_summaries(records, models), "legend": legend,
        "cards": cards, "rows": rows, "images": len(records),
        "failed": [item for item in cards + rows if item["status"] != "ok"],
        "max_thumbnails": max_thumbnails,
    }


def render(context: dict[str, Any]) -> str:
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("legitseg", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    return env.get_template(TEMPLATE).render(**context)


def write_report(out: Path, dest: Path, max_thumbnails: int = 500, thumbnail_size: int = 192) -> dict[str, int]:
    """Write the HTML report of OUT to `dest` atomically; return counts. Raises UsageError, RuntimeFailure."""
    context = build_context(out, dest, max_thumbnails, thumbnail_size)
    html = render(context).encode("utf-8")
    atomic_write(dest, html)
    return {"images": context["images"], "thumbnails": len(context["cards"]), "bytes": len(html)}
