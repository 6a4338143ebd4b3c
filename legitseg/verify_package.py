"""The verification package format: reading and checking a package, and comparing its models
with a manifest's. Layout and meaning: docs/verification.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from legitseg.errors import VerificationPackageError
from legitseg.fsio import sha256_bytes
from legitseg.manifest import ModelSpec
from legitseg.records import settings_digest, settings_fields
from legitseg.tolerances import Tolerances

PACKAGE_FILE = "package.json"
PACKAGE_KIND = "legitseg verification package"
PACKAGE_VERSION = 1
CASES = "cases"


# -- reading a package ---------------------------------------------------------------------
@dataclass
class Package:
    path: Path
    data: dict[str, Any]
    tolerances: dict[str, Tolerances]

    @property
    def models(self) -> dict[str, dict[str, Any]]:
        return self.data["models"]

    @property
    def cases(self) -> list[dict[str, Any]]:
        return self.data["cases"]


def read_package(path: Path) -> Package:
    """Read and check a package: its format, its models' tolerances, and every file's sha256.

    Raises VerificationPackageError (exit 3) naming the file and the problem.
    """
    file = path / PACKAGE_FILE
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise VerificationPackageError(f"{path}: not a verification package (no {PACKAGE_FILE})") from err
    except (OSError, ValueError) as err:
        raise VerificationPackageError(f"{file}: cannot read: {err}") from err
    if not isinstance(data, dict) or data.get("kind") != PACKAGE_KIND:
        raise VerificationPackageError(f"{file}: not a verification package (kind is not {PACKAGE_KIND!r})")
    if data.get("version") != PACKAGE_VERSION:
        raise VerificationPackageError(f"{file}: package format version {data.get('version')!r}; "
                                       f"this legitseg reads version {PACKAGE_VERSION}")
    models, cases = data.get("models"), data.get("cases")
    if not isinstance(models, dict) or not models or not isinstance(cases, list) or not cases:
        raise VerificationPackageError(f"{file}: needs at least one model and one case")
    tolerances = {}
    for name, model in models.items():
        try:
            tol = Tolerances(**model["tolerances"])
        except (KeyError, TypeError) as err:
            raise VerificationPackageError(f"{file}: model {name}: tolerances need max_dp, min_agreement "
                                           f"and max_score_delta ({err})") from err
        if tol.problems():
            raise VerificationPackageError(f"{file}: model {name}: " + "; ".join(tol.problems()))
        tolerances[name] = tol
    for rel, digest in (data.get("files") or {}).items():
        target = path / rel
        try:
            actual = sha256_bytes(target.read_bytes())
        except OSError as err:
            raise VerificationPackageError(f"{path}: package file {rel} is missing or unreadable ({err})") from err
        if actual != digest:
            raise VerificationPackageError(f"{path}: package file {rel} was altered (sha256 {actual}, "
                                           f"package.json says {digest})")
    return Package(path, data, tolerances)


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


def check_model(spec: ModelSpec, packaged: dict[str, Any], tolerances: Tolerances) -> ModelCheck:
    want = packaged.get("settings_fields") or {}
    have = settings_fields(spec)
    differs = {k: {"package": want.get(k, "(default)"), "manifest": have.get(k, "(default)")}
               for k in sorted(set(want) | set(have)) if want.get(k) != have.get(k)}
    if not differs and packaged.get("settings") != settings_digest(spec):
        differs["settings digest"] = {"package": packaged.get("settings"), "manifest": settings_digest(spec)}
    return ModelCheck(spec.name, packaged.get("weights_sha256", ""), spec.sha256, differs,
                      packaged.get("backend"), None, tolerances)
