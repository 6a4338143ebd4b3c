"""ONNX export of a verified model, and the cache of exported graphs (docs/onnx.md).

A model is exported from the verified torch module (after its sha256 check) and
cached under a key of everything that shapes the graph. The runner that uses the
graph and the parity gate are in `inference/ort_runner.py`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from legitseg._version import __version__
from legitseg.errors import LegitsegError
from legitseg.fsio import atomic_write
from legitseg.provenance import dist_version

if TYPE_CHECKING:
    from legitseg.models.factory import LoadedModel

log = logging.getLogger(__name__)

OPSET = 17
INPUT, OUTPUT = "input", "logits"
# Bump when the way graphs are exported changes, so old cache entries are not reused.
EXPORT_FORMAT = 1


class ExportFailed(LegitsegError):
    """A model could not be exported to ONNX or does not run under ONNX Runtime (exit 4)."""


# -- export --------------------------------------------------------------------------------
def _example_shape(loaded: LoadedModel) -> tuple[int, int, int, int]:
    return (2, loaded.spec.in_channels, *loaded.probe_input_size())


def dynamic_axes(loaded: LoadedModel) -> dict[str, dict[int, str]]:
    """Batch is always dynamic; height and width too for `pad` models (native resolution)."""
    spatial = loaded.spec.resize == "pad"
    axes_in = {0: "batch", **({2: "height", 3: "width"} if spatial else {})}
    axes_out = {0: "batch"}
    if loaded.spec.task == "segmentation" and spatial:
        axes_out.update({2: "height", 3: "width"})
    return {INPUT: axes_in, OUTPUT: axes_out}


@contextlib.contextmanager
def _native_output_silenced() -> Iterator[None]:
    """Point file descriptors 1 and 2 at /dev/null for the duration.

    When an op cannot be exported, the TorchScript exporter prints the whole traced
    graph (thousands of lines) from C++ to stdout (its log switch is stuck on in
    torch 2.14): that would corrupt `--jsonl` output and bury the one-line warning
    legitseg gives instead. Exports run before any worker thread starts and before
    anything is written to stdout, so nothing else is lost.
    """
    saved: list[tuple[int, int]] = []
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        with open(os.devnull, "wb") as null:
            for fd in (1, 2):
                saved.append((fd, os.dup(fd)))
                os.dup2(null.fileno(), fd)
    except (OSError, ValueError):  # no usable fds (embedded interpreters): print what it prints
        pass
    try:
        yield
    finally:
        for fd, copy in saved:
            os.dup2(copy, fd)
            os.close(copy)


def export_onnx(loaded: LoadedModel, opset: int = OPSET) -> bytes:
    """The verified torch module as an ONNX graph (legacy TorchScript exporter, on the CPU).

    Raises ExportFailed with the exporter's reason (first line only: the exporter
    appends the whole traced graph to some messages).
    """
    module = loaded.module
    device = next(module.parameters()).device
    x = torch.zeros(_example_shape(loaded), device=device)
    buf = io.BytesIO()
    started = time.perf_counter()
    try:
        with warnings.catch_warnings(), torch.no_grad(), _native_output_silenced():
            warnings.simplefilter("ignore")  # TracerWarnings about Python control flow on shapes
            torch.onnx.export(module, (x,), buf, dynamo=False, opset_version=opset,
                              input_names=[INPUT], output_names=[OUTPUT],
                              dynamic_axes=dynamic_axes(loaded), do_constant_folding=True)
    except Exception as err:
        # The exporter fails with RuntimeError subclasses, TypeError, IndexError,
        # NotImplementedError... depending on the op; every one means "use torch".
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise ExportFailed(f"model {loaded.spec.name!r}: ONNX export failed: {reason}") from err
    finally:
        module.eval()
    log.debug("exported %s to ONNX in %.1fs", loaded.spec.name, time.perf_counter() - started)
    return buf.getvalue()


# -- cache ---------------------------------------------------------------------------------
def cache_folder(cache_dir: Path) -> Path:
    """Where graphs are kept under the run's cache folder (options.Environment.cache_dir)."""
    return cache_dir / "onnx"


