"""`legitseg run`: options -> `legitseg.api.run`; its events -> progress, log lines and --jsonl rows."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Annotated

import typer

from legitseg.cli.common import (
    ManifestOpt,
    err_console,
    handles_errors,
    log,
    manifest_path,
    setup_logging,
    split,
)
from legitseg.errors import EXIT_SIGINT, EXIT_SIGPIPE, EXIT_SIGTERM
from legitseg.manifest.choices import (
    BACKEND_CHOICES,
    DEFAULT_MAX_PIXELS,
    ENGINES,
    PRECISIONS,
    auto_backend,
    options_help,
)

# --help derived from manifest/choices.py: a new backend, precision or engine appears here by itself.
_PRECISION_HELP = options_help(PRECISIONS)
_BACKEND_HELP = (f"{' | '.join(BACKEND_CHOICES)}; auto = {auto_backend('cpu', 'fp32')} on the CPU, "
                 f"{auto_backend('cuda', 'fp32')} on CUDA [default: each model's manifest `backend`, itself auto by default]")
_ENGINE_HELP = options_help(ENGINES)


def register(app: typer.Typer) -> None:
    app.command("run")(run)


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


@handles_errors
def run(
    inputs: Annotated[list[str], typer.Argument(help="Image files, folders (recursive), or - for paths on stdin")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder")],
    manifest: ManifestOpt = None,
    models: Annotated[str | None, typer.Option("--models", help="Comma-separated model names [default: all]")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    batch_size: Annotated[int | None, typer.Option(min=1, help="Images per forward pass [default: 32 on CUDA, 4 on CPU]")] = None,
    workers: Annotated[int | None, typer.Option(min=0, help="Decode threads; 0 decodes inline [default: by device and cores]")] = None,
    precision: Annotated[str, typer.Option(help=_PRECISION_HELP)] = "fp32",
    backend: Annotated[str | None, typer.Option(help=_BACKEND_HELP)] = None,
    save_probabilities: Annotated[bool, typer.Option("--save-probabilities", help="Also write float16 probability maps (.npz)")] = False,
    overlay: Annotated[bool, typer.Option("--overlay", help="Also write each result drawn on the photograph: OUT/overlays/<model>/<name>.jpg")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Redo images that an earlier run completed")] = False,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="Redo images that failed before and would fail the same way (unchanged file, same model)")] = False,
    require_images: Annotated[bool, typer.Option("--require-images", help="Exit 6 when an INPUT folder holds no images (an unmounted share)")] = False,
    require_adequate: Annotated[bool, typer.Option("--require-adequate", help="Exit 8 when the manifest's quality: policy judged no image adequate (docs/quality.md)")] = False,
    null: Annotated[bool, typer.Option("--null", "-0", help="Paths on stdin are separated by NUL bytes (find -print0)")] = False,
    tta: Annotated[bool | None, typer.Option("--tta/--no-tta", help="Test-time augmentation: --tta turns on each model's manifest `tta` (flips where it has none), --no-tta turns it off [default: the manifest's]")] = None,
    max_pixels: Annotated[int, typer.Option(min=1, help="Refuse images whose header declares more pixels")] = DEFAULT_MAX_PIXELS,
    jsonl: Annotated[bool, typer.Option("--jsonl", help="Print one JSON row per (image, model) on stdout")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors on stderr")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging")] = False,
    shard: Annotated[str | None, typer.Option(
        help="i/N: process only part i (0-based) of N, split by a hash of each output name; "
             "N processes may share one OUT (docs/scale.md)")] = None,
    engine: Annotated[str, typer.Option(help=_ENGINE_HELP)] = "local",
    address: Annotated[str | None, typer.Option(
        help="Ray cluster address for --engine ray [default: RAY_ADDRESS, else a local cluster]")] = None,
) -> None:
    """Run the manifest's models over images; write masks, scores and records under OUT."""
    setup_logging(quiet, verbose)
    code = _run(inputs, out, manifest, models, device, batch_size, workers, precision, backend,
                save_probabilities, overwrite, max_pixels, jsonl, quiet,
                retry_failed=retry_failed, require_images=require_images, null=null,
                shard=shard, engine=engine, address=address, overlay=overlay, tta=tta,
                require_adequate=require_adequate)
    raise typer.Exit(code)


def _run(inputs, out, manifest, models, device, batch_size, workers, precision, backend,
         save_probabilities, overwrite, max_pixels, jsonl, quiet, *, retry_failed, require_images, null,
         shard=None, engine="local", address=None, overlay=False, tta=None, require_adequate=False) -> int:
    """The CLI is a thin layer over `legitseg.api.run`: it only shows the events (and keeps freed
    memory for reuse, cli/allocator.py)."""
    from legitseg.api import run as run_api
    from legitseg.cli.allocator import reuse_freed_memory
    from legitseg.output.writers import ImageOutcome
    from legitseg.run import Planned, Skipped, Started

    stdout = sys.stdout
    progress: _Progress | None = None

    def show(event) -> None:
        nonlocal progress
        if isinstance(event, Planned):
            log.info("%d image(s): %d to process, %d already done%s", event.total, event.todo,
                     event.skipped, _failed_note(event.skipped_failed))
            progress = _Progress(event.todo, quiet)
        elif isinstance(event, Skipped):
            if jsonl:
                _emit(stdout, event.rows, signals)
        elif isinstance(event, Started):
            log.info("models on %s: %s", event.device,
                     ", ".join(f"{k} ({v})" for k, v in event.backends.items()))
        elif isinstance(event, ImageOutcome):
            if not event.ok:
                log.warning("failed: %s: %s", event.record.image, event.record.error)
            if jsonl:
                _emit(stdout, event.rows, signals)
            progress.advance(event.ok)

    reuse_freed_memory()
    with _Signals() as signals:
        try:
            finished = run_api(
                inputs, out, manifest=manifest_path(manifest), models=split(models), device=device,
                batch_size=batch_size, workers=workers, precision=precision, backend=backend,
                save_probabilities=save_probabilities, overwrite=overwrite, max_pixels=max_pixels,
                retry_failed=retry_failed, require_images=require_images, null=null,
                stdin=_binary_stdin() if "-" in inputs else None, stop=signals.stop, on_event=show,
                shard=shard, engine=engine, address=address, overlay=overlay, tta=tta,
                require_adequate=require_adequate)
        finally:
            if progress is not None:
                progress.close()
    log.info("%s: %d processed, %d skipped, %d failed; outputs in %s",
             finished.status, finished.processed, finished.skipped, finished.failed, out)
    if finished.skipped_failed:
        log.info("%d skipped image(s) failed in an earlier run and are unchanged; --retry-failed redoes them",
                 finished.skipped_failed)
    if finished.status == "interrupted":
        return {signal.SIGTERM: EXIT_SIGTERM, signal.SIGPIPE: EXIT_SIGPIPE}.get(signals.signum, EXIT_SIGINT)
    return finished.exit_code


def _failed_note(skipped_failed: int) -> str:
    if not skipped_failed:
        return ""
    return f" (of which {skipped_failed} failed before and are unchanged; --retry-failed redoes them)"


def _binary_stdin():
    """Paths on stdin are bytes: file names need not be valid UTF-8."""
    return getattr(sys.stdin, "buffer", sys.stdin)


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

