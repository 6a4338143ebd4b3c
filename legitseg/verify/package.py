"""The verification package format: reading and checking a package, and comparing its models
with a manifest's. Layout and meaning: docs/verification.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from legitseg.errors import VerificationPackageError
from legitseg.fsio import sha256_bytes
from legitseg.manifest.spec import ModelSpec
from legitseg.models.weights import sha256_file
from legitseg.output.records import settings_digest, settings_fields
from legitseg.verify.schema import (
    CaseEntry,
    ModelEntry,
    PackageDoc,
    ScoresDoc,
    SegmentationExpected,
    SeverityExpected,
    describe,
)
from legitseg.verify.tolerances import Tolerances

PACKAGE_FILE = "package.json"
PACKAGE_KIND = "legitseg verification package"
PACKAGE_VERSION = 1
CASES = "cases"
SCORES_FILE = "scores.json"


# -- reading a package ---------------------------------------------------------------------
MAX_JSON_BYTES = 64 << 20  # package.json and scores.json are read whole; a bigger one is not ours


@dataclass
class Case:
    """A case of a checked package: its entry, its folder (`cases/<name>`) and expected results."""

    entry: CaseEntry
    expected: dict[str, SegmentationExpected | SeverityExpected]

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def folder(self) -> str:
        return f"{CASES}/{self.entry.name}"


@dataclass
class Package:
    """A package whose format, paths and every file's sha256 have been checked."""

    path: Path
    digest: str  # sha256 of package.json's bytes: the package's identity
    doc: PackageDoc
    cases: list[Case]
    tolerances: dict[str, Tolerances]

    @property
    def models(self) -> dict[str, ModelEntry]:
        return self.doc.models

    def read(self, rel: str) -> bytes:
        """The bytes of listed file `rel`, checked again against `files` (they are what gets compared).

        Raises VerificationPackageError when the file changed since the package was read.
        """
        try:
            data = (self.path / rel).read_bytes()
        except OSError as err:
            raise VerificationPackageError(f"{self.path}: package file {rel} is unreadable ({err})") from err
        if sha256_bytes(data) != self.doc.files[rel]:
            raise VerificationPackageError(f"{self.path}: package file {rel} changed during the verification")
        return data


def _fail(file: Path, message: str) -> VerificationPackageError:
    return VerificationPackageError(f"{file}: {message}")


def _load_json(file: Path, data: bytes) -> Any:
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise _fail(file, f"not valid JSON: {err}") from err


def _read_doc(path: Path, root: Path, expect_digest: str | None) -> tuple[str, PackageDoc]:
    file = path / PACKAGE_FILE
    try:
        if not file.resolve().is_relative_to(root):
            raise _fail(file, "a symlink that leads outside the package")
        if file.stat().st_size > MAX_JSON_BYTES:
            raise _fail(file, f"larger than {MAX_JSON_BYTES >> 20} MiB; not a package.json")
        data = file.read_bytes()
    except FileNotFoundError as err:
        raise VerificationPackageError(f"{path}: not a verification package (no {PACKAGE_FILE})") from err
    except OSError as err:
        raise _fail(file, f"cannot read: {err}") from err
    digest = sha256_bytes(data)
    # The pin comes first: a package that is not the one approved is refused whatever it holds.
    if expect_digest is not None and digest != expect_digest:
        raise _fail(file, f"package sha256 is {digest}, but --expect-digest pins {expect_digest}: "
                          "this is not the package that was approved")
    raw = _load_json(file, data)
    if not isinstance(raw, dict) or raw.get("kind") != PACKAGE_KIND:
        raise _fail(file, f"not a verification package (kind is not {PACKAGE_KIND!r})")
    if raw.get("version") != PACKAGE_VERSION:
        raise _fail(file, f"field version: package format version {raw.get('version')!r}; "
                          f"this legitseg reads version {PACKAGE_VERSION} (a number)")
    try:
        return digest, PackageDoc.model_validate(raw)
    except ValidationError as err:
        raise _fail(file, describe(err)) from err


def _tolerances(file: Path, doc: PackageDoc) -> dict[str, Tolerances]:
    out = {}
    for name, model in doc.models.items():
        tol = Tolerances(**model.tolerances.model_dump())
        if tol.problems():
            raise _fail(file, f"field models.{name}.tolerances: " + "; ".join(tol.problems()))
        out[name] = tol
    return out


def _check_case_entries(path: Path, file: Path, doc: PackageDoc) -> None:
    """Every file a case names is listed in `files` and exists; names and inputs are distinct."""
    names: set[str] = set()
    inputs: set[str] = set()
    for i, case in enumerate(doc.cases):
        if case.name in names:
            raise _fail(file, f"field cases.{i}.name: {case.name!r} names two cases")
        if case.input in inputs:
            raise _fail(file, f"field cases.{i}.input: {case.input!r} is the input of two cases")
        names.add(case.name)
        inputs.add(case.input)
        if case.input not in doc.files:
            raise _fail(file, f"field cases.{i}.input: {case.input!r} is not listed in files "
                              "(every file a case uses is hashed)")
        if not (path / case.input).exists():
            raise _fail(file, f"field cases.{i}.input: {case.input!r} does not exist in the package")
        scores = f"{CASES}/{case.name}/{SCORES_FILE}"
        if scores not in doc.files:
            raise _fail(file, f"field cases.{i}.name: {scores!r} is not listed in files")


