"""Find the images to process and give each a collision-free output name (SPEC 5).

Naming rule (docs/output-format.md): an image's name is its path relative to the
root it was found under, file suffix kept (`visit1/a.jpg`), so `a.jpg` and
`a.png` in one folder never collide. A folder INPUT is its own root; a file INPUT
and each path read from stdin have their parent folder as root, so their name is
the file name. Folder searches skip hidden files and folders (names starting
with "."); a hidden file named explicitly is processed. If two different files still end up with one name (the same
relative path under two roots), each of them gets `~<8 hex>` of the sha1 of its
absolute path appended, which does not depend on input order.
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from legitseg.errors import UsageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", ".gif")


@dataclass(frozen=True)
class Source:
    """One input image: where it is, and the name its outputs are written under."""

    path: Path
    name: str


def is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def _walk(root: Path) -> list[Path]:
    found = []
    # os.walk with sorted names gives a stable, depth-first order independent of the file system.
    for folder, dirs, files in os.walk(root, followlinks=False):
        # Hidden files and folders (macOS `._IMG_0001.JPG` resource forks, `.thumbnails/`) are
        # not photographs; left in, each would fail on every cron run.
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        base = Path(folder)
        for f in sorted([f for f in files if not f.startswith(".")] + [d for d in dirs if is_image_name(Path(d))]):
            p = base / f
            if is_image_name(p):
                found.append(p)
        # A folder named like an image (`x.jpg/`) is listed, to be reported as a failed image;
        # os.walk still searches it, so the images inside it are found as well.
    return found


def discover(inputs: Iterable[str], stdin_lines: Iterable[str] | None = None) -> list[Source]:
    """Expand INPUT arguments (files, folders, `-`) into Sources in a stable order.

    A missing INPUT argument is a UsageError; paths from stdin are taken as given
    (a missing one becomes a failed image, so one bad line does not stop a pipeline).
    """
    pairs: list[tuple[Path, str]] = []
    for arg in inputs:
        if arg == "-":
            if stdin_lines is None:
                raise UsageError("INPUT '-' given but no standard input")
            for line in stdin_lines:
                line = line.rstrip("\r\n")
                if line.strip():
                    p = Path(line)
                    pairs.append((p, p.name))
            continue
        p = Path(arg)
        if p.is_dir() and not is_image_name(p):
            for f in _walk(p):
                pairs.append((f, f.relative_to(p).as_posix()))
        elif p.exists() or p.is_symlink():
            pairs.append((p, p.name))
        else:
            raise UsageError(f"INPUT {arg!r} does not exist")
    seen: set[str] = set()
    unique: list[tuple[Path, str]] = []
    for p, name in pairs:
        key = os.path.abspath(p)
        if key not in seen:
            seen.add(key)
            unique.append((p, name))
    by_name: dict[str, list[int]] = defaultdict(list)
    for i, (_, name) in enumerate(unique):
        by_name[name].append(i)
    out = []
    for p, name in unique:
        if len(by_name[name]) > 1:
            digest = hashlib.sha1(os.path.abspath(p).encode("utf-8", "surrogateescape")).hexdigest()[:8]
            name = f"{name}~{digest}"
        out.append(Source(p, name))
    return out