def cache_fields(loaded: LoadedModel, opset: int = OPSET) -> dict[str, Any]:
    """Everything that shapes the exported graph; a change in any of them means a new export."""
    spec = loaded.spec
    return {
        "weights_sha256": spec.sha256,
        "task": spec.task,
        "arch": spec.arch,
        "encoder": spec.encoder,
        "in_channels": spec.in_channels,
        "classes": spec.classes,
        "arch_params": spec.arch_params,
        "pooling": spec.pooling if spec.task != "segmentation" else None,
        "resize": spec.resize,
        # stretch, letterbox and tile graphs have a fixed height and width; pad graphs take any size
        "input_size": list(spec.probe_size) if spec.resize != "pad" else None,
        "opset": opset,
        "export_format": EXPORT_FORMAT,
        "torch": torch.__version__,
        "onnx": dist_version("onnx"),
        "segmentation_models_pytorch": dist_version("segmentation-models-pytorch"),
        "timm": dist_version("timm"),
        "legitseg": __version__,
    }


def cache_key(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def _read_cached(onnx_path: Path, meta_path: Path, fields: dict[str, Any]) -> bytes | None:
    """The cached graph if its metadata matches and its bytes hash to the recorded sha256; else None."""
    if not meta_path.exists() and not onnx_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        data = onnx_path.read_bytes()
    except (OSError, ValueError) as err:
        log.warning("ONNX cache entry %s is unreadable (%s); exporting again", onnx_path.name, err)
        return None
    if not isinstance(meta, dict) or meta.get("fields") != json.loads(json.dumps(fields, default=str)):
        log.warning("ONNX cache entry %s does not describe this model; exporting again", onnx_path.name)
        return None
    actual = hashlib.sha256(data).hexdigest()
    if actual != meta.get("onnx_sha256"):
        log.warning("ONNX cache entry %s is corrupt (sha256 %s, expected %s); exporting again",
                    onnx_path.name, actual[:12], str(meta.get("onnx_sha256"))[:12])
        return None
    return data


def _exported(loaded: LoadedModel, opset: int) -> bytes:
    started = time.perf_counter()
    data = export_onnx(loaded, opset)
    log.info("%s: exported to ONNX in %.1fs", loaded.spec.name, time.perf_counter() - started)
    return data


@dataclass
class CachedGraph:
    data: bytes
    sha256: str
    path: Path | None  # None when the cache folder could not be written
    reused: bool


def cached_onnx(loaded: LoadedModel, cache_dir: Path | None, opset: int = OPSET) -> CachedGraph:
    """The model's ONNX graph from the cache under `cache_dir`, or freshly exported and stored there
    (with `cache_dir` None: exported and kept in memory only).

    An entry is used only when its metadata matches and the graph's sha256 is the
    one recorded when it was written; anything else is exported again. When the
    cache cannot be written the graph is used from memory for this run. Raises ExportFailed.
    """
    fields = cache_fields(loaded, opset)
    if cache_dir is None:
        data = _exported(loaded, opset)
        return CachedGraph(data, hashlib.sha256(data).hexdigest(), None, False)
    key = cache_key(fields)
    folder = cache_folder(cache_dir)
    onnx_path, meta_path = folder / f"{key}.onnx", folder / f"{key}.json"
    data = _read_cached(onnx_path, meta_path, fields)
    if data is not None:
        log.info("%s: using cached ONNX graph %s", loaded.spec.name, onnx_path)
        return CachedGraph(data, hashlib.sha256(data).hexdigest(), onnx_path, True)
    data = _exported(loaded, opset)
    digest = hashlib.sha256(data).hexdigest()
    meta = {"fields": fields, "onnx_sha256": digest, "model": loaded.spec.name,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        # The graph first, then the metadata that vouches for it: a reader never
        # accepts a graph whose metadata was written for other bytes.
        atomic_write(onnx_path, data)
        atomic_write(meta_path, (json.dumps(meta, indent=2, default=str) + "\n").encode())
    except LegitsegError as err:
        log.warning("%s: cannot write the ONNX cache (%s); using the export for this run only",
                    loaded.spec.name, err)
        return CachedGraph(data, digest, None, False)
    return CachedGraph(data, digest, onnx_path, False)


