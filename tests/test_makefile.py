"""`make` picks the first Python >= 3.11 on PATH, says which, or names what to install.

Runs the real Makefile's `python` target (the same script `make install` uses to
create .venv) with a PATH that holds only shims, so no venv is created.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MAKE = shutil.which("make")
pytestmark = pytest.mark.skipif(MAKE is None, reason="make is not installed")


def shim(folder: Path, name: str, good: bool = True) -> None:
    """An executable `name` that is this test's Python (good) or one that fails like Python 3.10 would."""
    folder.mkdir(exist_ok=True)
    body = f'exec {sys.executable} "$@"' if good else "exit 1"
    (folder / name).write_text(f"#!/bin/sh\n{body}\n")
    (folder / name).chmod(0o755)


def make_python(path: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run([MAKE, "-s", "--no-print-directory", "python"], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env={"PATH": str(path), **env})


def version() -> str:
    return ".".join(map(str, sys.version_info[:3]))


def test_only_python3_12_on_path_is_chosen(tmp_path):
    shim(tmp_path, "python3.12")
    r = make_python(tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stderr == f"using python3.12 (Python {version()}) for {REPO.name}/.venv\n"


def test_a_python_older_than_3_11_is_skipped(tmp_path):
    shim(tmp_path, "python3.11", good=False)  # e.g. a pyenv shim whose version is not installed
    shim(tmp_path, "python3")
    r = make_python(tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stderr.startswith("using python3 (Python ")


def test_python_variable_is_tried_first(tmp_path):
    shim(tmp_path, "python3.11")
    shim(tmp_path, "python3.13")
    r = make_python(tmp_path, PYTHON="python3.13")
    assert r.stderr.startswith("using python3.13 (Python ")


def test_no_python_names_what_to_install(tmp_path):
    shim(tmp_path, "python3", good=False)
    r = make_python(tmp_path)
    assert r.returncode != 0
    assert ("no Python >= 3.11 found (tried: python3.11 python3.12 python3.13 python3); "
            "install Python 3.11, 3.12 or 3.13") in r.stderr
