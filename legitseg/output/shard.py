"""`--shard i/N`: a deterministic split of a run's images into N disjoint parts.

An image belongs to shard `int(sha256(output name)) mod N`. The output name
(`Source.name`) is stable across runs and the same in every process given the same
INPUTs, so N processes started with `--shard 0/N` ... `--shard N-1/N` over the same
INPUTs take every image exactly once, whatever order they start or finish in.

The first shard to run on an OUT records its split in `OUT/shards.json`
(`claim_layout`); a shard of another N is refused afterwards (exit 2), whether or not
the first is still running, because parts of two splits overlap and leave gaps.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from legitseg._version import __version__
from legitseg.errors import RuntimeFailure, UsageError
from legitseg.fsio import TMP_SUFFIX

_FORM = re.compile(r"\s*(-?\d+)\s*/\s*(-?\d+)\s*")
T = TypeVar("T")
LAYOUT_NAME = "shards.json"
# What every shard of one OUT must agree on: the rule (changing it would need a new
# name here) and N. INPUTs and models may differ between runs, as for unsharded runs.
SPLIT_RULE = "sha256(output name) mod N"


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


# -- the layout recorded in OUT ---------------------------------------------------------------
def _describe(layout: dict[str, Any]) -> str:
    by = ", ".join(f"{k} {layout[k]}" for k in ("first_shard", "host", "started") if layout.get(k))
    return f"N={layout.get('count')} ({layout.get('split')}{'; ' + by if by else ''})"


def read_layout(out: Path) -> dict[str, Any] | None:
    """OUT's recorded split, or None when no shard has run on OUT. Raises UsageError when
    the file is there but is not a layout (edited or damaged: legitseg writes it whole)."""
    path = out / LAYOUT_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as err:
        raise UsageError(f"cannot read {path}: {err.strerror or err}") from err
    try:
        layout = json.loads(text)
    except ValueError as err:
        raise UsageError(f"{path} is not a shard layout ({err}); delete it if no shard of OUT "
                         "will run again") from err
    if not isinstance(layout, dict) or not isinstance(layout.get("count"), int):
        raise UsageError(f"{path} is not a shard layout (no whole number `count`); delete it if no "
                         "shard of OUT will run again")
    return layout


def check_layout(out: Path, shard: Shard) -> None:
    """Raise UsageError (exit 2) naming both layouts when OUT records another split than `shard`'s."""
    layout = read_layout(out)
    if layout is None or (layout["count"] == shard.count and layout.get("split") == SPLIT_RULE):
        return
    mine = {"count": shard.count, "split": SPLIT_RULE}
    raise UsageError(
        f"--shard {shard}: output folder {out} is split as {_describe(layout)} ({out / LAYOUT_NAME}), "
        f"this run as {_describe(mine)}; every shard of one OUT must use the same N: use "
        f"--shard i/{layout['count']}, another -o, or delete {LAYOUT_NAME} once no shard of the old "
        "split will run again")


def claim_layout(out: Path, shard: Shard) -> None:
    """Record `shard`'s split in OUT/shards.json unless one is recorded, then check it.

    The file is created whole or not at all (a hard link of a complete temporary file,
    which fails when the name exists), so of two shards that start together exactly one
    records its N and the other is checked against it. Raises UsageError (another N)
    or RuntimeFailure (OUT not writable).
    """
    path = out / LAYOUT_NAME
    if not path.exists():
        layout = {"count": shard.count, "split": SPLIT_RULE, "first_shard": str(shard),
                  "host": socket.gethostname(), "pid": os.getpid(),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "legitseg": __version__}
        _create_once(path, (json.dumps(layout, indent=2) + "\n").encode())
    check_layout(out, shard)


def _create_once(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{TMP_SUFFIX}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another shard recorded its layout first: check_layout compares with it
        except OSError as err:
            if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            # No hard links on this file system: an exclusive create is still first-wins.
            with open(path, "xb") as f:
                f.write(data)
    except FileExistsError:
        pass
    except OSError as err:
        raise RuntimeFailure(f"cannot record the shard layout in {path}: {err.strerror or err}") from err
    finally:
        tmp.unlink(missing_ok=True)
