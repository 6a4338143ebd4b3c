"""`legitseg report`: one self-contained HTML file describing an output folder (OUT).

Run provenance (run.json), a summary per model (ok/failed counts, area-fraction
distribution, grade histogram), a contact sheet of thumbnails (the overlay `run --overlay`
wrote, or else the photograph with each segmentation mask tinted over it, embedded as small
base64 JPEGs), the failed images with their errors, and relative links to the full-size
masks. The page loads nothing: a Content-Security-Policy forbids every request except
`data:` images. Records are read as `records.ImageRecord`s; run.json (not a record) as JSON.

A photograph is used for a thumbnail only when its bytes still have the sha256 of the record
(so a tint never lands on another picture); otherwise the mask is drawn on grey, and the card says why.
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

from legitseg._version import __version__
from legitseg.errors import ImageError, UsageError
from legitseg.images.decode import check_header, decode_rgb, read_bytes, sha256_bytes
from legitseg.images.sources import OUT_MARKER
from legitseg.inference import uncertainty
from legitseg.output.overlay import ALPHA, PALETTE, Style, colour, hex_colour, tint
from legitseg.output.records import ImageRecord, ModelEntry
from legitseg.output.writers import RECORDS, atomic_write, read_run_files, scan_records
from legitseg.report_quality import inadequate_items

log = logging.getLogger(__name__)

__all__ = ["ALPHA", "PALETTE", "colour", "tint", "write_report"]  # the drawing lives in overlay.py
JPEG_QUALITY = 75
HISTOGRAM_BINS = 10
TEMPLATE = "report.html.j2"


def _fit(h: int, w: int, size: int) -> tuple[int, int]:
    scale = min(1.0, size / max(h, w))
    return max(1, round(h * scale)), max(1, round(w * scale))


def _jpeg_uri(rgb: np.ndarray) -> str:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise ImageError("OpenCV could not encode a thumbnail")
    return "data:image/jpeg;base64," + base64.b64encode(buf.tobytes()).decode("ascii")


def find_photograph(record: ImageRecord, bases: list[Path]) -> tuple[np.ndarray | None, str | None]:
    """Decoded upright RGB of the record's image, or (None, why not)."""
    path = Path(record.image)
    candidates = [path] if path.is_absolute() else [path] + [b / path for b in bases]
    for candidate in candidates:
        if not candidate.is_file():
            continue
        try:
            data = read_bytes(candidate)
            if record.sha256 and sha256_bytes(data) != record.sha256:
                return None, f"{candidate} changed since the run (sha256 differs)"
            return decode_rgb(data, check_header(data, 1 << 40)), None
        except ImageError as err:
            return None, f"{candidate}: {err}"
    return None, f"photograph {record.image} not found"


