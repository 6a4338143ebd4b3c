"""The verification package format, typed: `package.json` and each case's `scores.json`.

Validation lives here, at the edge, so the rest of `verify` trusts typed objects. Every
path a package names passes `path_problem`: relative, POSIX, inside the package by its
spelling. Where a path leads on the disk (symlinks) needs the folder: `verify_package`.
Meaning of the fields: docs/verification.md.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

SHA256 = re.compile(r"[0-9a-f]{64}")
_DRIVE = re.compile(r"[A-Za-z]:")


def path_problem(value: str) -> str | None:
    """Why `value` cannot be a path inside a package (None when it can).

    Refused: empty, absolute, a drive letter, backslashes (a Windows separator that
    Linux takes as part of a name), `..`, `.` or empty components, control characters.
    """
    if not value:
        return "an empty path"
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        return "a control character in a path"
    if "\\" in value:
        return "a backslash in a path (package paths use '/')"
    if value.startswith("/"):
        return "an absolute path (package paths are relative to the package folder)"
    if _DRIVE.match(value):
        return "a drive letter (package paths are relative to the package folder)"
    parts = value.split("/")
    if ".." in parts:
        return "'..' in a path (no path may leave the package)"
    if any(p in ("", ".") for p in parts):
        return "an empty or '.' component in a path"
    return None


def _package_path(value: str) -> str:
    problem = path_problem(value)
    if problem:
        raise ValueError(f"{problem}: {value!r}")
    return value


def _case_name(value: str) -> str:
    _package_path(value)
    if "/" in value:
        raise ValueError(f"a case name is one folder name under cases/, without '/': {value!r}")
    return value


PackagePath = Annotated[str, AfterValidator(_package_path)]
CaseName = Annotated[str, AfterValidator(_case_name)]
Sha256 = Annotated[str, Field(pattern=SHA256.pattern)]
Size = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=2, max_length=2)]


class _Strict(BaseModel):
    # strict: a tolerance written as "0.01" or a grade as "2" is a damaged package, not a number.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class TolerancesEntry(_Strict):
    max_dp: float
    min_agreement: float
    max_score_delta: float


class ModelEntry(_Strict):
    task: Literal["segmentation", "severity"]
    weights_sha256: Sha256
    settings: Sha256
    settings_fields: dict[str, Any]
    backend: str | None = None
    tolerances: TolerancesEntry


class CaseEntry(_Strict):
    name: CaseName
    input: PackagePath
    sha256: Sha256
    size: Size
    given_as: str | None = None  # the path given to --make: a record, never read


class ManifestRef(_Strict):
    path: str  # where the manifest was when the package was made: a record, never read
    sha256: Sha256


class PackageDoc(_Strict):
    kind: str
    version: int
    created: str | None = None
    legitseg: str | None = None
    quantisation: str | None = None
    manifest: ManifestRef | None = None
    models: Annotated[dict[str, ModelEntry], Field(min_length=1)]
    cases: Annotated[list[CaseEntry], Field(min_length=1)]
    files: dict[PackagePath, Sha256]  # required: without it nothing would be checked
    provenance: dict[str, Any] = Field(default_factory=dict)


class SegmentationExpected(_Strict):
    task: Literal["segmentation"]
    mask: PackagePath  # relative to the case folder
    probabilities: PackagePath
    area_fraction: dict[str, float]
    components: dict[str, int]


class SeverityExpected(_Strict):
    task: Literal["severity"]
    score: float
    grade: int
    probabilities: list[float]


Expected = Annotated[SegmentationExpected | SeverityExpected, Field(discriminator="task")]


class ScoresDoc(_Strict):
    image: str
    sha256: Sha256
    size: Size
    models: dict[str, Expected]


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def field_path(loc: list[str | int]) -> str:
    """`cases.0.input`, `files['cases/a/b.png']`: names are dotted, keys that are not names quoted."""
    out = ""
    for part in loc:
        if isinstance(part, int) or re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", part):
            out += f".{part}" if out else str(part)
        else:
            out += f"[{part!r}]"
    return out


def describe(err: ValidationError, limit: int = 3) -> str:
    """`field cases.0: ... (got 'x'); ...`: the first `limit` problems, each naming its field path."""
    errors = err.errors()
    parts = []
    for e in errors[:limit]:
        loc = [p for p in e["loc"] if not str(p).startswith("function-after")]
        if len(loc) > 2 and loc[0] == "models" and loc[2] in ("segmentation", "severity"):
            del loc[2]  # the union's tag, which pydantic puts in the path: the field is models.<name>.<key>
        if loc and loc[-1] == "[key]":  # pydantic's mark for a dict key: the key is the field
            loc = loc[:-1]
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        got = "" if e["type"] in ("missing", "value_error", "extra_forbidden") else f" (got {_short(e['input'])})"
        parts.append(f"field {field_path(loc) or '(top level)'}: {msg}{got}")
    if len(errors) > limit:
        parts.append(f"and {len(errors) - limit} more")
    return "; ".join(parts)
