"""The command line: parse, call the core, show progress, map errors to exit codes.

The only module that writes to the terminal. It imports torch only inside the
commands that need it, so `legitseg --help` and `legitseg models list` stay fast.
"""

from __future__ import annotations

import gc
import sys
from typing import Annotated

import typer

from legitseg._version import __version__
from legitseg.cli import evaluate, misc, run, summary, verify
from legitseg.cli.annotations import (
    register as register_annotations,  # `from legitseg.cli import annotations` gives the __future__ feature
)
from legitseg.cli.common import click_errors, exit_code_for, set_root_verbose
from legitseg.cli.models import models_app
from legitseg.errors import EXIT_USAGE

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
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
    verbose: Annotated[bool, typer.Option("--verbose", "-v",
                                          help="Debug logging, and the traceback of an unexpected error, "
                                               "for any command: legitseg -v COMMAND ...")] = False,
) -> None:
    """legitseg: batch inference of smp segmentation and severity models."""
    set_root_verbose(verbose)


run.register(app)
misc.register(app)
evaluate.register(app)
verify.register(app)
summary.register(app)
register_annotations(app)


def main() -> None:
    """Console-script entry point: usage errors are one line on stderr (cron logs keep them whole);
    whatever escapes a command (or happens before one starts) follows the error contract of
    legitseg.cli.common."""
    try:
        _main()
    finally:
        # The command is over (files closed, records durable). Python's shutdown ends with a full
        # garbage collection that walks every object torch, timm and smp made: 0.9 s of a CPU
        # run's 10 s on the 2-core machine (docs/benchmarks.md, "Start-up"). Frozen objects are
        # skipped; atexit handlers (Ray's shutdown) still run.
        gc.freeze()


def _main() -> None:
    try:
        code = app(standalone_mode=False, prog_name="legitseg")
    except click_errors.NoArgsIsHelpError as err:
        err.show()
        sys.exit(EXIT_USAGE)
    except click_errors.UsageError as err:
        where = err.ctx.command_path if err.ctx is not None else "legitseg"
        sys.stderr.write(f"legitseg: usage error: {err.format_message()} (see '{where} --help')\n")
        sys.exit(EXIT_USAGE)
    except click_errors.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except (Exception, KeyboardInterrupt) as err:  # noqa: BLE001 - the error contract
        sys.exit(exit_code_for(err))
    sys.exit(code if isinstance(code, int) else 0)
