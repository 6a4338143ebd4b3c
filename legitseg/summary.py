"""`legitseg summary OUT`: rebuild scores.jsonl/csv from the records and describe what OUT holds.

Reads only what runs wrote (records, run files), never images or models. Holds OUT's
lock like a run (exit 5 while a run, or any shard of one, is writing), so the rebuilt
summaries are those of a quiet folder.
"""

from __future__ import annotations

import errno
import json
import logging
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from legitseg.errors import RuntimeFailure, UsageError
from legitseg.images.sources import OUT_MARKER
from legitseg.output.lock import OutputLock
from legitseg.output.records import ImageRecord
from legitseg.output.writers import (
    MASKS,
    PROBABILITIES,
    RECORDS,
    RUNS,
    read_run_files,
    rebuild_summaries,
    scan_records,
)

log = logging.getLogger(__name__)
RECENT_RUNS = 5  # runs listed in the text form; --json lists them all


def _stats(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "mean": statistics.fmean(values), "median": statistics.median(values),
            "min": min(values), "max": max(values)}


@dataclass
class ModelSummary:
    task: str
    ok: int = 0
    failed: int = 0
    failed_by_kind: dict[str, int] = field(default_factory=dict)
    areas: dict[str, list[float]] = field(default_factory=dict)
    scores: list[float] = field(default_factory=list)
    grades: dict[int, int] = field(default_factory=dict)
    referred: int | None = None  # images the refer policy referred; None without a policy
    uncertainty: dict[str, list[float]] = field(default_factory=dict)  # measure -> values

    def add(self, entry) -> None:
        if entry.status == "inadequate":  # not run: the quality policy skipped the image
            self.failed_by_kind["inadequate (not run)"] = self.failed_by_kind.get("inadequate (not run)", 0) + 1
            return
        if not entry.ok:
            self.failed += 1
            kind = entry.error_kind or "unknown"
            self.failed_by_kind[kind] = self.failed_by_kind.get(kind, 0) + 1
            return
        self.ok += 1
        for label, value in (entry.area_fraction or {}).items():
            if isinstance(value, int | float):
                self.areas.setdefault(label, []).append(float(value))
        if isinstance(entry.score, int | float):
            self.scores.append(float(entry.score))
        if isinstance(entry.grade, int):
            self.grades[entry.grade] = self.grades.get(entry.grade, 0) + 1
        if isinstance(entry.refer, bool):
            self.referred = (self.referred or 0) + entry.refer
        for measure, value in (entry.uncertainty or {}).items():
            if measure not in ("band_width", "members") and isinstance(value, int | float):
                self.uncertainty.setdefault(measure, []).append(float(value))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"task": self.task, "ok": self.ok, "failed": self.failed,
                               "failed_by_kind": dict(sorted(self.failed_by_kind.items()))}
        if self.areas:
            out["area_fraction_stats"] = {label: _stats(v) for label, v in self.areas.items()}
        if self.scores:
            out["score"] = _stats(self.scores)
        if self.grades:
            out["grades"] = {str(g): n for g, n in sorted(self.grades.items())}
        if self.referred is not None:
            out["referred"] = self.referred
        if self.uncertainty:
            out["uncertainty_stats"] = {m: _stats(v) for m, v in self.uncertainty.items()}
        return out


def summarise_records(records: list[ImageRecord]) -> dict[str, ModelSummary]:
    models: dict[str, ModelSummary] = {}
    for record in records:
        for name, entry in record.models.items():
            models.setdefault(name, ModelSummary(entry.task)).add(entry)
    return dict(sorted(models.items()))


