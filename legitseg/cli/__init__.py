"""The command line: parse, call the core, show progress, map errors to exit codes.

The only module that writes to the terminal. It imports torch only inside the
commands that need it, so `legitseg --help` and `legitseg models list` stay fast.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from legitseg import __version__
from legitseg.cli import evaluate, misc, run, summary
from legitseg.cli.models import models_app
from legitseg.errors import EXIT_SIGPIPE

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Run segmentation-models-pytorch models over folders of images.")
app.add_typer(models_app, name="models")


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"legitseg {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version_callback, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """legitseg: batch inference of smp segmentation and severity models."""


run.register(app)
misc.register(app)
evaluate.register(app)
summary.register(app)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except BrokenPipeError:
        # `legitseg run --jsonl | head` closed our stdout; not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(EXIT_SIGPIPE)