def _overlay_thumbnail(out: Path, entry: ModelEntry, size: int) -> np.ndarray | None:
    """The overlay `run --overlay` wrote for this entry, shrunk; None when there is none (or unreadable)."""
    if not entry.overlay:
        return None
    drawn = cv2.imread(str(out / entry.overlay), cv2.IMREAD_COLOR)
    if drawn is None:
        log.warning("overlay %s cannot be read; the thumbnail is drawn from the mask", out / entry.overlay)
        return None
    h, w = _fit(drawn.shape[0], drawn.shape[1], size)
    return cv2.cvtColor(cv2.resize(drawn, (w, h), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB)


def _drawable(record: ImageRecord, model: str) -> ModelEntry | None:
    entry = record.models.get(model)
    if entry is None or entry.task != "segmentation" or not entry.ok or not entry.mask:
        return None
    return entry


def _parse_hex(value: Any) -> tuple[int, int, int] | None:
    if isinstance(value, str) and len(value) == 7 and value.startswith("#"):
        try:
            return tuple(int(value[i:i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]
        except ValueError:
            return None
    return None


def style_from_hex(model: str, colors: dict[str, Any]) -> Style:
    """A Style from label -> "#rrggbb" in class order (as run.json and records keep them)."""
    parsed = {k: c for k, v in colors.items() if (c := _parse_hex(v)) is not None}
    return Style.from_labels(model, "segmentation", ["background", *colors], parsed)


def overlay_style(record: ImageRecord, model: str, entry: ModelEntry, latest: Style,
                  latest_run: str | None) -> Style | None:
    """The colours `entry`'s overlay was drawn with, or None when they are unknown.

    Records keep them beside the overlay. Older records do not: their overlay was drawn by the
    run that computed the entry, so `latest` (run.json's colours) applies only when that run is
    the latest (or either is unknown, as before records named their runs).
    """
    if entry.overlay_colors:
        return style_from_hex(model, entry.overlay_colors)
    producer = record.producer(model)
    if producer is None or latest_run is None or producer == latest_run:
        return latest
    return None


def thumbnails(record: ImageRecord, out: Path, styles: dict[str, Style], size: int,
               bases: list[Path], latest_run: str | None = None) -> dict[str, Any]:
    """One thumbnail (data URI) per segmentation model of the record: its overlay file when
    `run --overlay` wrote one with known colours, else the mask tinted over the photograph (or
    over grey) in `styles`' colours. Each image names the colours it shows (`colors`)."""
    entries = {m: e for m in styles if (e := _drawable(record, m)) is not None}
    drawn_with = {m: overlay_style(record, m, e, styles[m], latest_run) if e.overlay else None
                  for m, e in entries.items()}
    shrunk = {m: _overlay_thumbnail(out, e, size) if drawn_with[m] is not None else None
              for m, e in entries.items()}
    rgb, why = (None, None)
    if not entries or any(t is None for t in shrunk.values()):
        rgb, why = find_photograph(record, bases)
    shape = tuple(record.size or ()) or (rgb.shape[:2] if rgb is not None else None)
    result: dict[str, Any] = {"note": why, "images": []}
    if shape is None:
        return result
    h, w = _fit(shape[0], shape[1], size)
    base = (cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA) if rgb is not None
            else np.full((h, w, 3), 128, np.uint8))
    drawn = False
    for model, entry in entries.items():
        if shrunk[model] is not None:
            result["images"].append({"model": model, "uri": _jpeg_uri(shrunk[model]), "note": None,
                                     "colors": drawn_with[model].hex_colours()})
            drawn = True
            continue
        mask = cv2.imread(str(out / entry.mask), cv2.IMREAD_UNCHANGED)
        if mask is None:
            result["images"].append({"model": model, "uri": None, "note": f"mask {entry.mask} cannot be read"})
            continue
        small = cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)
        result["images"].append({"model": model, "uri": _jpeg_uri(tint(base, small, colours=styles[model].colours)),
                                 "note": None, "colors": styles[model].hex_colours()})
        drawn = True
    if not drawn and rgb is not None:
        result["images"].append({"model": None, "uri": _jpeg_uri(base), "note": None})
    return result


def legend(cards: list[dict[str, Any]], styles: dict[str, Style]) -> list[dict[str, Any]]:
    """Per segmentation model, each set of colours its thumbnails show, with how many.

    One set (the usual case) reads as before. Overlays drawn before a `colors:` change keep
    their colours, so a model can show several sets: each gets a letter, and every thumbnail
    in such a model names its letter, so a swatch never describes a thumbnail it does not match.
    """
    out = []
    for model, style in styles.items():
        sets: dict[tuple, dict[str, Any]] = {}
        for card in cards:
            for t in card["thumbs"]["images"]:
                if t.get("model") == model and t.get("colors") is not None:
                    key = tuple(t["colors"].items())
                    entry = sets.setdefault(key, {"colors": t["colors"], "images": 0, "thumbs": []})
                    entry["images"] += 1
                    entry["thumbs"].append(t)
        if not sets:
            sets[()] = {"colors": style.hex_colours(), "images": 0, "thumbs": []}
        many = len(sets) > 1
        listed = []
        for i, entry in enumerate(sets.values()):
            tag = chr(ord("A") + i) if many and i < 26 else (str(i + 1) if many else None)
            for t in entry.pop("thumbs"):
                t["set"] = tag
            listed.append({"set": tag, "images": entry["images"],
                           "labels": [{"name": k, "colour": v} for k, v in entry["colors"].items()]})
        out.append({"model": model, "sets": listed})
    return out


def _link(target: Path, report_dir: Path) -> str:
    return quote(Path(os.path.relpath(target, report_dir)).as_posix())


def _histogram(values: list[float], lo: float, hi: float, bins: int) -> list[dict[str, Any]]:
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    top = max(1, int(counts.max(initial=0)))
    return [{"lo": float(edges[i]), "hi": float(edges[i + 1]), "count": int(c), "pct": round(100 * c / top)}
            for i, c in enumerate(counts)]


def model_summaries(records: list[ImageRecord], models: list[str], styles: dict[str, Style]) -> list[dict[str, Any]]:
    summaries = []
    for model in models:
        entries = [e for r in records if (e := r.models.get(model)) is not None]
        ok = [e for e in entries if e.ok]
        task = next((e.task for e in entries if e.task), "?")
        s: dict[str, Any] = {"name": model, "task": task, "ok": len(ok), "failed": sum(e.status == "failed" for e in entries),
                             "absent": len(records) - len(entries), "labels": [], "grades": []}
        if task == "segmentation":
            labels: dict[str, list[float]] = {}
            for e in ok:
                for label, value in (e.area_fraction or {}).items():
                    labels.setdefault(label, []).append(float(value))
            style = styles.get(model)
            for i, (label, values) in enumerate(labels.items(), 1):
                hi = max(0.01, float(np.max(values)))
                s["labels"].append({
                    "name": label, "colour": hex_colour(style.colour_of(i) if style else colour(i)), "n": len(values),
                    "min": float(np.min(values)), "median": float(np.median(values)),
                    "mean": float(np.mean(values)), "max": float(np.max(values)),
                    "histogram": _histogram(values, 0.0, hi, HISTOGRAM_BINS)})
        elif task == "severity":
            grades = [e.grade for e in ok if isinstance(e.grade, int)]
            k = max([len(e.probabilities or []) for e in ok] + [max(grades, default=-1) + 1])
            counts = Counter(grades)
            top = max(counts.values(), default=1)
            s["grades"] = [{"grade": g, "count": counts.get(g, 0), "pct": round(100 * counts.get(g, 0) / top)}
                           for g in range(k)]
            scores = [float(e.score) for e in ok if isinstance(e.score, int | float)]
            s["score_mean"] = float(np.mean(scores)) if scores else None
        summaries.append(s)
    return summaries


def _result_text(entry: ModelEntry) -> str:
    if not entry.ok:
        return f"failed: {entry.error or 'no reason recorded'}"
    if entry.task == "severity":
        score = entry.score
        return f"grade {entry.grade}" + (f", score {score:.2f}" if isinstance(score, int | float) else "")
    return ", ".join(f"{k} {100 * v:.1f}%" for k, v in (entry.area_fraction or {}).items()) or "ok"


def _styles(run: dict[str, Any], records: list[ImageRecord], models: list[str]) -> dict[str, Style]:
    """Colours per segmentation model: as the latest run drew them (run.json), else the palette."""
    styles = {}
    for model in models:
        entry = next((e for r in records if (e := r.models.get(model)) and e.task == "segmentation"), None)
        if entry is None:
            continue
        recorded = ((run.get("models") or {}).get(model) or {}).get("colors")
        labels = ["background", *(recorded or (entry.area_fraction or {}))]
        colours = {k: tuple(int(v[i:i + 2], 16) for i in (1, 3, 5))
                   for k, v in (recorded or {}).items() if isinstance(v, str) and len(v) == 7}
        styles[model] = Style.from_labels(model, "segmentation", labels, colours)
    return styles


def runs_by_id(out: Path, run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """run_id -> provenance of every run file under OUT/runs/, and run.json's (the latest run)."""
    files, _ = read_run_files(out)
    runs = {str(data.get("run_id") or path.stem): data for path, data in files}
    if run.get("run_id") and str(run["run_id"]) not in runs:
        runs[str(run["run_id"])] = run
    return runs


def _sha_text(value: Any) -> str:
    """A weights sha256 as shown: an ensemble's list joined, an unknown one said so."""
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return str(value) if value else "unknown"


def provenance(records: list[ImageRecord], run_files: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Every run that computed a result in `records`, and every model file behind them.

    Results are credited to the run that computed each model entry (`ImageRecord.producer`), not
    to the record's last writer, so results of several runs into one OUT each keep their run and
    their weights. A weights path comes from the run file of a run that used that sha256.
    """
    credited: Counter[str] = Counter()
    files: dict[tuple[str, str], dict[str, Any]] = {}
    for r in records:
        for model, e in r.models.items():
            run_id = r.producer(model) or "unknown"
            credited[run_id] += 1
            sha = _sha_text(e.weights_sha256)
            info = files.setdefault((model, sha), {"model": model, "sha256": sha, "results": 0, "runs": []})
            info["results"] += 1
            if run_id not in info["runs"]:
                info["runs"].append(run_id)
    runs = []
    for run_id, n in credited.items():
        data = run_files.get(run_id)
        runs.append({"run_id": run_id, "results": n, "found": data is not None, **{
            k: (data or {}).get(k) for k in ("status", "started", "ended", "device")},
            "legitseg": ((data or {}).get("versions") or {}).get("legitseg"),
            "manifest_sha256": ((data or {}).get("manifest") or {}).get("sha256")})
    runs.sort(key=lambda r: (str(r["started"] or ""), r["run_id"]))
    for info in files.values():
        paths: list[str] = []
        for run_id in info["runs"]:
            m = ((run_files.get(run_id) or {}).get("models") or {}).get(info["model"]) or {}
            w = m.get("weights")
            for path in (w if isinstance(w, list) else [w] if w else []):
                if _sha_text(m.get("weights_sha256")) == info["sha256"] and str(path) not in paths:
                    paths.append(str(path))
        info["weights"] = paths
    return {"runs": runs, "weights": sorted(files.values(), key=lambda f: (f["model"], f["sha256"]))}


def build_context(out: Path, dest: Path, max_thumbnails: int, thumbnail_size: int) -> dict[str, Any]:
    # An OUT is what any run leaves, images or not (a run over an empty folder makes one
    # with its marker and no record): a report of zero images is a valid report.
    if not out.is_dir() or not ((out / OUT_MARKER).exists() or (out / RECORDS).is_dir()):
        raise UsageError(f"{out} is not a legitseg output folder (no {RECORDS}/ and no {OUT_MARKER} in it)")
    try:
        run = json.loads((out / "run.json").read_text(encoding="utf-8"))
        if not isinstance(run, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        log.warning("%s: no readable run.json (%s); provenance comes from the records only", out, err)
        run = {}
    # Images a model's refer policy referred come first (docs/uncertainty.md); a stable sort.
    records = sorted(scan_records(out).records, key=lambda r: not uncertainty.referred(r))
    models: list[str] = list((run.get("models") or {}).keys())
    for r in records:
        models += [m for m in r.models if m not in models]
    styles = _styles(run, records, models)
    seg_models = [m for m in models if m in styles]
    manifest = run.get("manifest") or {}
    bases = [out.resolve().parent, Path(manifest["path"]).parent] if manifest.get("path") else [out.resolve().parent]
    report_dir = dest.resolve().parent
    latest_run = str(run["run_id"]) if run.get("run_id") else None
    cards, rows = [], []
    for i, r in enumerate(records):
        item = {
            "name": r.name, "image": r.image, "status": r.status or "?", "error": r.error, "quality": r.quality,
            "referred": uncertainty.referred(r),
            "results": [{"model": m, "text": _result_text(e) + uncertainty.referral_text(e), "run_id": r.producer(m),
                         "mask": _link(out.resolve() / e.mask, report_dir) if e.mask else None}
                        for m, e in r.models.items()],
        }
        if i < max_thumbnails:
            item["thumbs"] = thumbnails(r, out, {m: styles[m] for m in seg_models}, thumbnail_size, bases,
                                        latest_run)
            cards.append(item)
        else:
            rows.append(item)
    return {
        "out_name": out.resolve().name,
        "out": str(out.resolve()), "generated": datetime.now().astimezone().isoformat(timespec="seconds"),
        "legitseg": __version__, "run": run, "manifest": manifest,
        "arguments": json.dumps(run.get("arguments") or {}),
        "provenance": provenance(records, runs_by_id(out, run)),
        "summaries": model_summaries(records, models, styles),
        "legend": legend(cards, {m: styles[m] for m in seg_models}),
        "cards": cards, "rows": rows, "images": len(records),
        "referred": sum(uncertainty.referred(r) for r in records),
        "failed": [item for item in cards + rows if item["status"] not in ("ok", "inadequate")],
        "inadequate": inadequate_items(cards + rows),
        "max_thumbnails": max_thumbnails,
    }


def render(context: dict[str, Any]) -> str:
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("legitseg", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    # Names come from users' file names and manifests: a right-to-left override in one
    # (`rtl\u202egpj.exe.jpg`) must not reorder what follows it. Text is wrapped in <bdi>
    # in the template; attributes, which cannot hold markup, in the same isolate characters.
    env.filters["isolate"] = lambda value: f"\u2068{value}\u2069"
    return env.get_template(TEMPLATE).render(**context)


def write_report(out: Path, dest: Path, max_thumbnails: int = 500, thumbnail_size: int = 192) -> dict[str, int]:
    """Write the HTML report of OUT to `dest` atomically; return counts. Raises UsageError, RuntimeFailure."""
    context = build_context(out, dest, max_thumbnails, thumbnail_size)
    html = render(context).encode("utf-8")
    atomic_write(dest, html)
    return {"images": context["images"], "thumbnails": len(context["cards"]), "bytes": len(html)}
