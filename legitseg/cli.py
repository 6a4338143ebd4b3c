"""The command line: parse, call the core, show progress, map errors to exit codes.

The only module that writes to the terminal. It imports torch only inside the
commands that need it, so `legitseg --help` and `legitseg models list` stay fast.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from legitseg import __version__
from legitseg.errors import (
    EXIT_IMAGES_FAILED,
    EXIT_INTEGRITY,
    EXIT_OK,
    EXIT_SIGINT,
    EXIT_SIGPIPE,
    EXIT_SIGTERM,
    LegitsegError,
    UsageError,
)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Run segmentation-models-pytorch models over folders of images.")
models_app = typer.Typer(no_args_is_help=True, help="Inspect and verify the models of a manifest.")
app.add_typer(models_app, name="models")
err_console = Console(stderr=True)
log = logging.getLogger("legitseg")

ManifestOpt = Annotated[
    Path | None,
    typer.Option("--manifest", "-m", help="models.yaml [default: $LEGITSEG_MANIFEST, else ./models.yaml]"),
]


def _setup_logging(quiet: bool = False, verbose: bool = False) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s legitseg %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger("legitseg")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def _fail(err: LegitsegError) -> typer.Exit:
    err_console.print(f"[bold red]legitseg: error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
    return typer.Exit(err.exit_code)


def handles_errors(fn):
    """Turn LegitsegError into a one-line message on stderr and its exit code (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LegitsegError as err:
            raise _fail(err) from None

    return wrapper


def _manifest_path(manifest: Path | None) -> Path:
    if manifest is not None:
        return manifest
    return Path(os.environ.get("LEGITSEG_MANIFEST") or "models.yaml")


def _load(manifest: Path | None):
    from legitseg.manifest import load_manifest

    return load_manifest(_manifest_path(manifest))


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


# -- models ---------------------------------------------------------------------------
@models_app.command("list")
@handles_errors
def models_list(manifest: ManifestOpt = None) -> None:
    """Show the manifest's models (does not import torch)."""
    m = _load(manifest)
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

    m = _load(manifest)
    specs = m.select(_split(models))
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


# -- info -----------------------------------------------------------------------------
@app.command("info")
@handles_errors
def info(
    encoders: Annotated[bool, typer.Option("--encoders", help="Also list smp's encoder names.")] = False,
) -> None:
    """Versions, CUDA devices, and whether installed packages match requirements_lock.txt."""
    from legitseg.provenance import cuda_devices, lock_mismatches, versions

    table = Table(show_header=False)
    for key, value in versions().items():
        table.add_row(key, value or "not installed")
    devices = cuda_devices()
    table.add_row("cuda devices", "\n".join(devices) if devices else "none (CPU only)")
    diffs = lock_mismatches()
    if diffs is None:
        lock_state = "requirements_lock.txt not found (installed outside the source tree)"
    elif diffs:
        lock_state = "[red]differs[/]:\n" + "\n".join(diffs)
    else:
        lock_state = "[green]all installed versions match requirements_lock.txt[/]"
    table.add_row("lock", lock_state)
    Console().print(table)
    if encoders:
        from legitseg._smp_names import ENCODERS

        typer.echo("\n".join(ENCODERS) + "\n(plus tu-<any timm model name>)")


# -- export ---------------------------------------------------------------------------
@app.command("export")
@handles_errors
def export(
    model: Annotated[str, typer.Argument(help="Name of the manifest's model to export")],
    out: Annotated[Path, typer.Option("--out", "-o", help="ONNX file to write; its sidecar NAME.json goes beside it")],
    manifest: ManifestOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors on stderr")] = False,
) -> None:
    """Export one model to ONNX with a JSON sidecar of its preprocessing and output semantics."""
    from legitseg.export import export_model

    _setup_logging(quiet)
    (spec,) = _load(manifest).select([model])
    result = export_model(spec, out)
    typer.echo(f"{result.onnx_path}  sha256 {result.onnx_sha256}  parity {result.parity:.2g}")
    typer.echo(str(result.sidecar_path))


# -- run ------------------------------------------------------------------------------
def _split(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


class _Signals:
    """SIGINT/SIGTERM set a stop event (intake stops, in-flight writes finish); a second one exits at once."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.signum: int | None = None
        self._old: dict[int, object] = {}

    def __enter__(self) -> _Signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        if self.stop.is_set():
            os._exit(EXIT_SIGINT if signum == signal.SIGINT else EXIT_SIGTERM)
        self.signum = signum
        self.stop.set()
        log.warning("%s received: stopping after the images in flight",
                    signal.Signals(signum).name)

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class _Progress:
    """A rich progress bar on a terminal; otherwise a plain log line every `every` seconds."""

    def __init__(self, total: int, quiet: bool, every: float = 10.0):
        self.total, self.done, self.failed = total, 0, 0
        self.quiet, self.every = quiet, every
        self.t0 = self.last = time.monotonic()
        self.bar = None
        if not quiet and err_console.is_terminal and total:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(TextColumn("[bold]run"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[rate]} img/s"), TextColumn("failed {task.fields[failed]}"),
                                TimeRemainingColumn(), console=err_console, transient=False)
            self.task = self.bar.add_task("run", total=total, rate="-", failed=0)
            self.bar.start()

    def advance(self, ok: bool) -> None:
        self.done += 1
        self.failed += not ok
        now = time.monotonic()
        rate = self.done / max(now - self.t0, 1e-9)
        if self.bar is not None:
            self.bar.update(self.task, advance=1, rate=f"{rate:.2f}", failed=self.failed)
        elif not self.quiet and (now - self.last >= self.every or self.done == self.total):
            self.last = now
            eta = (self.total - self.done) / rate if rate else 0
            log.info("progress %d/%d images, %.2f img/s, %d failed, ETA %.0fs",
                     self.done, self.total, rate, self.failed, eta)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


@app.command("run")
def run(
    inputs: Annotated[list[str], typer.Argument(help="Image files, folders (recursive), or - for paths on stdin")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder")],
    manifest: ManifestOpt = None,
    models: Annotated[str | None, typer.Option("--models", help="Comma-separated model names [default: all]")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    batch_size: Annotated[int | None, typer.Option(min=1, help="Images per forward pass [default: 16 on CUDA, 4 on CPU]")] = None,
    workers: Annotated[int | None, typer.Option(min=0, help="Decode threads; 0 decodes inline [default: by device and cores]")] = None,
    precision: Annotated[str, typer.Option(help="fp32 | fp16 (CUDA only) | bf16")] = "fp32",
    backend: Annotated[str | None, typer.Option(
        help="auto | torch | onnxruntime; auto = onnxruntime on the CPU, torch on CUDA "
             "[default: each model's manifest `backend`, itself auto by default]")] = None,
    save_probabilities: Annotated[bool, typer.Option("--save-probabilities", help="Also write float16 probability maps (.npz)")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Redo images that an earlier run completed")] = False,
    max_pixels: Annotated[int, typer.Option(min=1, help="Refuse images whose header declares more pixels")] = 100_000_000,
    jsonl: Annotated[bool, typer.Option("--jsonl", help="Print one JSON row per (image, model) on stdout")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors on stderr")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging")] = False,
) -> None:
    """Run the manifest's models over images; write masks, scores and records under OUT."""
    _setup_logging(quiet, verbose)
    try:
        code = _run(inputs, out, manifest, models, device, batch_size, workers, precision, backend,
                    save_probabilities, overwrite, max_pixels, jsonl, quiet)
    except LegitsegError as err:
        raise _fail(err) from None
    raise typer.Exit(code)


def _run(inputs, out, manifest, models, device, batch_size, workers, precision, backend,
         save_probabilities, overwrite, max_pixels, jsonl, quiet) -> int:
    from legitseg.run import Finished, Planned, RunConfig, Skipped, Started, execute
    from legitseg.writers import ImageOutcome

    if precision not in ("fp32", "fp16", "bf16"):
        raise UsageError(f"--precision {precision!r}: choose fp32, fp16 or bf16")
    if backend is not None and backend not in ("auto", "torch", "onnxruntime"):
        raise UsageError(f"--backend {backend!r}: choose auto, torch or onnxruntime")
    m = _load(manifest)
    specs = m.select(_split(models))
    cfg = RunConfig(
        inputs=inputs, out=out, manifest=m, models=specs, device=device, batch_size=batch_size,
        workers=workers, precision=precision, backend=backend, save_probabilities=save_probabilities,
        overwrite=overwrite, max_pixels=max_pixels,
        arguments={"inputs": inputs, "out": str(out), "models": [s.name for s in specs], "device": device,
                   "batch_size": batch_size, "workers": workers, "precision": precision, "backend": backend,
                   "save_probabilities": save_probabilities, "overwrite": overwrite, "max_pixels": max_pixels},
        stdin_lines=sys.stdin if "-" in inputs else None,
    )
    stdout = sys.stdout
    progress: _Progress | None = None
    finished: Finished | None = None
    with _Signals() as signals:
        try:
            for event in execute(cfg, signals.stop):
                if isinstance(event, Planned):
                    log.info("%d image(s): %d to process, %d already done", event.total, event.todo, event.skipped)
                    progress = _Progress(event.todo, quiet)
                elif isinstance(event, Skipped):
                    if jsonl:
                        _emit(stdout, event.rows, signals)
                elif isinstance(event, Started):
                    log.info("models on %s: %s", event.device,
                             ", ".join(f"{k} ({v})" for k, v in event.backends.items()))
                elif isinstance(event, ImageOutcome):
                    if not event.ok:
                        log.warning("failed: %s: %s", event.source.path, event.record.get("error"))
                    if jsonl:
                        _emit(stdout, event.rows, signals)
                    progress.advance(event.ok)
                elif isinstance(event, Finished):
                    finished = event
        finally:
            if progress is not None:
                progress.close()
    assert finished is not None  # execute() always ends with Finished unless it raised
    log.info("%s: %d processed, %d skipped, %d failed; outputs in %s",
             finished.status, finished.processed, finished.skipped, finished.failed, out)
    if finished.status == "interrupted":
        return {signal.SIGTERM: EXIT_SIGTERM, signal.SIGPIPE: EXIT_SIGPIPE}.get(signals.signum, EXIT_SIGINT)
    return EXIT_IMAGES_FAILED if finished.failed else EXIT_OK


def _emit(stream, rows, signals: _Signals) -> None:
    """Write --jsonl rows; a reader that went away (`| head`) stops the run like a signal would."""
    if signals.signum == signal.SIGPIPE:
        return
    try:
        for row in rows:
            stream.write(json.dumps(row, ensure_ascii=False) + "\n")
        stream.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
        signals.signum = signal.SIGPIPE
        signals.stop.set()
        log.warning("standard output was closed: stopping after the images in flight")


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except BrokenPipeError:
        # `legitseg run --jsonl | head` closed our stdout; not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(EXIT_SIGPIPE)
