"""`legitseg evaluate` (scores against ground truth) and `legitseg report` (one HTML file)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from legitseg.cli.common import handles_errors, log, setup_logging, split
from legitseg.errors import EXIT_IMAGES_FAILED, UsageError
from legitseg.models.describe import tsv

QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors on stderr")]


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate)
    app.command("report")(report)


METRIC_KEYS = ("dice", "iou", "precision", "recall")
SEG_COLUMNS = ("model", "class", "images", "Dice", "IoU", "precision", "recall", "empty both")
SEV_COLUMNS = ("model", "images", "MAE", "RMSE", "exact", "within +-1")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _seg_rows(seg, bold: bool) -> list[list[str]]:
    rows = []
    for m in seg:
        summary = m.class_summary()
        for label in m.labels:
            s = summary[label]
            rows.append([m.model, label, str(s["dice"]["n"] + s["dice"]["undefined"]),
                         *(_fmt(s[k]["mean"]) for k in METRIC_KEYS), str(s["empty_both"])])
        mean = m.mean()
        cells = [_fmt(mean[k]) for k in METRIC_KEYS]
        rows.append([m.model, "mean", str(len({s.image for s in m.scores})),
                     *([f"[bold]{c}[/]" for c in cells] if bold else cells), ""])
    return rows


def _print_tables(ev) -> None:
    """Rich tables on a terminal; tab-separated text (header row first) into a pipe or file,
    as `models list` does, so that no box characters reach scripts and logs."""
    seg = [m for m in ev.models.values() if m.task == "segmentation"]
    sev = [m for m in ev.models.values() if m.task == "severity"]
    sev_rows = [[m.model, str(s["n"]), *(_fmt(s[k]) for k in ("mae", "rmse", "exact", "within_one"))]
                for m in sev for s in [m.severity()]]
    if not sys.stdout.isatty():
        blocks = ([tsv(SEG_COLUMNS, _seg_rows(seg, bold=False))] if seg else []) + (
            [tsv(SEV_COLUMNS, sev_rows)] if sev else [])
        sys.stdout.write("\n".join(blocks))
        return
    console = Console()
    console.width = max(console.width, 120)  # model names must not be cut
    if seg:
        table = Table(title="Segmentation (mean over images; mean row = mean over classes)")
        for col in SEG_COLUMNS:
            table.add_column(col, justify="left" if col in ("model", "class") else "right", no_wrap=True)
        rows = _seg_rows(seg, bold=True)
        for i, row in enumerate(rows):  # a line under each model's mean row, its last
            table.add_row(*[escape(c) if j < 2 else c for j, c in enumerate(row)],
                          end_section=i + 1 == len(rows) or rows[i + 1][0] != row[0])
        console.print(table)
    if sev:
        table = Table(title="Severity (grades)")
        for col in SEV_COLUMNS:
            table.add_column(col, justify="left" if col == "model" else "right", no_wrap=True)
        for row in sev_rows:
            table.add_row(escape(row[0]), *row[1:])
        console.print(table)


@handles_errors
def evaluate(
    out: Annotated[Path, typer.Argument(help="Output folder of `legitseg run`")],
    ground_truth: Annotated[Path, typer.Argument(
        help="Folder with <model>/<name>.png label maps and/or severity.csv (image,grade)")],
    dest: Annotated[Path | None, typer.Option("--out", "-o", help=(
        "Folder for the results, replaced as a whole: new, empty or a previous evaluation "
        "[default: OUT/evaluation]"))] = None,
    models: Annotated[str | None, typer.Option("--models", help="Comma-separated models [default: all with ground truth]")] = None,
    severity_csv: Annotated[Path | None, typer.Option("--severity-csv", help=(
        "True grades (image,grade) for every severity model; when given it wins over "
        "GROUND_TRUTH/<model>.csv and GROUND_TRUTH/severity.csv"))] = None,
    allow_mixed_settings: Annotated[bool, typer.Option("--allow-mixed-settings", help=(
        "Score a model whose predictions in OUT were made with different settings as one "
        "(refused otherwise)"))] = False,
    plots: Annotated[bool, typer.Option("--plots/--no-plots", help="Write PNG plots")] = True,
    fail_below: Annotated[float, typer.Option("--fail-below", min=0.0, max=1.0, help=(
        "An image whose IoU is below this failed (the failure rate; ISIC 2018's rule)"))] = 0.65,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Seed of the bootstrap resampling (recorded)")] = 20180601,
    metadata: Annotated[Path | None, typer.Option("--metadata", help=(
        "CSV with an image column and columns to group by (--by): metrics per subgroup"))] = None,
    by: Annotated[str | None, typer.Option("--by", help="Comma-separated columns of --metadata, e.g. fitzpatrick,body_site")] = None,
    quiet: QuietOpt = False,
) -> None:
    """Dice, IoU, precision and recall per image, model and class; severity MAE, RMSE and confusion matrix.

    Exit 0 when every ground truth was scored; 1 when some are missing a prediction or
    could not be scored (listed; the rest is written); 2 for bad folders, arguments or
    ground-truth files, or predictions with mixed settings; 4 when the results cannot be
    written; 6 when a model with ground truth has nothing scored (or OUT holds no images).
    """
    from legitseg.evaluate.output import check_destination, write_evaluation
    from legitseg.evaluate.scoring import evaluate as run_evaluation
    from legitseg.evaluate.stats import StatsOptions
    from legitseg.evaluate.subgroups import read_metadata

    setup_logging(quiet)
    dest = dest or out / "evaluation"
    check_destination(out, dest)
    columns = tuple(split(by) or ())
    if (metadata is None) != (not columns):
        raise UsageError("--metadata and --by go together: the CSV and the columns to group by")
    stats = StatsOptions(fail_below=fail_below, seed=seed, by=columns,
                         metadata=read_metadata(metadata, columns) if metadata is not None else None)
    ev = run_evaluation(out, ground_truth, split(models), severity_csv, allow_mixed_settings, stats)
    nothing = ev.nothing_to_score()
    if nothing is not None and not any(m.scored for m in ev.models.values()):
        _log_problems(ev)
        raise nothing  # nothing scored at all: the previous evaluation folder stays as it was
    written = write_evaluation(ev, dest, plots=plots)
    _print_tables(ev)
    _log_problems(ev)
    log.info("evaluation written to %s (%s)", dest, ", ".join(p.name for p in written))
    if nothing is not None:
        raise nothing
    if ev.problems:
        log.warning("%d ground-truth item(s) missing a prediction or not scored", ev.problems)
        raise typer.Exit(EXIT_IMAGES_FAILED)


def _log_problems(ev) -> None:
    for m in ev.models.values():
        for image, reason in m.missing:
            log.warning("%s: %s: missing prediction: %s", m.model, image, reason)
        for image, reason in m.errors:
            log.warning("%s: %s: not scored: %s", m.model, image, reason)
        if m.no_truth:
            log.info("%s: %d image(s) in OUT have no ground truth (listed in evaluation.json)",
                     m.model, len(m.no_truth))


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
