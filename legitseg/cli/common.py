"""What every command shares: logging set-up, manifest loading, and the error contract.

The error contract (docs/exit-codes.md), the same for every command:
- a LegitsegError: one line naming the file or value at fault, and its exit code;
- a closed stdout (`legitseg summary OUT | head -1`): nothing on stderr, exit 141;
- Ctrl-C: one line, exit 130;
- anything else: one line `legitseg: error: unexpected <Type>: <message> (rerun with -v
  for the traceback)`, exit 4. Scripts read 1 as "some images failed", so an unexpected
  error must never end as Python's exit 1 with a traceback.
"""

from __future__ import annotations

import functools
import logging
import os
import select
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from legitseg.errors import EXIT_RUNTIME, EXIT_SIGINT, EXIT_SIGPIPE, LegitsegError

# typer >= 0.2x carries its own copy of click; its exceptions are the ones raised.
try:
    from typer._click import exceptions as click_errors
except ImportError:  # an older typer on plain click
    from click import exceptions as click_errors

err_console = Console(stderr=True)
log = logging.getLogger("legitseg")

ManifestOpt = Annotated[
    Path | None,
    typer.Option("--manifest", "-m", help="models.yaml [default: $LEGITSEG_MANIFEST, else ./models.yaml]"),
]

# `legitseg -v COMMAND`: set by the root callback on every invocation, read by setup_logging,
# so that commands without a -v of their own can still show a traceback.
_root_verbose = False


class _ConsoleHandler(logging.Handler):
    """Log lines through the stderr console, so that they print above a live progress bar
    instead of through it; plain text (no markup, no wrapping) so cron logs keep each line whole."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            err_console.print(self.format(record), markup=False, highlight=False, soft_wrap=True,
                              emoji=False)
        except Exception:  # noqa: BLE001 - logging must never raise; the stdlib reports it
            self.handleError(record)


def set_root_verbose(verbose: bool) -> None:
    global _root_verbose
    _root_verbose = verbose
    if verbose:
        setup_logging(verbose=True)


def setup_logging(quiet: bool = False, verbose: bool = False) -> None:
    level = (logging.DEBUG if _root_verbose else logging.WARNING if quiet
             else logging.DEBUG if verbose else logging.INFO)
    handler = _ConsoleHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s legitseg %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger("legitseg")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def say(message: str) -> None:
    """One `legitseg: error: ...` line on stderr, never wrapped (cron logs keep it whole)."""
    err_console.print(f"[bold red]legitseg: error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def fail(err: LegitsegError) -> typer.Exit:
    say(str(err))
    return typer.Exit(err.exit_code)


def exit_code_for(err: BaseException) -> int:
    """Report `err` as the error contract says (module docstring) and return its exit code."""
    if isinstance(err, LegitsegError):
        say(str(err))
        return err.exit_code
    if isinstance(err, BrokenPipeError) and stdout_closed():
        silence_stdout()
        return EXIT_SIGPIPE
    if isinstance(err, KeyboardInterrupt | typer.Abort):
        err_console.print("legitseg: interrupted", highlight=False, soft_wrap=True)
        return EXIT_SIGINT
    log.debug("traceback of the unexpected error", exc_info=err)
    text = " ".join(str(err).split())  # one line, whatever the message holds
    say(f"unexpected {type(err).__name__}{': ' + text if text else ''} (rerun with -v for the traceback)")
    return EXIT_RUNTIME


def handles_errors(fn):
    """Apply the error contract to a command: what it raises becomes one line and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, click_errors.ClickException):
            raise  # a chosen exit code, or a usage error that main() words
        except SystemExit as err:
            if not isinstance(err.__context__, BrokenPipeError):
                raise
            # rich's Console met a closed stdout: it has pointed stdout at /dev/null already
            # and exits 1, which scripts would read as "images failed".
            raise typer.Exit(EXIT_SIGPIPE) from None
        except (Exception, KeyboardInterrupt) as err:  # noqa: BLE001 - the contract above
            raise typer.Exit(exit_code_for(err)) from None

    return wrapper


def stdout_closed() -> bool:
    """Whether the reader of stdout went away (a pipe's write end then polls as an error).

    A BrokenPipeError from any other pipe is a real failure, not a reader that had enough.
    """
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return True  # captured in-process (tests): stdout is the only stream a command writes
    poll = select.poll()
    poll.register(fd, select.POLLOUT)
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poll.poll(0))


def silence_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's final flush of what is still
    buffered does not print "Exception ignored ... BrokenPipeError" at exit."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return
    os.dup2(os.open(os.devnull, os.O_WRONLY), fd)


def emit_table(title: str, columns: tuple[str, ...], rows: list[list[str]],
               styles: dict[str, str] | None = None) -> None:
    """A table on a terminal; tab-separated text (header row first) into a pipe or file,
    so that scripts and logs get plain rows, not box-drawing characters."""
    from legitseg.models.describe import tsv

    if sys.stdout.isatty():
        table = Table(title=title, title_justify="left")
        for col in columns:
            table.add_column(col.replace("_", " "), overflow="fold")
        for row in rows:
            table.add_row(*[styles[c] if c in (styles or {}) else escape(c) for c in row])
        Console().print(table)
    else:
        sys.stdout.write(tsv(columns, rows))
        sys.stdout.flush()  # a closed pipe must fail here, inside the command, not at exit


def manifest_path(manifest: Path | None) -> Path:
    if manifest is not None:
        return manifest
    return Path(os.environ.get("LEGITSEG_MANIFEST") or "models.yaml")


def load(manifest: Path | None):
    from legitseg.manifest.spec import load_manifest

    return load_manifest(manifest_path(manifest))


def split(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None
