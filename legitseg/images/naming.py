"""Output names: text-safe, short enough for any file system, stable across runs, never shared.

The rule, documented for users in docs/output-format.md ("Naming"):

1. candidate = the input's path relative to its root (`/` between folders), bytes that
   are not UTF-8 written as `%XX`, each path component over COMPONENT_MAX_BYTES cut to a
   prefix plus `~<16 hex of the sha256 of the full component>`;
2. its suffixed form is candidate + `~<8 hex of the sha1 of the absolute path>`;
3. a name (plain or suffixed) that OUT already records for this same absolute path is
   kept; otherwise the plain name is used only if OUT has no record under it and no other
   input of this run wants it; otherwise the suffixed form.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from legitseg.output.records import ImageRecord

# 255 bytes per name on ext4/xfs/btrfs/APFS/NTFS. An output file name is a component plus the
# collision tag (9), a suffix (.json, 5) and the temporary-file decoration (about 31).
NAME_MAX = 255
COMPONENT_MAX_BYTES = NAME_MAX - 55
_DIGEST_HEX = 16

Existing = Mapping[str, str]  # output name -> the source key OUT records under it


def source_key(path: str | os.PathLike[str] | bytes) -> str:
    """The absolute path string (surrogateescape str) that identifies an input across runs.

    Records store it so `existing[name]` can say which file owns a name; it is also
    what the collision tag is computed from.
    """
    return os.path.abspath(os.fsdecode(path))


def recorded_keys(records: Mapping[str, ImageRecord]) -> dict[str, str]:
    """Output name -> the source key its record names (older records: their image path)."""
    return {name: r.source or source_key(r.image) for name, r in records.items()}


def escape(text: str) -> str:
    """`text` with bytes that were not UTF-8 (surrogateescape) written as `%XX`, uppercase hex.

    Deterministic and always valid UTF-8. Not injective (`caf%E9` may also be a real
    name); the naming rule's collision tag keeps the outputs apart in that case.
    """
    if text.isprintable() and not any("\ud800" <= c <= "\udfff" for c in text):
        return text
    out = []
    for c in text:
        if "\udc80" <= c <= "\udcff":
            out.append(f"%{ord(c) - 0xDC00:02X}")
        elif "\ud800" <= c <= "\udfff":
            out.append(f"%u{ord(c):04X}")
        else:
            out.append(c)
    return "".join(out)


def display(path: str | os.PathLike[str]) -> str:
    """A printable, UTF-8 form of a path for logs and JSON: `%XX` for undecodable bytes,
    `\\n`, `\\t` and other control characters written as Python escapes."""
    text = escape(os.fspath(path))
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def shorten(component: str) -> str:
    """`component` if it fits COMPONENT_MAX_BYTES in UTF-8, else a prefix + `~<16 hex>`."""
    raw = component.encode("utf-8")
    if len(raw) <= COMPONENT_MAX_BYTES:
        return component
    digest = hashlib.sha256(raw).hexdigest()[:_DIGEST_HEX]
    keep = raw[: COMPONENT_MAX_BYTES - _DIGEST_HEX - 1].decode("utf-8", "ignore")  # whole characters
    return f"{keep}~{digest}"


def candidate(relative: str | os.PathLike[str]) -> str:
    """The plain output name of a path relative to its root (step 1 of the rule)."""
    parts = Path(relative).as_posix().split("/")
    return "/".join(shorten(escape(p)) for p in parts)


def tag(key: str) -> str:
    """8 hex digits of the sha1 of a source key (absolute path, surrogateescape str)."""
    return hashlib.sha1(key.encode("utf-8", "surrogateescape")).hexdigest()[:8]


def assign(wanted: Sequence[tuple[str, str]], existing: Existing | None = None) -> list[str]:
    """One output name per `(key, plain candidate)`, in order; keys must be distinct.

    `existing` maps a name to the key OUT records under it (names OUT has no record of are
    absent). The result never repeats a name, never takes a name OUT records for another
    key, and keeps any name OUT already records for the same key.
    """
    lookup = (existing or {}).get
    demand = Counter(plain for _, plain in wanted)
    names: list[str] = []
    taken: set[str] = set()
    for key, plain in wanted:
        suffixed = f"{plain}~{tag(key)}"
        if lookup(plain) == key:
            name = plain
        elif lookup(suffixed) == key:
            name = suffixed
        elif demand[plain] == 1 and lookup(plain) is None:
            name = plain
        else:
            name = suffixed
        if name in taken or lookup(name) not in (None, key):
            # Only a sha1 prefix collision or a file literally named like another's tagged
            # name gets here; the full digest settles it.
            name = f"{plain}~{hashlib.sha1(key.encode('utf-8', 'surrogateescape')).hexdigest()}"
        taken.add(name)
        names.append(name)
    return names
