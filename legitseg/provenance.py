"""Versions and environment facts recorded in run.json and shown by `legitseg info`."""

from __future__ import annotations

import platform
import re
import sys
from importlib import metadata
from pathlib import Path

from legitseg import __version__

# Distribution names whose versions every run records (SPEC 5, run.json).
RECORDED = {
    "torch": "torch",
    "segmentation_models_pytorch": "segmentation-models-pytorch",
    "timm": "timm",
    "opencv": "opencv-python-headless",
    "numpy": "numpy",
    "onnxruntime": "onnxruntime",
}
LOCK_FILE = Path(__file__).resolve().parent.parent / "requirements_lock.txt"


def dist_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"legitseg": __version__, "python": platform.python_version()}
    out.update({key: dist_version(dist) for key, dist in RECORDED.items()})
    return out


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_mismatches(lock: Path = LOCK_FILE) -> list[str] | None:
    """Installed packages whose version differs from requirements_lock.txt; None when there is no lock file."""
    if not lock.is_file():
        return None
    diffs = []
    for line in lock.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" not in line:
            continue
        name, want = (part.strip() for part in line.split("==", 1))
        have = dist_version(name)
        if have is None or have.split("+")[0] != want.split("+")[0]:
            diffs.append(f"{name}: locked {want}, installed {have or 'none'}")
    return diffs


def cuda_devices() -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return []
    return [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]


def command_line() -> list[str]:
    return [Path(sys.argv[0]).name, *sys.argv[1:]]
