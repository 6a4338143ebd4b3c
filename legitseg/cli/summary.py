"""`legitseg summary OUT`: rebuild scores.jsonl/csv from OUT's records and print what OUT holds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from legitseg.cli.common import handles_errors, setup_logging


def register(app: typer.Typer) -> None:
    app.command("summary")(summary)


@handles_errors
def summary(
    out: Annotated[Path, typer.Argument(help="The -o folder of a legitseg run")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors on stderr")] = False,
) -> None:
    """Rebuild OUT/scores.jsonl and scores.csv from the records; print images ok/failed per model,
    area-fraction and score statistics, grade counts, runs and unreadable records."""
    from legitseg.summary import render
    from legitseg.summary import summary as summarise

    setup_logging(quiet)
    data = summarise(out)
    if as_json:
        typer.echo(json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False))
    else:
        for line in render(data):
            typer.echo(line)
