"""Versions and environment facts recorded in every run file and shown by `legitseg info`.

torch is imported only inside the functions that describe it (`math_mode`,
`cuda_facts`, `cuda_devices`), so importing this module stays cheap.
"""

from __future__ import annotations

import getpass
import hashlib
import os
import platform
import re
import socket
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from legitseg._version import __version__

# Distribution names whose versions every run records (run.json "versions").
RECORDED = {
    "torch": "torch",
    "segmentation_models_pytorch": "segmentation-models-pytorch",
    "timm": "timm",
    "opencv": "opencv-python-headless",
    "numpy": "numpy",
    "onnxruntime": "onnxruntime",
}
LOCK_FILE = Path(__file__).resolve().parent.parent / "requirements_lock.txt"
LOCK_ENV = "LEGITSEG_LOCK_FILE"

# Environment variables that change results or speed: thread pools, BLAS/oneDNN code
# paths, cuBLAS/cuDNN/TF32 switches, device visibility, allocator, and legitseg's own.
ENV_NAMES = frozenset({
    "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "CUDA_LAUNCH_BLOCKING", "CUDA_MODULE_LOADING",
    "NVIDIA_TF32_OVERRIDE", "ATEN_CPU_CAPABILITY", "GOMP_CPU_AFFINITY", "HF_HUB_OFFLINE",
})
ENV_PREFIXES = ("OMP_", "MKL_", "KMP_", "OPENBLAS_", "BLIS_", "VECLIB_", "ONEDNN_", "DNNL_",
                "CUBLAS_", "CUBLASLT_", "CUDNN_", "TORCH_CUDNN_", "TORCH_", "PYTORCH_",
                "OPENCV_", "ORT_", "LEGITSEG_")
# Never recorded, whatever their prefix: run files are shared with auditors.
_SECRET = re.compile(r"TOKEN|SECRET|PASSW|KEY|CREDENTIAL", re.IGNORECASE)


def dist_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"legitseg": __version__, "python": platform.python_version()}
    out.update({key: dist_version(dist) for key, dist in RECORDED.items()})
    return out


