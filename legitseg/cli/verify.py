"""`legitseg verify`: check a verification package, or make one with --make."""

from __future__ import annotations

import re
import signal
import threading
from pathlib import Path
from typing import Annotated

import typer

from legitseg.cli.common import ManifestOpt, fail, handles_errors, load, log, setup_logging, split
from legitseg.errors import (
    EXIT_OK,
    EXIT_SIGINT,
    EXIT_VERIFY_FAILED,
    LegitsegError,
    UsageError,
)
from legitseg.manifest.choices import BACKEND_CHOICES
from legitseg.verify.tolerances import Tolerances

_DEFAULT = Tolerances()


def register(app: typer.Typer) -> None:
    app.command("verify")(verify)


@handles_errors
def verify(
    package: Annotated[Path, typer.Argument(help="Verification package folder")],
    images: Annotated[list[str] | None, typer.Argument(help="With --make: image files or folders to freeze as cases")] = None,
    make: Annotated[bool, typer.Option("--make", help="Make PACKAGE from IMAGES instead of verifying it")] = False,
    manifest: ManifestOpt = None,
    models: Annotated[str | None, typer.Option("--models", help="With --make: comma-separated model names [default: all]")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Where verification.json, report.md and the run's outputs go (new or empty) [default: PACKAGE/results/<time>-<pid>]")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    backend: Annotated[str | None, typer.Option(
        help=f"{' | '.join(BACKEND_CHOICES)} [default: each model's manifest `backend`]")] = None,
    max_dp: Annotated[float, typer.Option("--max-dp", help="With --make: largest allowed |probability difference|")] = _DEFAULT.max_dp,
    min_agreement: Annotated[float, typer.Option("--min-agreement", help="With --make: smallest allowed fraction of equal mask pixels")] = _DEFAULT.min_agreement,
    max_score_delta: Annotated[float, typer.Option("--max-score-delta", help="With --make: largest allowed severity score difference")] = _DEFAULT.max_score_delta,
    expect_digest: Annotated[str | None, typer.Option("--expect-digest", metavar="HEX", help="Refuse the package (exit 3) unless the sha256 of its package.json is HEX: pin the package you approved")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors on stderr")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging")] = False,
) -> None:
    """Run a verification package's cases and compare them with its expected outputs (exit 0 if all
    hold, 7 if any fails, 3 if the package is damaged, altered or not the one pinned by
    --expect-digest); with --make, freeze the outputs of IMAGES as a new package."""
    setup_logging(quiet, verbose)
    stop = threading.Event()
    old = signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        m = load(manifest)
        if make:
            if expect_digest is not None:
                raise UsageError("--expect-digest is for verifying; --make prints the new package's digest")
            code = _make(package, images or [], m, models, out, device, backend,
                         Tolerances(max_dp, min_agreement, max_score_delta), stop)
        else:
            if images:
                raise UsageError(f"IMAGES ({images[0]}, ...) are only taken with --make")
            if models:
                raise UsageError("--models is only taken with --make: verify runs the package's models")
            code = _verify(package, m, out, device, backend, _digest(expect_digest), stop)
    except LegitsegError as err:
        if stop.is_set():
            log.warning("interrupted: %s", err)
            raise typer.Exit(EXIT_SIGINT) from None
        raise fail(err) from None
    finally:
        signal.signal(signal.SIGINT, old)
    raise typer.Exit(code)


def _make(package, images, m, models, out, device, backend, tolerances, stop) -> int:
    from legitseg.verify.cases import make_package

    if not images:
        raise UsageError("--make needs IMAGES: the image files or folders to freeze as cases")
    if out is not None:
        raise UsageError("--out is for verifying; --make writes the package to PACKAGE")
    made = make_package(package, images, m, m.select(split(models)), tolerances.checked(),
                        device=device, backend=backend, stop=stop)
    typer.echo(f"made {made.path}: {len(made.cases)} case(s), models "
               + ", ".join(f"{k} ({v})" for k, v in made.backends.items())
               + f"; package sha256 {made.digest}")
    return EXIT_OK


def _digest(value: str | None) -> str | None:
    if value is None:
        return None
    digest = value.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise UsageError(f"--expect-digest {value!r}: not a sha256 (64 hexadecimal digits)")
    return digest


def _verify(package, m, out, device, backend, expect_digest, stop) -> int:
    from legitseg.verify.cases import verify_package

    result = verify_package(package, m, out=out, device=device, backend=backend, stop=stop,
                            expect_digest=expect_digest)
    for check in result.models:
        for problem in check.problems():
            typer.echo(f"FAIL model {check.name}: {problem}")
    for case in result.cases:
        typer.echo(case.line())
    passed = sum(c.ok for c in result.cases)
    verdict = "PASSED" if result.ok else "FAILED"
    typer.echo(f"verification {verdict}: {passed}/{len(result.cases)} case(s) hold; "
               f"package sha256 {result.package_digest}; report {result.report_path}")
    return EXIT_OK if result.ok else EXIT_VERIFY_FAILED
