"""`--shard i/N`: a deterministic split of a run's images into N disjoint parts.

An image belongs to shard `int(sha256(output name)) mod N`. The output name
(`Source.name`) is stable across runs and the same in every process given the same
INPUTs, so N processes started with `--shard 0/N` ... `--shard N-1/N` over the same
INPUTs take every image exactly once, whatever order they start or finish in.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeVar

from legitseg.errors import UsageError

_FORM = re.compile(r"\s*(-?\d+)\s*/\s*(-?\d+)\s*")
T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    """Part `index` (0-based) of `count`."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        """`"i/N"` with 0 <= i < N. Raises UsageError (exit 2) naming the value and the rule."""
        match = _FORM.fullmatch(text)
        if match is None:
            raise UsageError(f"--shard {text!r}: expected i/N with whole numbers, e.g. 0/4 "
                             "(part i of N, counted from 0)")
        index, count = int(match.group(1)), int(match.group(2))
        if count < 1:
            raise UsageError(f"--shard {text!r}: N must be at least 1")
        if not 0 <= index < count:
            raise UsageError(f"--shard {text!r}: i must be between 0 and {count - 1} "
                             f"(shards are counted from 0: 0/{count} ... {count - 1}/{count})")
        return cls(index, count)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def tag(self) -> str:
        """File-name form, as in `.legitseg.shard-1-of-3.lock`."""
        return f"shard-{self.index}-of-{self.count}"

    def owns(self, name: str) -> bool:
        return shard_of(name, self.count) == self.index

    def select(self, items: Iterable[T], name=lambda item: item.name) -> list[T]:
        """The items of this shard, in their order; `name(item)` is the output name."""
        return [item for item in items if self.owns(name(item))]


def shard_of(name: str, count: int) -> int:
    """The shard (0..count-1) that an output name belongs to: sha256 of its UTF-8 bytes, mod count."""
    digest = hashlib.sha256(name.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest, "big") % count
