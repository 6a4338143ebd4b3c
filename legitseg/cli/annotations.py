"""`legitseg annotations`: an OUT's results as COCO, GeoJSON or DICOM Segmentation files."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from legitseg.cli.common import err_console, handles_errors, log, setup_logging, split
from legitseg.errors import EXIT_IMAGES_FAILED


def register(app: typer.Typer) -> None:
    app.command("annotations")(annotations)


class _Progress:
    """A rich bar on a terminal; otherwise a log line every `every` seconds (and at the end)."""

    def __init__(self, quiet: bool, every: float = 10.0) -> None:
        self.quiet, self.every = quiet, every
        self.t0 = self.last = time.monotonic()
        self.bar = None
        self.task = None

    def __call__(self, done: int, total: int) -> None:
        if self.quiet:
            return
        if self.bar is None and err_console.is_terminal:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(TextColumn("[bold]annotations"), BarColumn(), MofNCompleteColumn(),
                                TimeRemainingColumn(), console=err_console)
            self.task = self.bar.add_task("annotations", total=total)
            self.bar.start()
        if self.bar is not None:
            self.bar.update(self.task, completed=done)
            return
        now = time.monotonic()
        if now - self.last >= self.every or done == total:
            self.last = now
            log.info("progress %d/%d images, %.1f img/s", done, total, done / max(now - self.t0, 1e-9))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


@handles_errors
def annotations(
    out: Annotated[Path, typer.Argument(help="Output folder of `legitseg run`")],
    fmt: Annotated[str, typer.Option("--format", "-f", help=(
        "coco (one dataset JSON), geojson (one FeatureCollection per image) or dicom-seg "
        "(one DICOM Segmentation per DICOM input and model; needs legitseg[dicom])"))],
    dest: Annotated[Path | None, typer.Option("--out", "-o", help=(
        "coco: the JSON file; geojson, dicom-seg: a folder "
        "[default: OUT/annotations/coco.json, OUT/annotations/<format>/]"))] = None,
    models: Annotated[str | None, typer.Option("--models", help="Comma-separated models [default: all]")] = None,
    polygons: Annotated[bool, typer.Option("--polygons", help=(
        "coco: polygons on pixel edges (holes joined by a cut) instead of RLE"))] = False,
    fractional: Annotated[bool, typer.Option("--fractional", help=(
        "dicom-seg: fractional segments from the saved probabilities (run --save-probabilities) "
        "instead of the binary mask"))] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors on stderr")] = False,
) -> None:
    """Connected regions of every mask as COCO, GeoJSON or DICOM-SEG, each traceable to its run and weights.

    Exit 0 when every result was exported; 1 when some could not be (a mask or source file
    missing or changed: listed, the rest is written); 2 for a bad OUT, option, destination or
    --models name, or dicom-seg without the extra; 4 when the files cannot be written; 6 when
    OUT holds nothing to export.
    """
    from legitseg.annotations.export import export

    setup_logging(quiet)
    progress = _Progress(quiet)
    try:
        stats = export(out, fmt.lower(), dest, split(models), polygons=polygons, fractional=fractional,
                       progress=progress)
    finally:
        progress.close()
    for image, model, why in stats.problems:
        log.warning("%s: %s: not exported: %s", image, model, why)
    if stats.skipped:
        log.info("%d result(s) of images that are not DICOM files have no DICOM Segmentation", stats.skipped)
    log.info("%s: %d image(s), %d result(s), %d region(s), %d file(s) written", stats.dest, stats.images,
             stats.results, stats.shapes, stats.files)
    typer.echo(str(stats.dest))
    if stats.problems:
        log.warning("%d result(s) not exported", len(stats.problems))
        raise typer.Exit(EXIT_IMAGES_FAILED)
