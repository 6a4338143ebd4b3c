"""Where a run's start-up time goes: named instants, written out with $LEGITSEG_PROFILE.

The steps before the first record happen in several layers (weights hashed and images
found in run.py, torch imported with the device, models built in models/, graphs exported
and gated in inference/), so the marks live here, below all of them. Appending a pair to
a list costs nothing; nothing reads the marks unless a profile is asked for
(engines/profile.py), and `make bench` turns them into the start-up split of
docs/benchmarks.md.
"""

from __future__ import annotations

import time
from collections import deque

# Bounded: a process that builds Predictors for ever (each gate marks) keeps the last few only.
_MARKS: deque[tuple[str, float]] = deque(maxlen=256)


def begin(name: str) -> None:
    """A run starts: forget the marks of whatever came before it in this process, mark `name`."""
    _MARKS.clear()
    mark(name)


def mark(name: str) -> None:
    """Note that `name` has just finished (wall-clock time, comparable across processes)."""
    _MARKS.append((name, time.time()))


def marks() -> list[tuple[str, float]]:
    """Every mark so far, oldest first."""
    return list(_MARKS)
