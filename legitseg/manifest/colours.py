"""Label names and the manifest's `colors:` per label (how `run --overlay` and the report draw
each label).

Areas, components, colours and evaluation scores are all keyed by label name, so two
classes with one name would silently merge into one key: names must be unique.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from legitseg.manifest.safe_yaml import short

if TYPE_CHECKING:
    from legitseg.manifest.spec import ModelSpec

HEX_COLOUR = re.compile(r"^#[0-9a-fA-F]{6}$")


def parse_colors(v: Any) -> Any:
    """label -> "#rrggbb" or [r, g, b] as label -> (r, g, b). Raises ValueError naming the label."""
    if v is None:
        return v
    if not isinstance(v, dict):
        raise ValueError(f"expected a mapping of label name to \"#rrggbb\" or [r, g, b], got {short(v)}")
    out = {}
    for label, value in v.items():
        if isinstance(value, str) and HEX_COLOUR.match(value):
            out[label] = tuple(int(value[i:i + 2], 16) for i in (1, 3, 5))
        elif (isinstance(value, list | tuple) and len(value) == 3
              and all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in value)):
            out[label] = tuple(value)
        else:
            raise ValueError(f"colour of label {short(label)} is {short(value)}; "
                             "write \"#rrggbb\" or [r, g, b] with whole numbers 0..255")
    return out


def label_key(name: str) -> str:
    """What makes two label names the same to a reader: case, Unicode compatibility forms and
    surrounding blanks aside (`Lesion`, `lesion ` and `lesion` would read as one column in a
    spreadsheet or a case-insensitive database)."""
    return unicodedata.normalize("NFKC", name).casefold().strip()


def check_labels(names: Sequence[str], given: bool) -> None:
    """Every class has its own name. Raises ValueError naming the repeated label and its classes."""
    seen: dict[str, int] = {}
    for index, name in enumerate(names):
        first = seen.setdefault(label_key(name), index)
        if first == index:
            continue
        if not given:  # only a binary model named "background" gets a repeated default
            raise ValueError(f"labels: the default name of class 1 is the model name {short(name)}, which is "
                             "also the name of class 0 (background); write labels: [background, <lesion name>]")
        same = "" if names[first] == name else f" (as {short(names[first])}: names that differ only in case count as one)"
        raise ValueError(f"labels: {short(name)} names both class {first} and class {index}{same}; "
                         "every class needs its own name")


def check_colors(spec: ModelSpec) -> None:
    """Every coloured label is one the model draws (not background). Raises ValueError."""
    if not spec.colors:
        return
    drawn = spec.label_names[1:]
    unknown = [label for label in spec.colors if label not in drawn]
    if unknown:
        raise ValueError(f"colors: label(s) {', '.join(map(short, unknown))} not among the drawn "
                         f"labels {', '.join(drawn)} (background is never drawn)")
