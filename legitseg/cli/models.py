"""`legitseg models list|check|hash`: inspect and verify the models of a manifest."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from legitseg.cli.common import (
    ManifestOpt,
    emit_table,
    err_console,
    handles_errors,
    load,
    setup_logging,
    split,
)
from legitseg.errors import EXIT_INTEGRITY, UsageError
from legitseg.models.describe import (
    CHECK_COLUMNS,
    LIST_COLUMNS,
    check_record,
    check_row,
    list_row,
    model_record,
)

models_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Inspect and verify the models of a manifest.")


JsonOpt = Annotated[bool, typer.Option("--json", help="One JSON array on stdout, an object per model.")]


def _emit(title: str, columns: tuple[str, ...], rows: list[list[str]], records: list[dict], as_json: bool,
          styles: dict[str, str] | None = None) -> None:
    """JSON with --json; else a table on a terminal, tab-separated text (header row first) otherwise."""
    if as_json:
        typer.echo(json.dumps(records, indent=2))
    else:
        emit_table(title, columns, rows, styles)


@models_app.command("list")
@handles_errors
def models_list(manifest: ManifestOpt = None, as_json: JsonOpt = False) -> None:
    """Show each model's effective settings (does not import torch)."""
    setup_logging()
    m = load(manifest)
    records = [model_record(m, spec) for spec in m.models.values()]
    _emit(str(m.path), LIST_COLUMNS, [list_row(r) for r in records], records, as_json)


@models_app.command("check")
@handles_errors
def models_check(
    manifest: ManifestOpt = None,
    models: Annotated[str | None, typer.Option("--models", help="Comma-separated model names [default: all]")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Hash, build, strictly load and run a dummy forward for each model; exit 3 if any fails."""
    from legitseg.models.check import probe_model

    setup_logging()
    m = load(manifest)
    specs = m.select(split(models))
    records = [check_record(m, spec, probe_model(spec)) for spec in specs]
    rows = [check_row(r)[:-1] if sys.stdout.isatty() and not as_json else check_row(r) for r in records]
    columns = CHECK_COLUMNS[:-1] if sys.stdout.isatty() and not as_json else CHECK_COLUMNS
    _emit(str(m.path), columns, rows, records, as_json,
          styles={"ok": "[green]ok[/]", "FAILED": "[red]FAILED[/]"})
    failed = [r for r in records if not r["ok"]]
    for r in failed:
        # Plain lines, never folded, so that cron logs keep each message whole.
        sys.stderr.write(f"legitseg: FAILED {r['name']}: {r['error']}\n")
    if failed:
        err_console.print(f"legitseg: {len(failed)} of {len(specs)} model(s) failed the check")
        raise typer.Exit(EXIT_INTEGRITY)


@models_app.command("hash")
@handles_errors
def models_hash(file: Annotated[Path, typer.Argument(help="Weights file or smp save_pretrained folder")]) -> None:
    """Print the sha256 to pin in models.yaml (for a folder: of its model.safetensors)."""
    from legitseg.models.weights import hashed_file, sha256_file

    target = hashed_file(file)
    try:
        digest = sha256_file(target)
    except OSError as err:
        raise UsageError(f"cannot read {target}: {err.strerror or err}") from err
    typer.echo(f"{digest}  {target}")


@models_app.command("convert")
@handles_errors
def models_convert(
    src: Annotated[Path, typer.Argument(help="Training checkpoint (.ckpt/.pt/.pth/.bin)")],
    dst: Annotated[Path, typer.Argument(help="New weights file to write (.safetensors; must not exist)")],
    key: Annotated[str | None, typer.Option("--key", help="Entry holding the state_dict [default: found]")] = None,
) -> None:
    """Extract a checkpoint's state_dict into a safetensors file and print its sha256 to pin."""
    from legitseg.models.convert import convert_checkpoint

    typer.echo(f"{convert_checkpoint(src, dst, key)}  {dst}")
