"""Low-level file IO shared by every writer: atomic and staged writes, hashing, temp-file clean-up.

The bottom layer: it imports nothing from legitseg but `errors`, so the ONNX
export cache, the writers and the records can all use it without importing
each other.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import logging
import math
import os
import re
import secrets
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from legitseg.errors import RuntimeFailure

TMP_SUFFIX = ".legitseg-tmp"


def cache_root(environ: Mapping[str, str] | None = None) -> Path:
    """$LEGITSEG_CACHE_DIR, else $XDG_CACHE_HOME/legitseg, else ~/.cache/legitseg.

    Read once per run, into `options.Environment.cache_dir`; deeper code is handed the folder.
    """
    env = os.environ if environ is None else environ
    root = env.get("LEGITSEG_CACHE_DIR")
    if root:
        return Path(root)
    xdg = env.get("XDG_CACHE_HOME")
    home = Path(env["HOME"]) if env.get("HOME") else Path.home()
    return (Path(xdg) if xdg else home / ".cache") / "legitseg"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _tmp_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.{os.getpid()}-{secrets.token_hex(4)}{TMP_SUFFIX}")


@functools.cache
def _syncfs() -> Callable[[int], int] | None:
    """libc's syncfs where it reports write-back errors (Linux >= 5.8), else None."""
    if sys.platform != "linux":
        return None
    release = tuple(int(n) for n in re.findall(r"\d+", os.uname().release)[:2])
    if release < (5, 8):  # older kernels' syncfs returns 0 even when write-back failed
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    return fn


class Disk:
    """The file-system calls behind every write: new file, flush, rename, remove.

    All writers go through the one instance `disk`, so a test can observe the order of
    operations on real files by putting a recording subclass in its place.
    """

    def write_new(self, path: Path, data: bytes, *, fsync: bool) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def flush(self, paths: Sequence[Path], watched: Sequence[int]) -> None:
        """Make the data of `paths` durable. With `watched` (one open folder per file system the
        paths lie on, opened before they were written), one syncfs per file system: it also reports
        any write-back error on that file system since the folder was opened. Else fsync each."""
        fn = _syncfs() if watched else None
        if fn is None:
            for path in paths:
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            return
        for fd in watched:
            if fn(fd) != 0:
                code = ctypes.get_errno()
                raise OSError(code, os.strerror(code))

    def replace(self, src: Path, dst: Path) -> None:
        os.replace(src, dst)

    def unlink(self, path: Path) -> None:
        path.unlink(missing_ok=True)


disk = Disk()


def _write_tmp(final: Path, data: bytes, fsync: bool) -> Path:
    tmp = _tmp_name(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        disk.write_new(tmp, data, fsync=fsync)
    except OSError as err:
        _remove(tmp)
        raise RuntimeFailure(f"cannot write {final}: {err.strerror or err}") from err
    return tmp


def _remove(tmp: Path) -> None:
    try:
        disk.unlink(tmp)
    except OSError:
        pass  # the folder itself is gone or read-only: nothing left to clean


def atomic_write(final: Path, data: bytes, *, fsync: bool = True) -> None:
    """Write `data` to `final` via a temporary file in the same folder and a rename.

    OSError (disk full, read-only, permissions) becomes RuntimeFailure (exit 4);
    the temporary file is removed and an existing `final` is left untouched.
    """
    tmp = _write_tmp(final, data, fsync)
    try:
        disk.replace(tmp, final)
    except OSError as err:
        _remove(tmp)
        raise RuntimeFailure(f"cannot write {final}: {err.strerror or err}") from err


class Staging:
    """Files written under temporary names now, made durable together and renamed later.

    `stage` writes without flushing (from any thread); `flush` makes a group of staged files
    durable with one call per file system (`Disk.flush`); `rename` then gives them their
    final names in order, so a file renamed last (a record) appears only once everything
    renamed before it is durable. `discard` removes what was never renamed.
    """

    def __init__(self) -> None:
        self._watched: dict[int, int] = {}  # st_dev -> fd of a folder on it
        self._folders: set[Path] = set()
        self._lock = threading.Lock()

    def _watch(self, folder: Path) -> None:
        # A folder on each file system is opened before the first file there is written: syncfs
        # on it then reports every write-back error since, whoever else flushed in between.
        if _syncfs() is None or folder in self._folders:
            return
        dev = os.stat(folder).st_dev
        with self._lock:
            if dev not in self._watched:
                self._watched[dev] = os.open(folder, os.O_RDONLY)
            self._folders.add(folder)

    def stage(self, final: Path, data: bytes) -> tuple[Path, Path]:
        """Write `data` beside `final` under a temporary name; returns (temporary, final).
        Raises RuntimeFailure (the temporary file removed) when it cannot be written."""
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            self._watch(final.parent)
        except OSError as err:
            raise RuntimeFailure(f"cannot write {final}: {err.strerror or err}") from err
        return _write_tmp(final, data, fsync=False), final

    def flush(self, files: Sequence[tuple[Path, Path]]) -> None:
        """Make the data of staged `files` (temporary, final) durable, in one call per file system.
        Raises RuntimeFailure."""
        if not files:
            return
        try:
            disk.flush([tmp for tmp, _ in files], list(self._watched.values()))
        except OSError as err:
            raise RuntimeFailure(f"cannot flush {files[0][1].parent} to disk: {err.strerror or err}") from err

    @staticmethod
    def rename(files: Sequence[tuple[Path, Path]]) -> None:
        """Give flushed `files` their final names, in order. Raises RuntimeFailure; what was not
        renamed is left for `discard`."""
        for tmp, final in files:
            try:
                disk.replace(tmp, final)
            except OSError as err:
                raise RuntimeFailure(f"cannot write {final}: {err.strerror or err}") from err

    @staticmethod
    def discard(files: Sequence[tuple[Path, Path]]) -> None:
        for tmp, _ in files:
            _remove(tmp)

    def close(self) -> None:
        with self._lock:
            for fd in self._watched.values():
                os.close(fd)
            self._watched.clear()


def finite(value: Any) -> Any:
    """`value` with every non-finite float replaced by None (JSON has no NaN or Infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def dumps(data: Any, **kwargs: Any) -> str:
    """json.dumps that refuses NaN/Infinity (they are replaced by null first)."""
    return json.dumps(finite(data), allow_nan=False, **kwargs)


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write(path, (dumps(data, indent=2) + "\n").encode())


def read_choices(path: Path | None) -> dict[str, Any]:
    """A cache file of remembered choices (key -> value); {} when there is none or it is damaged."""
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def remember_choice(path: Path | None, key: str, value: Any) -> None:
    """Add one choice to such a file. Not fsynced, and never raises: a cache that cannot be
    written costs a new measurement next time, nothing else."""
    if path is None:
        return
    data = read_choices(path)
    data[key] = value
    try:
        atomic_write(path, json.dumps(data, indent=1, sort_keys=True).encode(), fsync=False)
    except Exception as err:  # noqa: BLE001
        logging.getLogger(__name__).debug("%s not written: %s", path, err)


def remove_stale_tmp(out: Path) -> int:
    """Delete temporary files left by a killed run. Call only while holding OUT's lock."""
    removed = 0
    for p in out.rglob(f"*{TMP_SUFFIX}"):
        try:
            p.unlink()
            removed += 1
        except OSError:
            pass  # vanished or not removable: it never carries a final name, so it is harmless
    return removed
