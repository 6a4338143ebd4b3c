"""`legitseg info` and `legitseg export`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from legitseg.cli.common import ManifestOpt, handles_errors, load, setup_logging


def register(app: typer.Typer) -> None:
    app.command("info")(info)
    app.command("export")(export)


@handles_errors
def info(
    encoders: Annotated[bool, typer.Option("--encoders", help="Also list smp's encoder names.")] = False,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print a CycloneDX 1.6 JSON bill of materials of this environment instead of the table.")] = False,
    lock: Annotated[Path | None, typer.Option(
        "--lock", help="Lock file to compare installed versions with "
                       "[default: $LEGITSEG_LOCK_FILE, else the source tree's requirements_lock.txt]")] = None,
) -> None:
    """Versions, CUDA devices, and whether installed packages match requirements_lock.txt."""
    if as_json:
        from legitseg.bom import bill_of_materials

        typer.echo(bill_of_materials(lock))
        return
    from legitseg.errors import UsageError
    from legitseg.provenance import (
        cpu_facts,
        cuda_devices,
        cuda_facts,
        lock_file,
        lock_mismatches,
        versions,
    )

    table = Table(show_header=False)
    for key, value in versions().items():
        table.add_row(key, value or "not installed")
    cuda = cuda_facts()
    table.add_row("cuda / cudnn (built with)", f"{cuda['torch_cuda'] or 'none'} / {cuda['cudnn'] or 'none'}")
    devices = cuda_devices()
    table.add_row("cuda devices", "\n".join(devices) if devices else "none (CPU only)")
    table.add_row("cpu", cpu_facts()["model"])
    lock = lock or lock_file()
    try:
        diffs = lock_mismatches(lock)
    except OSError as err:
        raise UsageError(f"cannot read lock file {lock}: {err.strerror or err}") from err
    if diffs is None:
        lock_state = f"{lock.name} not found (installed outside the source tree)"
    elif diffs:
        lock_state = f"[red]differs[/] from {lock}:\n" + "\n".join(diffs)
    else:
        lock_state = f"[green]all installed versions match {lock.name}[/]"
    table.add_row("lock", lock_state)
    Console().print(table)
    if encoders:
        from legitseg.manifest.smp_names import ENCODERS

        typer.echo("\n".join(ENCODERS) + "\n(plus tu-<any timm model name>)")


# -- export ---------------------------------------------------------------------------
@handles_errors
def export(
    model: Annotated[str, typer.Argument(help="Name of the manifest's model to export")],
    out: Annotated[Path, typer.Option("--out", "-o", help="ONNX file to write; its sidecar NAME.json goes beside it")],
    manifest: ManifestOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors on stderr")] = False,
) -> None:
    """Export one model to ONNX with a JSON sidecar of its preprocessing and output semantics."""
    from legitseg.export import export_model

    setup_logging(quiet)
    (spec,) = load(manifest).select([model])
    result = export_model(spec, out)
    typer.echo(f"{result.onnx_path}  sha256 {result.onnx_sha256}  parity {result.parity:.2g}")
    typer.echo(str(result.sidecar_path))

