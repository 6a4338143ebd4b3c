"""Verification packages: freeze a run's outputs as cases, and check later runs against them.

A package is a folder (docs/verification.md):

    package.json                    format, models (sha256, settings), tolerances, provenance
    cases/<case>/<image file>       the input, byte for byte
    cases/<case>/scores.json        expected per-model results (areas, components, scores)
    cases/<case>/expected/<model>.png   expected mask (segmentation models)
    cases/<case>/expected/<model>.npz   expected probabilities, uint8 round(p * 255)

Both directions go through `legitseg.run.execute`, the code path of `legitseg run`.
Never prints; the CLI shows the returned `Verification`.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from legitseg._version import __version__
from legitseg.errors import ManifestError, RuntimeFailure, UsageError, VerificationPackageError
from legitseg.fsio import atomic_write, dumps, sha256_bytes, write_json
from legitseg.images.naming import source_key
from legitseg.manifest.spec import Manifest, ModelSpec
from legitseg.models.weights import sha256_file
from legitseg.output.records import ImageRecord, settings_digest
from legitseg.verify.compare import (
    ModelComparison,
    compare_segmentation,
    compare_severity,
    quantise,
    render_markdown,
)
from legitseg.verify.package import (
    CASES,
    PACKAGE_FILE,
    PACKAGE_KIND,
    PACKAGE_VERSION,
    Case,
    ModelCheck,
    Package,
    check_model,
    read_package,
    settings_fields,
)
from legitseg.verify.schema import SeverityExpected
from legitseg.verify.tolerances import Tolerances

log = logging.getLogger(__name__)

RESULTS = "results"  # default home of `verify` results inside a package; never part of the package


# -- running -------------------------------------------------------------------------------
def _run(inputs: list[str], out: Path, manifest: Manifest, specs: list[ModelSpec], device: str,
         backend: str | None, stop: threading.Event) -> tuple[dict[str, ImageRecord], dict[str, Any]]:
    """Run `inputs` like `legitseg run --save-probabilities`; return records by source and the run file."""
    from legitseg.output.writers import ImageOutcome
    from legitseg.run import Finished, RunConfig, execute

    cfg = RunConfig(inputs=inputs, out=out, manifest=manifest, models=specs, device=device,
                    backend=backend, save_probabilities=True, overwrite=True)
    records: dict[str, ImageRecord] = {}
    finished = None
    for event in execute(cfg, stop):
        if isinstance(event, ImageOutcome):
            records[event.record.source or source_key(event.record.image)] = event.record
        elif isinstance(event, Finished):
            finished = event
    if finished is None or finished.status != "completed":
        raise RuntimeFailure("the run was interrupted; nothing was verified")
    run_file = json.loads((out / "runs" / f"{finished.run_id}.json").read_text(encoding="utf-8"))
    return records, run_file


def _empty_or_absent(path: Path, what: str) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UsageError(f"{what} {path} already exists and is not empty; choose a new folder")


# -- making a package ----------------------------------------------------------------------
@dataclass
class MadePackage:
    path: Path
    cases: list[str]
    backends: dict[str, str]
    digest: str  # sha256 of package.json: what an auditor pins with --expect-digest


def _safe_name(name: str) -> str:
    """`name` with only letters, digits, `.`, `_` and `-`: a valid package path component everywhere."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")


def _case_name(name: str, taken: set[str]) -> str:
    base = _safe_name(name) or "case"
    candidate, n = base, 2
    while candidate in taken:
        candidate, n = f"{base}-{n}", n + 1
    taken.add(candidate)
    return candidate


def _write_case(root: Path, case: str, record: ImageRecord, out: Path) -> dict[str, Any]:
    folder = root / CASES / case
    data = Path(record.source or record.image).read_bytes()
    if sha256_bytes(data) != record.sha256:
        raise RuntimeFailure(f"{record.image} changed while the package was being made")
    given = Path(record.source or record.image)
    image_name = _safe_name(given.name) or f"input{_safe_name(given.suffix)}"
    atomic_write(folder / image_name, data)
    expected: dict[str, Any] = {}
    for model, entry in record.models.items():
        if entry.task == "severity":
            expected[model] = {"task": "severity", "score": entry.score, "grade": entry.grade,
                               "probabilities": entry.probabilities}
            continue
        atomic_write(folder / "expected" / f"{model}.png", (out / entry.mask).read_bytes())
        with np.load(out / entry.probability_map) as npz:
            atomic_write(folder / "expected" / f"{model}.npz", _npz_bytes(quantise(npz["probabilities"])))
        expected[model] = {"task": "segmentation", "mask": f"expected/{model}.png",
                           "probabilities": f"expected/{model}.npz",
                           "area_fraction": entry.area_fraction, "components": entry.components}
    scores = {"image": image_name, "sha256": record.sha256, "size": record.size, "models": expected}
    write_json(folder / "scores.json", scores)
    return {"name": case, "input": f"{CASES}/{case}/{image_name}", "sha256": record.sha256,
            "size": record.size, "given_as": record.image}


