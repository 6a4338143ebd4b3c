"""`legitseg models list|check|hash`: inspect and verify the models of a manifest."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from legitseg.cli.common import ManifestOpt, err_console, handles_errors, load, split
from legitseg.errors import EXIT_INTEGRITY, UsageError

models_app = typer.Typer(no_args_is_help=True, help="Inspect and verify the models of a manifest.")


@models_app.command("list")
@handles_errors
def models_list(manifest: ManifestOpt = None) -> None:
    """Show the manifest's models (does not import torch)."""
    m = load(manifest)
    table = Table(title=f"{m.path}", title_justify="left")
    for col in ("name", "task", "arch", "encoder", "classes", "input size", "weights", "sha256"):
        table.add_column(col, overflow="fold")
    for spec in m.models.values():
        try:
            weights = str(spec.weights.relative_to(m.path.parent.absolute()))
        except ValueError:
            weights = str(spec.weights)
        size = "x".join(map(str, spec.input_size)) if spec.input_size else "native (pad)"
        table.add_row(spec.name, spec.task, spec.arch or "-", spec.encoder, str(spec.classes), size,
                      weights, spec.sha256[:12])
    Console().print(table)


@models_app.command("check")
@handles_errors
def models_check(
    manifest: ManifestOpt = None,
    models: Annotated[str | None, typer.Option("--models", help="Comma-separated model names [default: all]")] = None,
) -> None:
    """Hash, build, strictly load and run a dummy forward for each model; exit 3 if any fails."""
    from legitseg.check import check_model

    m = load(manifest)
    specs = m.select(split(models))
    table = Table(title=f"{m.path}", title_justify="left")
    for col in ("model", "result", "build s", "parameters", "weights MB", "output"):
        table.add_column(col, no_wrap=col in ("model", "result"))
    failed = 0
    problems: list[str] = []
    for spec in specs:
        r = check_model(spec)
        failed += not r.ok
        table.add_row(
            r.name, "[green]ok[/]" if r.ok else "[red]FAILED[/]",
            f"{r.build_seconds:.2f}" if r.build_seconds is not None else "-",
            f"{r.parameters:,}" if r.parameters is not None else "-",
            f"{r.weight_bytes / 1e6:.1f}" if r.weight_bytes is not None else "-",
            f"{list(r.output_shape)} {r.dtype}" if r.output_shape else "-",
        )
        if r.error:
            problems.append(f"{r.name}: {r.error}")
    Console().print(table)
    for line in problems:
        # Plain lines, never folded, so that cron logs keep each message whole.
        sys.stderr.write(f"legitseg: FAILED {line}\n")
    if failed:
        err_console.print(f"legitseg: {failed} of {len(specs)} model(s) failed the check")
        raise typer.Exit(EXIT_INTEGRITY)


@models_app.command("hash")
@handles_errors
def models_hash(file: Annotated[Path, typer.Argument(help="Weights file or smp save_pretrained folder")]) -> None:
    """Print the sha256 to pin in models.yaml (for a folder: of its model.safetensors)."""
    from legitseg.weights import hashed_file, sha256_file

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
    from legitseg.convert import convert_checkpoint

    typer.echo(f"{convert_checkpoint(src, dst, key)}  {dst}")
