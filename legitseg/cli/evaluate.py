"""`legitseg evaluate` (scores against ground truth) and `legitseg report` (one HTML file)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from legitseg.cli.common import handles_errors, log, setup_logging, split
from legitseg.errors import EXIT_IMAGES_FAILED

QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors on stderr")]


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate)
    app.command("report")(report)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


@handles_errors
def evaluate(
    out: Annotated[Path, typer.Argument(help="Output folder of `legitseg run`")],
    ground_truth: Annotated[Path, typer.Argument(
        help="Folder with <model>/<name>.png label maps and/or severity.csv (image,grade)")],
    dest: Annotated[Path | None, typer.Option("--out", "-o",
                                              help="Where to write the results [default: OUT/evaluation]")] = None,
    models: Annotated[str | None, typer.Option("--models", help="Comma-separated models [default: all with ground truth]")] = None,
    severity_csv: Annotated[Path | None, typer.Option("--severity-csv",
                                                      help="True grades (image,grade) [default: GROUND_TRUTH/severity.csv]")] = None,
    plots: Annotated[bool, typer.Option("--plots/--no-plots", help="Write PNG plots")] = True,
    quiet: QuietOpt = False,
) -> None:
    """Dice, IoU, precision and recall per image, model and class; severity MAE, RMSE and confusion matrix.

    Exit 0 when every ground truth was scored, 1 when some are missing a prediction or
    could not be scored (listed; the rest is written), 2 for bad folders or arguments.
    """
    from legitseg.evaluate import evaluate as run_evaluation
    from legitseg.evaluate_output import write_evaluation

    setup_logging(quiet)
    ev = run_evaluation(out, ground_truth, split(models), severity_csv)
    dest = dest or out / "evaluation"
    written = write_evaluation(ev, dest, plots=plots)
    console = Console()
    console.width = max(console.width, 120)  # model names must not be cut in logs and pipes
    seg = [m for m in ev.models.values() if m.task == "segmentation"]
    if seg:
        table = Table(title="Segmentation (mean over images; mean row = mean over classes)")
        for col in ("model", "class", "images", "Dice", "IoU", "precision", "recall", "empty both"):
            table.add_column(col, justify="left" if col in ("model", "class") else "right", no_wrap=True)
        for m in seg:
            summary = m.class_summary()
            for label in m.labels:
                s = summary[label]
                table.add_row(m.model, label, str(s["dice"]["n"] + s["dice"]["undefined"]),
                              *(_fmt(s[k]["mean"]) for k in ("dice", "iou", "precision", "recall")),
                              str(s["empty_both"]))
            mean = m.mean()
            table.add_row(m.model, "[bold]mean[/]", str(len({s.image for s in m.scores})),
                          *(f"[bold]{_fmt(mean[k])}[/]" for k in ("dice", "iou", "precision", "recall")), "",
                          end_section=True)
        console.print(table)
    sev = [m for m in ev.models.values() if m.task == "severity"]
    if sev:
        table = Table(title="Severity (grades)")
        for col in ("model", "images", "MAE", "RMSE", "exact", "within +-1"):
            table.add_column(col, justify="left" if col == "model" else "right", no_wrap=True)
        for m in sev:
            s = m.severity()
            table.add_row(m.model, str(s["n"]), *(_fmt(s[k]) for k in ("mae", "rmse", "exact", "within_one")))
        console.print(table)
    for m in ev.models.values():
        for image, reason in m.missing:
            log.warning("%s: %s: missing prediction: %s", m.model, image, reason)
        for image, reason in m.errors:
            log.warning("%s: %s: not scored: %s", m.model, image, reason)
        if m.no_truth:
            log.info("%s: %d image(s) in OUT have no ground truth (listed in evaluation.json)",
                     m.model, len(m.no_truth))
    log.info("evaluation written to %s (%s)", dest, ", ".join(p.name for p in written))
    if ev.problems:
        log.warning("%d ground-truth item(s) missing a prediction or not scored", ev.problems)
        raise typer.Exit(EXIT_IMAGES_FAILED)


@handles_errors
def report(
    out: Annotated[Path, typer.Argument(help="Output folder of `legitseg run`")],
    dest: Annotated[Path | None, typer.Option("--out", "-o", help="HTML file to write [default: OUT/report.html]")] = None,
    max_thumbnails: Annotated[int, typer.Option("--max-thumbnails", min=0,
                                                help="Images shown as thumbnails; the rest are table rows")] = 500,
    thumbnail_size: Annotated[int, typer.Option("--thumbnail-size", min=32, max=1024,
                                                help="Longest side of a thumbnail, in pixels")] = 192,
    quiet: QuietOpt = False,
) -> None:
    """One self-contained HTML file: provenance, per-model summary, contact sheet, failures."""
    from legitseg.report import write_report

    setup_logging(quiet)
    dest = dest or out / "report.html"
    stats = write_report(out, dest, max_thumbnails=max_thumbnails, thumbnail_size=thumbnail_size)
    log.info("report written to %s (%d images, %d thumbnails, %.1f MB)", dest, stats["images"],
             stats["thumbnails"], dest.stat().st_size / 1e6)
    typer.echo(str(dest))