def _npz_bytes(q: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez_compressed(buf, probabilities=q)
    return buf.getvalue()


def _file_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha256_file(p)
            for p in sorted((root / CASES).rglob("*")) if p.is_file()}


def make_package(package: Path, images: list[str], manifest: Manifest, specs: list[ModelSpec],
                 tolerances: Tolerances, *, device: str = "auto", backend: str | None = None,
                 stop: threading.Event | None = None) -> MadePackage:
    """Run `images` through the pipeline and freeze the outputs as a package at `package`.

    The package appears complete or not at all (built beside it, then renamed).
    Raises UsageError (package folder not empty, bad tolerances), RuntimeFailure when an
    image fails (a package holds only cases that ran), and the run's own errors.
    """
    tolerances.checked()
    _empty_or_absent(package, "package folder")
    stop = stop or threading.Event()
    package.parent.mkdir(parents=True, exist_ok=True)
    staging = package.parent / f".{package.name}.{os.getpid()}-{secrets.token_hex(4)}.legitseg-tmp"
    try:
        with tempfile.TemporaryDirectory(prefix="legitseg-make-") as tmp:
            out = Path(tmp) / "out"
            records, run_file = _run(images, out, manifest, specs, device, backend, stop)
            failed = [f"{r.image}: {r.error}" for r in records.values() if not r.ok]
            if failed:
                raise RuntimeFailure("cannot make a verification package from images that failed: "
                                     + "; ".join(failed))
            if not records:
                raise UsageError(f"no images found in {', '.join(images)}")
            taken: set[str] = set()
            cases = [_write_case(staging, _case_name(r.name, taken), r, out)
                     for r in sorted(records.values(), key=lambda r: r.name)]
        backends = {name: info.get("backend") for name, info in run_file.get("models", {}).items()}
        data = {
            "kind": PACKAGE_KIND,
            "version": PACKAGE_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "legitseg": __version__,
            "quantisation": "probability maps: uint8 round(p * 255)",
            "manifest": {"path": str(manifest.path), "sha256": manifest.sha256},
            "models": {s.name: {"task": s.task, "weights_sha256": s.sha256, "settings": settings_digest(s),
                                "settings_fields": settings_fields(s), "backend": backends.get(s.name),
                                "tolerances": tolerances.to_json()} for s in specs},
            "cases": cases,
            "files": _file_hashes(staging),
            "provenance": run_file,
        }
        write_json(staging / PACKAGE_FILE, data)
        # What verify will demand, checked on what was written: a package --make makes always verifies.
        digest = read_package(staging).digest
        if package.exists():
            package.rmdir()  # empty (checked above); rename cannot replace it everywhere
        os.rename(staging, package)
    except OSError as err:
        raise RuntimeFailure(f"cannot write verification package {package}: {err.strerror or err}") from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("verification package %s: %d case(s), %d model(s)", package, len(cases), len(specs))
    return MadePackage(package, [c["name"] for c in cases], backends, digest)


@dataclass
class CaseVerdict:
    name: str
    comparisons: list[ModelComparison] = field(default_factory=list)
    error: str | None = None  # the image itself failed or produced no record

    @property
    def ok(self) -> bool:
        return self.error is None and all(c.ok for c in self.comparisons)

    def line(self) -> str:
        """`PASS case01` or `FAIL case01: model: measure value, limit ...; ...`."""
        if self.ok:
            return f"PASS {self.name}"
        reasons = [self.error] if self.error else [f for c in self.comparisons for f in c.failures()]
        return f"FAIL {self.name}: " + "; ".join(reasons)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "ok": self.ok}
        if self.error:
            out["error"] = self.error
        out["models"] = {c.model: c.to_json() for c in self.comparisons}
        return out


@dataclass
class Verification:
    ok: bool
    package_digest: str
    models: list[ModelCheck]
    cases: list[CaseVerdict]
    out: Path
    json_path: Path
    report_path: Path


