"""Low-level file IO shared by every writer: atomic writes, hashing, temp-file clean-up.

The bottom layer: it imports nothing from legitseg but `errors`, so the ONNX
export cache, the writers and the records can all use it without importing
each other.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
from collections.abc import Mapping
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


def atomic_write(final: Path, data: bytes, *, fsync: bool = True) -> None:
    """Write `data` to `final` via a temporary file in the same folder and a rename.

    OSError (disk full, read-only, permissions) becomes RuntimeFailure (exit 4);
    the temporary file is removed and an existing `final` is left untouched.
    """
    tmp = _tmp_name(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
    except OSError as err:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # the folder itself is gone or read-only: nothing left to clean
        raise RuntimeFailure(f"cannot write {final}: {err.strerror or err}") from err


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