def norm_name(name: str) -> str:
    """A distribution name as PEP 503 compares them (`Foo_Bar.baz` -> `foo-bar-baz`)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_distributions() -> dict[str, tuple[str, str]]:
    """Every importable distribution: normalised name -> (name as published, version).

    When one name is installed twice on sys.path, the first (the one Python imports) wins.
    """
    found: dict[str, tuple[str, str]] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"] if dist.metadata else None
        if name and norm_name(name) not in found:
            found[norm_name(name)] = (name, dist.version)
    return dict(sorted(found.items()))


# -- requirements_lock.txt ------------------------------------------------------------
@dataclass
class LockComparison:
    """Installed distributions against a lock file of `name==version` lines."""

    path: Path
    sha256: str
    locked: dict[str, tuple[str, str]]                 # norm name -> (name, locked version)
    different: dict[str, tuple[str, str]] = field(default_factory=dict)  # -> (locked, installed)
    missing: dict[str, str] = field(default_factory=dict)               # -> locked version
    unlocked: dict[str, str] = field(default_factory=dict)              # installed, not in the lock
    optional: set[str] = field(default_factory=set)     # locked keys pinned by an extra's file
    extra_files: dict[Path, str] = field(default_factory=dict)          # extra's pin file -> sha256

    @property
    def matches(self) -> bool:
        """Every locked distribution is installed at its locked version (extras are allowed)."""
        return not self.different and not self.missing


# Pins of the optional extras (`pip install 'legitseg[ray]'`), read from beside the lock:
# a distribution they pin is locked when installed; an extra not installed is no mismatch.
EXTRA_LOCKS = ("requirements_ray.txt",)


def lock_file() -> Path:
    """`$LEGITSEG_LOCK_FILE` if set, else requirements_lock.txt of the source tree."""
    return Path(os.environ[LOCK_ENV]) if os.environ.get(LOCK_ENV) else LOCK_FILE


def _same_version(locked: str, installed: str) -> bool:
    # torch wheels report 2.14.1 in metadata but 2.14.1+cu130 in some indexes: the local
    # label names the build, not the release, so it does not decide a match.
    return locked.split("+")[0] == installed.split("+")[0]


def compare_lock(lock: Path | None = None) -> LockComparison | None:
    """Compare installed distributions with `lock`; None when the file does not exist.

    Raises OSError when the file exists but cannot be read.
    """
    lock = lock or lock_file()
    if not lock.is_file():
        return None
    data = lock.read_bytes()
    locked = _pins(data)
    result = LockComparison(lock, hashlib.sha256(data).hexdigest(), locked)
    for extra in (lock.parent / name for name in EXTRA_LOCKS):
        if extra.is_file() and extra.resolve() != lock.resolve():
            extra_data = extra.read_bytes()
            result.extra_files[extra] = hashlib.sha256(extra_data).hexdigest()
            for key, pin in _pins(extra_data).items():
                if key not in locked:
                    locked[key] = pin
                    result.optional.add(key)
    installed = installed_distributions()
    for key, (_, want) in locked.items():
        if key not in installed:
            if key not in result.optional:
                result.missing[key] = want
        elif not _same_version(want, installed[key][1]):
            result.different[key] = (want, installed[key][1])
    own = norm_name("legitseg")
    result.unlocked = {k: v for k, (_, v) in installed.items() if k not in locked and k != own}
    return result


def _pins(data: bytes) -> dict[str, tuple[str, str]]:
    """`name==version` lines -> norm name -> (name, version); `ray[data]==2.60.0` pins `ray`."""
    pins: dict[str, tuple[str, str]] = {}
    for line in data.decode("utf-8", errors="replace").splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, want = (part.strip() for part in line.split("==", 1))
            name = name.split("[", 1)[0].strip()
            pins[norm_name(name)] = (name, want)
    return pins


def lock_mismatches(lock: Path | None = None) -> list[str] | None:
    """Locked packages missing or at another version, one line each; None when there is no lock file."""
    cmp = compare_lock(lock)
    if cmp is None:
        return None
    lines = [f"{cmp.locked[k][0]}: locked {want}, installed {have}" for k, (want, have) in cmp.different.items()]
    lines += [f"{cmp.locked[k][0]}: locked {want}, installed none" for k, want in cmp.missing.items()]
    return sorted(lines, key=str.lower)


# -- the machine ------------------------------------------------------------------------
def cpu_facts(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, Any]:
    """CPU model, logical cores and instruction-set flags (flags only where /proc/cpuinfo exists)."""
    facts: dict[str, Any] = {"model": platform.processor() or platform.machine(),
                             "machine": platform.machine(), "logical_cores": os.cpu_count(),
                             "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                             "flags": []}
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return facts
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and value.strip():
            facts["model"] = value.strip()
        elif key in ("flags", "features") and not facts["flags"]:
            facts["flags"] = sorted(value.split())
        if facts["flags"] and key == "" and facts["model"]:
            break  # the first processor block says it all
    return facts


def os_facts() -> dict[str, str]:
    info = {"system": platform.system(), "release": platform.release(), "version": platform.version(),
            "platform": platform.platform()}
    try:
        info["distribution"] = platform.freedesktop_os_release().get("PRETTY_NAME", "")
    except OSError:
        pass  # not a Linux with /etc/os-release; system and release say enough
    return info


def python_facts() -> dict[str, str]:
    return {"version": platform.python_version(), "implementation": platform.python_implementation(),
            "executable": sys.executable, "compiler": platform.python_compiler()}


def cuda_facts() -> dict[str, Any]:
    """CUDA and cuDNN versions torch was built with, and each visible device. Imports torch."""
    import torch

    facts: dict[str, Any] = {"torch_cuda": torch.version.cuda,
                             "cudnn": _cudnn_version(torch), "available": torch.cuda.is_available(),
                             "devices": []}
    if facts["available"]:
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            facts["devices"].append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                                     "memory_bytes": p.total_memory, "uuid": str(getattr(p, "uuid", ""))})
    return facts


def _cudnn_version(torch) -> str | None:
    v = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return None if v is None else f"{v // 10000}.{v // 100 % 100}.{v % 100}"


def cuda_devices() -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return []
    return [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]


# -- this process -------------------------------------------------------------------------
def command_line() -> list[str]:
    return [Path(sys.argv[0]).name, *sys.argv[1:]]


def _user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no login name and no passwd entry (containers)
        return str(os.getuid()) if hasattr(os, "getuid") else "unknown"


def relevant_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The set environment variables that can change results or speed (see ENV_PREFIXES)."""
    environ = os.environ if environ is None else environ
    return {k: environ[k] for k in sorted(environ)
            if (k in ENV_NAMES or k.startswith(ENV_PREFIXES)) and not _SECRET.search(k)}