def read_runs(out: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The run files under OUT/runs/ (oldest first, by start time), and those that cannot be read."""
    files, bad = read_run_files(out)
    unreadable = [str(path.relative_to(out)) for path in bad]
    runs = [{"run_id": data.get("run_id", path.stem), "status": data.get("status"),
             "shard": data.get("shard"), "engine": data.get("engine", "local"),
             "started": data.get("started"), "ended": data.get("ended"),
             "device": data.get("device"), "counts": data.get("counts", {})} for path, data in files]
    runs.sort(key=lambda r: (str(r["started"] or ""), str(r["run_id"])))
    return runs, unreadable


def summary(out: Path) -> dict[str, Any]:
    """Rebuild OUT's scores.jsonl/csv from its records and return what OUT holds.

    A read-only OUT (an archive, a read-only mount) is described from its records without
    rebuilding scores.*: `scores_rebuilt` is then False and one warning says so.
    Raises UsageError (exit 2) when OUT is not a legitseg output folder, OutputLocked
    (exit 5) while a run holds it, RuntimeFailure (exit 4) when writing fails otherwise
    (a full disk: the summary must not pass for complete).
    """
    if not (out / OUT_MARKER).exists() and not (out / RECORDS).is_dir():
        raise UsageError(f"{out} is not a legitseg output folder (no {RECORDS}/ and no {OUT_MARKER}); "
                         "give the -o folder of a `legitseg run`")
    try:
        with OutputLock(out):
            # `computed` keeps meaning "computed by the latest run into OUT", as the run left it.
            scan = rebuild_summaries(out, latest_run_id(out))
        rebuilt = True
    except RuntimeFailure as err:
        if not _read_only(err):
            raise
        # Nothing can write to a folder we may not write to either, so the records are stable.
        log.warning("%s is read-only: scores.jsonl and scores.csv were not rebuilt (%s)", out, err)
        scan = scan_records(out)
        rebuilt = False
    runs, bad_runs = read_runs(out)
    records = scan.records
    files = {name: str(out / name) for name in ("scores.jsonl", "scores.csv")
             if rebuilt or (out / name).is_file()}
    if (out / "run.json").is_file():
        files["run.json"] = str(out / "run.json")
    for what in (MASKS, PROBABILITIES):
        if (out / what).is_dir():
            files[what] = str(out / what)
    return {
        "out": str(out),
        "images": len(records),
        "images_ok": sum(r.ok for r in records),
        "images_failed": sum(r.failed for r in records),
        "models": {name: m.to_json() for name, m in summarise_records(records).items()},
        "unreadable_records": scan.unreadable,
        "runs": runs,
        "unreadable_runs": bad_runs,
        "files": files,
        "scores_rebuilt": rebuilt,
        **quality_counts(records),
    }


def quality_counts(records: list[ImageRecord]) -> dict[str, Any]:
    """{"quality": adequate / inadequate / not measured, inadequate images by reason}, only when a
    record has a verdict (docs/quality.md); {} otherwise, so summaries without a policy stay as they were."""
    judged = [r.quality for r in records if isinstance(r.quality, dict)]
    if not judged:
        return {}
    reasons: dict[str, int] = {}
    for q in judged:
        for name in dict.fromkeys(x.get("reason") for x in q.get("reasons") or [] if isinstance(x, dict)):
            reasons[str(name)] = reasons.get(str(name), 0) + 1
    return {"quality": {"adequate": sum(q.get("adequate") is True for q in judged),
                        "inadequate": sum(q.get("adequate") is False for q in judged),
                        "not_measured": len(records) - len(judged),
                        "skipped": sum(r.status == "inadequate" for r in records),
                        "by_reason": dict(sorted(reasons.items()))}}


def latest_run_id(out: Path) -> str | None:
    """The run id run.json names (the latest run into OUT), or None when it cannot be read."""
    try:
        run_id = json.loads((out / "run.json").read_text(encoding="utf-8")).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None
    return run_id if isinstance(run_id, str) else None


def _read_only(err: RuntimeFailure) -> bool:
    cause = err.__cause__
    return isinstance(cause, OSError) and cause.errno in (errno.EROFS, errno.EACCES, errno.EPERM)


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _figures(s: dict[str, float], keys: tuple[str, ...]) -> str:
    return ", ".join(f"{k} {_fmt(s[k])}" for k in keys)


def render(data: dict[str, Any]) -> list[str]:
    """The text form of `summary()`: plain lines, never wrapped, fit for cron mail and pipes."""
    lines = [f"legitseg summary of {data['out']}",
             f"images: {data['images']} ({data['images_ok']} ok, {data['images_failed']} failed)"
             f", unreadable records: {len(data['unreadable_records'])}"]
    lines += [f"  unreadable: {p}" for p in data["unreadable_records"][:20]]
    for key, path in data["files"].items():
        lines.append(f"{key}: {path}")
    for name, m in data["models"].items():
        kinds = ", ".join(f"{k} {n}" for k, n in m["failed_by_kind"].items())
        lines.append(f"model {name} ({m['task']}): {m['ok']} ok, {m['failed']} failed"
                     + (f" ({kinds})" if kinds else ""))
        for label, s in m.get("area_fraction_stats", {}).items():
            lines.append(f"  area_fraction {label}: {_figures(s, ('mean', 'median', 'min', 'max'))}")
        if "score" in m:
            lines.append(f"  score: {_figures(m['score'], ('mean', 'median', 'min', 'max'))}")
        if "grades" in m:
            lines.append("  grades: " + ", ".join(f"{g}: {n}" for g, n in m["grades"].items()))
        if "referred" in m:
            lines.append(f"  referred: {m['referred']} of {m['ok']} ok")
        for measure, s in m.get("uncertainty_stats", {}).items():
            lines.append(f"  uncertainty {measure}: {_figures(s, ('mean', 'median', 'max'))}")
    if "quality" in data:
        q = data["quality"]
        lines.append(f"quality: {q['adequate']} adequate, {q['inadequate']} inadequate ({q['skipped']} not run), "
                     f"{q['not_measured']} not measured" + "".join(f"; {k} {n}" for k, n in q["by_reason"].items()))
    runs = data["runs"]
    lines.append(f"runs: {len(runs)} under {Path(data['out']) / RUNS}"
                 + (f", unreadable: {len(data['unreadable_runs'])}" if data["unreadable_runs"] else ""))
    for run in runs[-RECENT_RUNS:]:
        c = run["counts"] or {}
        where = f" shard {run['shard']}" if run.get("shard") else ""
        lines.append(f"  {run['run_id']} {run['status']}{where} ({run['engine']}): "
                     f"{c.get('processed', 0)} processed, {c.get('skipped', 0)} skipped, "
                     f"{c.get('failed', 0)} failed")
    return lines