def _decode_expected(pkg: Package, mask_rel: str, npz_rel: str) -> tuple[np.ndarray, np.ndarray]:
    """The expected mask and quantised map, decoded from bytes checked against the package's sha256."""
    mask = cv2.imdecode(np.frombuffer(pkg.read(mask_rel), np.uint8), cv2.IMREAD_UNCHANGED)
    if mask is None:
        raise VerificationPackageError(f"{pkg.path}: package file {mask_rel} is not a readable mask")
    try:
        with np.load(io.BytesIO(pkg.read(npz_rel))) as npz:
            return mask, npz["probabilities"]
    except (KeyError, ValueError, OSError, zipfile.BadZipFile) as err:
        raise VerificationPackageError(f"{pkg.path}: package file {npz_rel} holds no probability map "
                                       f"({err})") from err


def _compare(pkg: Package, case: Case, record: ImageRecord | None, out: Path) -> CaseVerdict:
    verdict = CaseVerdict(case.name)
    if record is None:
        verdict.error = "the verifying run produced no record for this case"
        return verdict
    if record.sha256 != case.entry.sha256:  # the bytes run are the bytes checked, or nothing holds
        raise VerificationPackageError(f"{pkg.path}: {case.entry.input} changed while it was verified "
                                       f"(sha256 {record.sha256}, the case says {case.entry.sha256})")
    for model, want in case.expected.items():
        entry = record.models.get(model)
        tol = pkg.tolerances[model]
        if entry is None or not entry.ok:
            verdict.comparisons.append(ModelComparison(model, error=entry.error if entry else "no result"))
        elif isinstance(want, SeverityExpected):
            verdict.comparisons.append(compare_severity(model, want.model_dump(), entry.probabilities or [],
                                                        entry.score, entry.grade, tol))
        else:
            expected_mask, expected_q = _decode_expected(pkg, f"{case.folder}/{want.mask}",
                                                         f"{case.folder}/{want.probabilities}")
            mask = cv2.imread(str(out / entry.mask), cv2.IMREAD_UNCHANGED)
            if mask is None:
                raise RuntimeFailure(f"cannot read the verifying run's mask {out / entry.mask}")
            with np.load(out / entry.probability_map) as b:
                probabilities = b["probabilities"]
            verdict.comparisons.append(compare_segmentation(model, expected_mask, expected_q, mask,
                                                            probabilities, tol))
    return verdict


def verify_package(package: Path, manifest: Manifest, *, out: Path | None = None, device: str = "auto",
                   backend: str | None = None, stop: threading.Event | None = None,
                   expect_digest: str | None = None) -> Verification:
    """Run a package's cases through the pipeline and compare them; write verification.json and report.md.

    `out` (default PACKAGE/results/<time>-<pid>) must be new or empty; the run's own outputs
    go to `out/outputs`. Raises VerificationPackageError or ManifestError (exit 3) for a
    damaged package, one whose package.json sha256 is not `expect_digest`, or a model the
    manifest lacks; a failed comparison is not an error.
    """
    pkg = read_package(package, expect_digest)
    specs = []
    for name in pkg.models:
        if name not in manifest.models:
            raise ManifestError(f"{manifest.path}: model {name!r} of verification package {package} is not in "
                                f"the manifest (it has: {', '.join(manifest.models) or 'none'})")
        specs.append(manifest.models[name])
    checks = [check_model(s, pkg.models[s.name], pkg.tolerances[s.name]) for s in specs]
    out = out or package / RESULTS / f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    _empty_or_absent(out, "results folder")
    inputs = [str(package / c.entry.input) for c in pkg.cases]
    records, run_file = _run(inputs, out / "outputs", manifest, specs, device, backend,
                             stop or threading.Event())
    for check in checks:
        check.backend_now = run_file.get("models", {}).get(check.name, {}).get("backend")
    verdicts = [_compare(pkg, case, records.get(source_key(package / case.entry.input)), out / "outputs")
                for case in pkg.cases]
    ok = all(c.ok for c in checks) and all(v.ok for v in verdicts)
    doc = {
        "ok": ok,
        "package": str(package),
        "package_sha256": pkg.digest,
        "package_created": pkg.doc.created,
        "package_legitseg": pkg.doc.legitseg,
        "verified_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "manifest": {"path": str(manifest.path), "sha256": manifest.sha256},
        "counts": {"cases": len(verdicts), "passed": sum(v.ok for v in verdicts),
                   "failed": sum(not v.ok for v in verdicts)},
        "models": {c.name: c.to_json() for c in checks},
        "cases": [v.to_json() for v in verdicts],
        "run": run_file,
    }
    json_path, report_path = out / "verification.json", out / "report.md"
    write_json(json_path, doc)
    atomic_write(report_path, render_markdown(json.loads(dumps(doc))).encode())
    return Verification(ok, pkg.digest, checks, verdicts, out, json_path, report_path)