def environment() -> dict[str, Any]:
    """Who ran what, where: for the run file. Does not import torch."""
    return {"hostname": socket.gethostname(), "user": _user(), "pid": os.getpid(),
            "working_directory": os.getcwd(), "command_line": list(sys.argv),
            "python_executable": sys.executable, "environment": relevant_environment()}


def math_mode(device: str, precision: str) -> dict[str, Any]:
    """The effective float math of a forward pass on `device` at `precision`. Imports torch.

    `convolution_fp32` and `matmul_fp32` say what fp32 operations really compute with on that
    device: "ieee" (true fp32) or "tf32" (10-bit mantissa, CUDA only). Reads the flags, changes nothing.
    """
    import torch

    cuda = str(device).startswith("cuda")
    tf32_off_by_env = os.environ.get("NVIDIA_TF32_OVERRIDE") == "0"
    legacy_conv = _legacy(lambda: torch.backends.cudnn.allow_tf32)
    legacy_matmul = _legacy(lambda: torch.backends.cuda.matmul.allow_tf32)
    matmul_precision = _legacy(torch.get_float32_matmul_precision)
    if cuda:
        # torch >= 2.9 has two spellings; an explicit new-style fp32_precision wins, else
        # the legacy allow_tf32 flags (and float32_matmul_precision) decide.
        conv = _fp32_precision(torch, ("cudnn", "conv"), ("cudnn",), ()) or (
            "tf32" if legacy_conv else "ieee")
        matmul = _fp32_precision(torch, ("cuda", "matmul"), ("cuda",), ()) or (
            "tf32" if legacy_matmul or matmul_precision not in ("highest", None) else "ieee")
        if tf32_off_by_env:  # the driver-level switch wins over every framework flag
            conv, matmul = ("ieee" if v == "tf32" else v for v in (conv, matmul))
    else:
        conv = _fp32_precision(torch, ("mkldnn", "conv"), ("mkldnn",), ()) or "ieee"
        matmul = _fp32_precision(torch, ("mkldnn", "matmul"), ("mkldnn",), ()) or "ieee"
    mode: dict[str, Any] = {
        "device": str(device),
        "precision": precision,
        "autocast_dtype": {"fp16": "float16", "bf16": "bfloat16"}.get(precision),
        "convolution_fp32": conv,
        "matmul_fp32": matmul,
        "float32_matmul_precision": matmul_precision,
        "cuda_matmul_allow_tf32": legacy_matmul,
        "cudnn_allow_tf32": legacy_conv,
        "cuda_matmul_allow_fp16_reduced_precision_reduction":
            torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction,
        "cuda_matmul_allow_bf16_reduced_precision_reduction":
            torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction,
        "cudnn_enabled": torch.backends.cudnn.enabled,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "mkldnn_enabled": torch.backends.mkldnn.enabled,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
    }
    for key, path in (("cuda_matmul_fp32_precision", ("cuda", "matmul")),
                      ("cudnn_conv_fp32_precision", ("cudnn", "conv")),
                      ("mkldnn_fp32_precision", ("mkldnn",))):
        value = _backend_attr(torch, path, "fp32_precision")
        if value is not None:  # torch >= 2.9 spelling
            mode[key] = value
    return mode


def _legacy(read):
    try:
        return read()
    except RuntimeError:  # torch refuses to answer once legacy and new TF32 APIs were mixed
        return None


def _backend_attr(torch, path: tuple[str, ...], name: str):
    obj = torch.backends
    for part in path:
        obj = getattr(obj, part, None)
    return getattr(obj, name, None)


def _fp32_precision(torch, *chain: tuple[str, ...]) -> str | None:
    """The first explicit fp32_precision along `chain` (each level may say "none": inherit)."""
    for path in chain:
        value = _backend_attr(torch, path, "fp32_precision")
        if value not in (None, "none"):
            return value
    return None
