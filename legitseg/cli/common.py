"""What every command shares: logging set-up, manifest loading, error -> exit code mapping."""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from legitseg.errors import LegitsegError

err_console = Console(stderr=True)
log = logging.getLogger("legitseg")

ManifestOpt = Annotated[
    Path | None,
    typer.Option("--manifest", "-m", help="models.yaml [default: $LEGITSEG_MANIFEST, else ./models.yaml]"),
]


class _ConsoleHandler(logging.Handler):
    """Log lines through the stderr console, so that they print above a live progress bar
    instead of through it; plain text (no markup, no wrapping) so cron logs keep each line whole."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            err_console.print(self.format(record), markup=False, highlight=False, soft_wrap=True,
                              emoji=False)
        except Exception:  # noqa: BLE001 - logging must never raise; the stdlib reports it
            self.handleError(record)


def setup_logging(quiet: bool = False, verbose: bool = False) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    handler = _ConsoleHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s legitseg %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger("legitseg")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def fail(err: LegitsegError) -> typer.Exit:
    err_console.print(f"[bold red]legitseg: error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
    return typer.Exit(err.exit_code)


def handles_errors(fn):
    """Turn LegitsegError into a one-line message on stderr and its exit code (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LegitsegError as err:
            raise fail(err) from None

    return wrapper


def manifest_path(manifest: Path | None) -> Path:
    if manifest is not None:
        return manifest
    return Path(os.environ.get("LEGITSEG_MANIFEST") or "models.yaml")


def load(manifest: Path | None):
    from legitseg.manifest import load_manifest

    return load_manifest(manifest_path(manifest))



def split(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None