def _hash_files(path: Path, root: Path, file: Path, doc: PackageDoc) -> dict[str, str]:
    """Check that each listed file is a regular file inside the package with its sha256."""
    actual: dict[str, str] = {}
    for rel, digest in doc.files.items():
        try:
            target = (path / rel).resolve(strict=True)
        except (OSError, RuntimeError) as err:  # RuntimeError: a symlink loop
            raise VerificationPackageError(f"{path}: package file {rel} is missing or unreadable ({err})") from err
        if not target.is_relative_to(root):
            raise _fail(file, f"field files[{rel!r}]: a symlink that leads outside the package")
        if not target.is_file():
            raise _fail(file, f"field files[{rel!r}]: not a regular file")
        try:
            actual[rel] = sha256_file(target)  # in 1 MiB chunks: flat memory for any size
        except OSError as err:
            raise VerificationPackageError(f"{path}: package file {rel} is unreadable ({err})") from err
        if actual[rel] != digest:
            raise VerificationPackageError(f"{path}: package file {rel} was altered (sha256 {actual[rel]}, "
                                           f"package.json says {digest})")
    return actual


def _read_case(pkg: Package, i: int, entry: CaseEntry, actual: dict[str, str]) -> Case:
    file = pkg.path / PACKAGE_FILE
    if actual[entry.input] != entry.sha256:
        raise _fail(file, f"field cases.{i}.sha256: {entry.sha256} is not the sha256 of the bytes of "
                          f"{entry.input} ({actual[entry.input]})")
    rel = f"{CASES}/{entry.name}/{SCORES_FILE}"
    scores_file = pkg.path / rel
    if (pkg.path / rel).stat().st_size > MAX_JSON_BYTES:
        raise _fail(scores_file, f"larger than {MAX_JSON_BYTES >> 20} MiB; not a scores.json")
    try:
        scores = ScoresDoc.model_validate(_load_json(scores_file, pkg.read(rel)))
    except ValidationError as err:
        raise _fail(scores_file, describe(err)) from err
    if scores.sha256 != entry.sha256:
        raise _fail(scores_file, f"field sha256: {scores.sha256} differs from the case's input sha256 "
                                 f"{entry.sha256}")
    if set(scores.models) != set(pkg.models):
        raise _fail(scores_file, f"field models: expected results for {sorted(scores.models)}; the package's "
                                 f"models are {sorted(pkg.models)} (each case holds every model's)")
    for model, want in scores.models.items():
        if want.task != pkg.models[model].task:
            raise _fail(scores_file, f"field models.{model}.task: {want.task!r}; the package's model is "
                                     f"{pkg.models[model].task!r}")
        if isinstance(want, SegmentationExpected):
            for key in ("mask", "probabilities"):
                if f"{CASES}/{entry.name}/{getattr(want, key)}" not in pkg.doc.files:
                    raise _fail(scores_file, f"field models.{model}.{key}: {getattr(want, key)!r} is not "
                                             "listed in package.json's files")
    return Case(entry, dict(scores.models))


def read_package(path: Path, expect_digest: str | None = None) -> Package:
    """Read and check a package before anything runs: its digest (against `expect_digest`), its
    format and types, every path (relative, inside the package, symlinks included), every
    listed file's sha256 (streamed), each case's input sha256 and expected results.

    Raises VerificationPackageError (exit 3) naming the file, the field and the value.
    """
    file = path / PACKAGE_FILE
    try:
        root = path.resolve(strict=True)
    except FileNotFoundError as err:
        raise VerificationPackageError(f"{path}: not a verification package (no such folder)") from err
    except (OSError, RuntimeError) as err:
        raise _fail(path, f"cannot read the package folder ({err})") from err
    digest, doc = _read_doc(path, root, expect_digest)
    tolerances = _tolerances(file, doc)
    _check_case_entries(path, file, doc)
    actual = _hash_files(path, root, file, doc)
    pkg = Package(path, digest, doc, [], tolerances)
    pkg.cases = [_read_case(pkg, i, entry, actual) for i, entry in enumerate(doc.cases)]
    return pkg


# -- verifying -----------------------------------------------------------------------------
@dataclass
class ModelCheck:
    """The manifest's model against the one the package was made with."""

    name: str
    weights_package: str
    weights_now: str
    settings_differs: dict[str, dict[str, Any]]
    backend_package: str | None
    backend_now: str | None
    tolerances: Tolerances

    @property
    def ok(self) -> bool:
        return self.weights_package == self.weights_now and not self.settings_differs

    def problems(self) -> list[str]:
        out = []
        if self.weights_package != self.weights_now:
            out.append(f"weights sha256 {self.weights_now} differs from the package's {self.weights_package}")
        for key, v in self.settings_differs.items():
            out.append(f"setting {key}: {v['manifest']!r} in the manifest, {v['package']!r} in the package")
        return out

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok,
                "weights_sha256": {"package": self.weights_package, "actual": self.weights_now,
                                   "ok": self.weights_package == self.weights_now},
                "settings": {"ok": not self.settings_differs, "differs": self.settings_differs},
                "backend": {"package": self.backend_package, "now": self.backend_now},
                "tolerances": self.tolerances.to_json()}


def check_model(spec: ModelSpec, packaged: ModelEntry, tolerances: Tolerances) -> ModelCheck:
    want = packaged.settings_fields
    have = settings_fields(spec)
    differs = {k: {"package": want.get(k, "(default)"), "manifest": have.get(k, "(default)")}
               for k in sorted(set(want) | set(have)) if want.get(k) != have.get(k)}
    if not differs and packaged.settings != settings_digest(spec):
        differs["settings digest"] = {"package": packaged.settings, "manifest": settings_digest(spec)}
    return ModelCheck(spec.name, packaged.weights_sha256, spec.sha256, differs, packaged.backend, None,
                      tolerances)
