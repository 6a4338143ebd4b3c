"""What OUT held when a run began: every record read once, then consulted, never re-read.

A run reads OUT's records once (`Resume.read`) and hands what it learned along as plain
data: to discovery the source key each output name is recorded for (stable names), to
the plan the record of each image (skip decisions), to the `Sink` the previous record of
each image it rewrites (entries of other models are kept). The Sink reports each record
it renames into place (`wrote`), so at the end the snapshot is what OUT holds and the
summaries are written from it (`summarise`) instead of reading every record again.

That is exact only while nobody else writes records: a run holding OUT's exclusive lock.
Shards share OUT, so a sharded run (or one whose snapshot was read before anyone held
the lock) rebuilds the summaries from disk, under the summary lock, as `legitseg
summary` does.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from legitseg.output.records import ImageRecord, RecordError

log = logging.getLogger(__name__)
RECORDS = "records"
_SUFFIX = ".json"


def order(name: str) -> tuple[str, ...]:
    """Sort key of a record name: the order of its path under records/, component by component
    (as `sorted(Path)` orders them: `a/b` before `a-c`)."""
    return tuple(f"{name}{_SUFFIX}".split("/"))


@dataclass
class Resume:
    """OUT's records by output name (their path under records/, less `.json`).

    `unreadable` maps names of files under records/ that are not valid records to their
    OUT-relative path; `exact` says whether the snapshot stays what OUT holds, apart from
    what this run writes (see the module docstring); `reads` counts record files parsed.
    """

    out: Path
    records: dict[str, ImageRecord] = field(default_factory=dict)
    unreadable: dict[str, str] = field(default_factory=dict)
    exact: bool = True
    reads: int = 0

    @classmethod
    def read(cls, out: Path, *, exact: bool) -> Resume:
        """Parse every `*.json` under OUT/records/ once. A file that is not a record is logged and
        kept in `unreadable` (its image, if any, is processed again)."""
        resume = cls(out, exact=exact)
        root = out / RECORDS
        if not root.is_dir():
            return resume
        for path in sorted(p for p in root.rglob(f"*{_SUFFIX}") if p.is_file()):
            name = path.relative_to(root).as_posix()[: -len(_SUFFIX)]
            resume.reads += 1
            try:
                resume.records[name] = ImageRecord.from_json(json.loads(path.read_text(encoding="utf-8")))
            except (OSError, ValueError, RecordError) as err:
                # Only complete records are renamed into place; anything else is foreign or damaged.
                log.warning("%s is not a valid record (%s): left out of the summaries; "
                            "its image, if any, is processed again", path, err)
                resume.unreadable[name] = str(path.relative_to(out))
        return resume

    def get(self, name: str) -> ImageRecord | None:
        """The record OUT held under `name` when the run began (or this run wrote since)."""
        return self.records.get(name)

    def wrote(self, record: ImageRecord) -> None:
        """Note a record this run renamed into place (it replaces whatever was under its name)."""
        self.records[record.name] = record
        self.unreadable.pop(record.name, None)

    def in_order(self) -> list[ImageRecord]:
        """The records in the order of their files under records/ (that of a rebuild)."""
        return [self.records[n] for n in sorted(self.records, key=order)]

    def unreadable_paths(self) -> list[str]:
        return [self.unreadable[n] for n in sorted(self.unreadable, key=order)]
