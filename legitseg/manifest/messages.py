"""How a manifest's problems are worded: pydantic's validation errors as one line per problem
naming the file, the model and the field; NaN and infinities refused wherever they appear."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from legitseg.errors import ManifestError
from legitseg.manifest.safe_yaml import non_finite, short


def format_validation(path: Path, raw: dict[str, Any], err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = list(e["loc"])
        where = ""
        if len(loc) >= 2 and loc[0] == "models":
            where = f"model {short(loc[1])}"
            loc = loc[2:]
            # Errors from the model-level validator carry no field; say so.
        field = ".".join(str(p) for p in loc if not str(p).startswith("function-after"))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        elif e["type"] == "literal_error":
            msg = f"invalid value {short(e.get('input'))}; " + msg.replace("Input should be", "valid:")
        parts = [p for p in (where, f"field {short(field)}" if field else "") if p]
        lines.append(f"{path}: {', '.join(parts) + ': ' if parts else ''}{msg}")
    return "\n".join(lines)


def refuse_non_finite(path: Path, raw: dict[str, Any]) -> None:
    """NaN and infinities (YAML .nan, .inf, 1e999) are refused in every field, arch_params included."""
    found = non_finite(raw)
    if found is None:
        return
    where, value = found
    if len(where) >= 2 and where[0] == "models":
        place = f"model {short(where[1])}, field {short('.'.join(where[2:]))}" if len(where) > 2 \
            else f"model {short(where[1])}"
    else:
        place = f"field {short('.'.join(where))}"
    raise ManifestError(f"{path}: {place}: {value} is not a finite number; NaN and infinity are refused")
