"""Who may write to an output folder: flock locks under OUT.

- An unsharded run (and `legitseg summary`) holds an exclusive lock on
  `OUT/.legitseg.lock`: nothing else runs on OUT meanwhile.
- A shard `i/N` holds a shared lock on `OUT/.legitseg.lock` (shards exclude unsharded
  runs, not each other) plus an exclusive lock on `OUT/.legitseg.shard-i-of-N.lock`
  (a second process on the same shard exits 5). While shards of one split run, a shard
  of another split (other N, whose parts would overlap) is refused too.
- `summary_lock` serialises the rebuilds of scores.jsonl/csv, so the shard that
  finishes last writes the complete set.

The kernel drops a lock when its process ends, however it ends (SIGKILL included),
so a stale lock file never blocks the next run. On NFS, Linux implements flock with
the protocol's byte-range locks (NLM for v3, lock state for v4), which hold across
hosts; docs/scale.md says what a shared file system must provide.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from legitseg.errors import OutputLocked, RuntimeFailure
from legitseg.output.shard import Shard

LOCK_NAME = ".legitseg.lock"
SUMMARY_LOCK = ".legitseg.summary.lock"
_SHARD_GLOB = ".legitseg.shard-*-of-*.lock"


def shard_lock_name(shard: Shard) -> str:
    return f".legitseg.{shard.tag}.lock"


def _open(path: Path) -> int:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise RuntimeFailure(f"output folder {path.parent} is not writable: {err.strerror or err}") from err


def _try(fd: int, mode: int) -> bool:
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _holder(fd: int) -> str:
    return os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"


class OutputLock:
    """Holds OUT (or one shard of it) until `release()` or process exit."""

    def __init__(self, out: Path, shard: Shard | None = None):
        self.out = out
        self.shard = shard
        self.path = out / LOCK_NAME
        self._fds: list[int] = []

    @property
    def exclusive(self) -> bool:
        """Whether no other legitseg process can be writing to OUT (an unsharded lock)."""
        return self.held and self.shard is None

    def acquire(self) -> None:
        """Raise OutputLocked (exit 5) naming the holder, or RuntimeFailure if OUT is not writable."""
        fd = _open(self.path)
        if not _try(fd, fcntl.LOCK_SH if self.shard else fcntl.LOCK_EX):
            holder = _holder(fd)
            os.close(fd)
            who = f"PID {holder}" if holder != "unknown" or self.shard else self._shard_holders()
            raise OutputLocked(
                f"output folder {self.out} is in use by another legitseg run ({who}); "
                "wait for it to finish or choose another --out") from None
        self._fds.append(fd)
        if self.shard is None:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return
        try:
            self._acquire_shard(self.shard)
        except BaseException:
            self.release()
            raise

    def _acquire_shard(self, shard: Shard) -> None:
        path = self.out / shard_lock_name(shard)
        fd = _open(path)
        if not _try(fd, fcntl.LOCK_EX):
            holder = _holder(fd)
            os.close(fd)
            raise OutputLocked(
                f"shard {shard} of output folder {self.out} is in use by another legitseg run "
                f"(PID {holder}); wait for it to finish") from None
        self._fds.append(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        for other in sorted(self.out.glob(_SHARD_GLOB)):
            if other.name.endswith(f"-of-{shard.count}.lock") or not self._held_by_other(other):
                continue
            raise OutputLocked(
                f"output folder {self.out} is being processed as shards of another split "
                f"({other.name}); every shard of one OUT must use the same N (--shard i/{shard.count})")

    @staticmethod
    def _held_by_other(path: Path) -> bool:
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            return False
        try:
            free = _try(fd, fcntl.LOCK_EX)
            if free:
                fcntl.flock(fd, fcntl.LOCK_UN)
            return not free
        finally:
            os.close(fd)

    def _shard_holders(self) -> str:
        pids = []
        for path in sorted(self.out.glob(_SHARD_GLOB)):
            with contextlib.suppress(OSError):
                pid = path.read_text(errors="replace").strip()
                if pid:
                    pids.append(f"{path.name[len('.legitseg.'):-len('.lock')]} PID {pid}")
        return "shards: " + ", ".join(pids) if pids else "PID unknown"

    @property
    def held(self) -> bool:
        return bool(self._fds)

    def release(self) -> None:
        # The shard file first: its PID is cleared before the shared lock on OUT goes.
        for fd in reversed(self._fds):
            if fd != self._fds[0] or self.shard is None:
                try:
                    os.ftruncate(fd, 0)
                except OSError:
                    pass  # read-only by now; the lock itself still goes with the descriptor
            os.close(fd)
        self._fds = []

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def summary_lock(out: Path) -> Iterator[None]:
    """Serialise summary rebuilds among the processes writing to OUT (blocking; they are short)."""
    fd = _open(out / SUMMARY_LOCK)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
