"""One run per output folder: an fcntl lock on OUT/.legitseg.lock.

The kernel drops the lock when the process ends, however it ends (SIGKILL
included), so a stale lock file never blocks the next run.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from legitseg.errors import OutputLocked, RuntimeFailure

LOCK_NAME = ".legitseg.lock"


class OutputLock:
    """Holds the lock on OUT until `release()` or process exit."""

    def __init__(self, out: Path):
        self.path = out / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Raise OutputLocked (exit 5) naming the holder's PID, or RuntimeFailure if OUT is not writable."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise RuntimeFailure(f"output folder {self.path.parent} is not writable: {err.strerror or err}") from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OutputLocked(
                f"output folder {self.path.parent} is in use by another legitseg run (PID {holder}); "
                "wait for it to finish or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
            except OSError:
                pass  # read-only by now; the lock itself still goes with the descriptor
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
