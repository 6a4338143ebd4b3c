"""Say where a `legitseg run` put its results and summarise OUT/scores.jsonl.

    python tools/demo_summary.py OUT

Prints the paths of the masks, scores and provenance files, then one table row per
model: images ok / failed / other statuses, the mean area fraction per label
(segmentation) or the mean score and grade (severity). Standard library + rich only.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

from rich.console import Console
from rich.table import Table


def read_rows(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not a JSON object: {err}") from err
    return rows


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarise(rows: list[dict]) -> dict[str, dict]:
    """Per model: status counts, area fractions per label, severity scores and grades."""
    models: dict[str, dict] = {}
    for row in rows:
        m = models.setdefault(
            row.get("model", "?"),
            {"status": defaultdict(int), "areas": defaultdict(list), "scores": [], "grades": []},
        )
        status = row.get("status", "?")
        m["status"][status] += 1
        if status != "ok":
            continue
        area = row.get("area_fraction")
        if isinstance(area, dict):
            for label, value in area.items():
                m["areas"][label].append(float(value))
        elif isinstance(area, int | float):
            m["areas"]["foreground"].append(float(area))
        if row.get("score") is not None:
            m["scores"].append(float(row["score"]))
        if row.get("grade") is not None:
            m["grades"].append(float(row["grade"]))
    return models


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    console = Console()
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        console.print("usage: python tools/demo_summary.py OUT   (the -o folder of `legitseg run`)")
        return 2
    out = Path(argv[0])
    scores = out / "scores.jsonl"
    if not scores.is_file():
        Console(stderr=True).print(f"[red]{scores} not found[/red]: run `legitseg run ... -o {out}` first")
        return 2
    try:
        rows = read_rows(scores)
    except (OSError, ValueError) as err:
        Console(stderr=True).print(f"[red]{err}[/red]")
        return 2
    models = summarise(rows)

    console.print(f"[bold]Results in {out}[/bold]")
    for name in models:
        masks = out / "masks" / name
        if masks.is_dir():
            console.print(f"  masks ({name}): {masks}/")
    for extra in ("probabilities",):
        if (out / extra).is_dir():
            console.print(f"  {extra}: {out / extra}/")
    for fname in ("scores.jsonl", "scores.csv", "run.json"):
        if (out / fname).exists():
            console.print(f"  {fname}: {out / fname}")

    table = Table(title="Per model")
    for col in ("model", "ok", "failed", "other", "result"):
        table.add_column(col, justify="left" if col in ("model", "result") else "right")
    for name, m in models.items():
        status = dict(m["status"])
        ok, failed = status.pop("ok", 0), status.pop("failed", 0)
        other = ", ".join(f"{k} {v}" for k, v in sorted(status.items())) or "0"
        if m["scores"] or m["grades"]:
            score, grade = mean(m["scores"]), mean(m["grades"])
            parts = []
            if score is not None:
                parts.append(f"mean score {score:.2f}")
            if grade is not None:
                parts.append(f"mean grade {grade:.2f}")
            result = ", ".join(parts)
        elif m["areas"]:
            result = "mean area_fraction " + ", ".join(
                f"{label} {mean(values):.3f}" for label, values in m["areas"].items()
            )
        else:
            result = "-"
        table.add_row(name, str(ok), str(failed), other, result)
    console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
