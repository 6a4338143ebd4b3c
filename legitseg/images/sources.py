"""Find the images to process and give each a stable, collision-free output name (SPEC 5).

What is searched (docs/reliability.md, "What a folder search picks up"): a folder INPUT is
searched recursively in a stable, sorted, depth-first order for IMAGE_SUFFIXES (any
case). Everything a search passes over is reported in `Discovery.skipped` with the
reason: other suffixes, hidden files and folders (names starting with "."), the output
folder OUT and any folder holding a legitseg output, folders that cannot be listed, and
symbolic links to folders already searched (loops). Symbolic links to folders are
followed; each real folder is searched once. A file named explicitly (INPUT or stdin)
is taken as given.

Names: legitseg.images.naming.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from legitseg.errors import UsageError
from legitseg.images import naming
from legitseg.images.naming import source_key

__all__ = ["IMAGE_SUFFIXES", "OUT_MARKER", "Discovery", "Found", "Source", "discover", "discover_all",
           "find_all", "is_image_name", "is_output_folder", "source_key"]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".png", ".tif", ".tiff", ".bmp", ".webp", ".gif",
                  ".heic", ".heif", ".dcm")
OUT_MARKER = ".legitseg-out"  # written into every OUT; older OUTs have .legitseg.lock + records/
_OLD_LOCK, _OLD_RECORDS = ".legitseg.lock", "records"


@dataclass(frozen=True)
class Source:
    """One input image: where it is, and the name its outputs are written under.

    `path` is the real path (a str from os.fsdecode keeps undecodable bytes as
    surrogates, so it opens the right file); `name` is always valid UTF-8.
    """

    path: Path
    name: str

    @property
    def display(self) -> str:
        """The path as printable UTF-8 text, for logs and JSON (`%XX` for undecodable bytes)."""
        return naming.display(self.path)


@dataclass
class Discovery:
    """What a set of INPUTs holds: the images, what was passed over and why, empty folders."""

    sources: list[Source] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (display path, reason)
    empty_inputs: list[str] = field(default_factory=list)  # folder INPUTs with no image


@dataclass
class Found:
    """What a set of INPUTs holds before any name is given: image paths, each with its path
    relative to its root (in order, each file once), what was passed over, empty folders."""

    paths: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    empty_inputs: list[str] = field(default_factory=list)

    def named(self, existing: Mapping[str, str] | None = None) -> Discovery:
        """The Sources with their output names. `existing` maps the output names OUT has records
        for to the source key (`source_key`) each records; it keeps names stable across runs
        (see naming)."""
        wanted = [(source_key(path), naming.candidate(rel)) for path, rel in self.paths]
        names = naming.assign(wanted, existing)
        sources = [Source(Path(p), n) for (p, _), n in zip(self.paths, names, strict=True)]
        return Discovery(sources, self.skipped, self.empty_inputs)


def is_image_name(path: Path | str) -> bool:
    return os.path.splitext(os.fspath(path))[1].lower() in IMAGE_SUFFIXES


def is_output_folder(names: Iterable[str], folder: str) -> bool:
    """Whether a folder whose entries are `names` is a legitseg OUT (current or older layout)."""
    entries = set(names)
    if OUT_MARKER in entries:
        return True
    return _OLD_LOCK in entries and _OLD_RECORDS in entries and os.path.isdir(os.path.join(folder, _OLD_RECORDS))


class _Walker:
    """Depth-first, sorted folder search with loop protection and a record of what it skips."""

    def __init__(self, out_real: str | None, skipped: list[tuple[str, str]]):
        self.out_real = out_real
        self.skipped = skipped
        self.searched: set[str] = set()  # real paths of folders already listed

    def skip(self, path: str, reason: str) -> None:
        self.skipped.append((naming.display(path), reason))

    def walk(self, root: str) -> list[str]:
        """Image paths under `root` (a folder), as `root`-prefixed strings."""
        found: list[str] = []
        self._folder(root, found)
        return found

    def _folder(self, folder: str, found: list[str]) -> None:
        real = os.path.realpath(folder)
        if self.out_real is not None and real == self.out_real:
            self.skip(folder, "the output folder (OUT) is never searched")
            return
        if real in self.searched:
            self.skip(folder, "symbolic link to a folder already searched (not searched twice)")
            return
        self.searched.add(real)
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as err:
            reason = os.strerror(err.errno) if err.errno else str(err)
            self.skip(folder, f"folder cannot be listed: {reason}")
            return
        if is_output_folder((e.name for e in entries), folder):
            self.skip(folder, "holds a legitseg output folder (not searched)")
            return
        subfolders = []
        for entry in entries:
            path = entry.path
            if entry.name.startswith("."):
                # macOS `._IMG_0001.JPG` resource forks, `.thumbnails/`: not photographs, and each
                # would fail on every cron run.
                self.skip(path, "hidden folder" if _is_dir(entry) else "hidden file")
                continue
            is_dir = _is_dir(entry)
            if is_image_name(entry.name):
                found.append(path)  # a folder or FIFO named like an image fails later, as one image
            elif not is_dir:
                self.skip(path, "suffix is not an image type")
            if is_dir:
                subfolders.append(path)
        for path in subfolders:
            self._folder(path, found)


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows symbolic links: linked folders are searched
    except OSError:
        return False


def _split_stdin(data: bytes, null: bool) -> list[str]:
    if null:
        items = data.split(b"\0")
    elif b"\0" in data:
        raise UsageError("standard input holds NUL bytes: give --null to read NUL-separated paths "
                         "(as written by find -print0)")
    else:
        # CRLF from Windows-made lists; blank lines are skipped.
        items = [line[:-1] if line.endswith(b"\r") else line for line in data.split(b"\n")]
        items = [line for line in items if line.strip()]
    return [os.fsdecode(item) for item in items if item]


def find_all(inputs: Iterable[str], stdin: BinaryIO | None = None, *, null: bool = False,
             out: Path | None = None) -> Found:
    """Expand INPUT arguments (files, folders, `-`) into image paths in a stable order.

    `stdin` is read as bytes when an INPUT is `-`: one path per line, or per NUL byte
    with `null`. `out` is never searched. Raises UsageError for a missing INPUT argument,
    `-` without stdin, or NUL bytes on stdin without `null`. A missing path read from
    stdin is kept, to fail as one image. Names come after (`Found.named`), once OUT's
    records are known.
    """
    inputs = list(inputs)
    if "-" in inputs:
        if stdin is None:
            raise UsageError("INPUT '-' given but no standard input")
        lines = _split_stdin(stdin.read(), null)
    else:
        lines = []
    return _collect(inputs, lines, out)


def discover_all(inputs: Iterable[str], stdin: BinaryIO | None = None, *, null: bool = False,
                 out: Path | None = None, existing: Mapping[str, str] | None = None) -> Discovery:
    """`find_all`, then the names (`Found.named(existing)`). Raises as `find_all` does."""
    return find_all(inputs, stdin, null=null, out=out).named(existing)


def discover(inputs: Iterable[str], stdin_lines: Iterable[str] | None = None) -> list[Source]:
    """The Sources of `inputs` with stdin given as text lines (kept for older callers)."""
    inputs = list(inputs)
    lines: list[str] = []
    if "-" in inputs:
        if stdin_lines is None:
            raise UsageError("INPUT '-' given but no standard input")
        lines = [line.rstrip("\r\n") for line in stdin_lines]
        lines = [line for line in lines if line.strip()]
    return _collect(inputs, lines, None).named().sources


def _collect(inputs: Iterable[str], stdin_paths: list[str], out: Path | None) -> Found:
    result = Found()
    out_real = os.path.realpath(out) if out is not None else None
    walker = _Walker(out_real, result.skipped)
    pairs: list[tuple[str, str]] = []  # (path, path relative to its root)

    def add_file(path: str) -> None:
        if out_real is not None and os.path.realpath(path).startswith(out_real + os.sep):
            walker.skip(path, "inside the output folder (OUT)")
        else:
            pairs.append((path, os.path.basename(path)))

    for arg in inputs:
        if arg == "-":
            for line in stdin_paths:
                add_file(line)
            continue
        arg = os.fsdecode(arg)
        if os.path.isdir(arg) and not is_image_name(arg.rstrip("/\\")):
            found = walker.walk(arg)
            if not found:
                result.empty_inputs.append(naming.display(arg))
            pairs.extend((f, os.path.relpath(f, arg)) for f in found)
        elif os.path.lexists(arg):
            add_file(arg)
        else:
            raise UsageError(f"INPUT {naming.display(arg)!r} does not exist")

    seen: set[str] = set()
    for path, rel in pairs:
        key = source_key(path)
        if key not in seen:  # a file given twice is processed once, under its first name
            seen.add(key)
            result.paths.append((path, rel))
    if result.skipped:
        log.debug("discovery skipped %d path(s)", len(result.skipped))
    return result
