"""The ONNX Runtime backend: export, cache, parity gate and forward passes on the CPU.

Only the forward pass differs from the torch backend: `OrtRunner` is a
`TorchRunner` whose `forward` runs an ONNX Runtime session, so decoding,
normalisation, padding, postprocessing and writers are shared. A model is
exported from the verified torch module (after its sha256 check), cached under
a key of everything that shapes the graph, and used only after its
probabilities agree with torch's on a probe batch (docs/onnx.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from legitseg import __version__
from legitseg.errors import LegitsegError, UsageError
from legitseg.pipeline.infer import TorchRunner, prep_for
from legitseg.provenance import dist_version
from legitseg.writers import atomic_write

if TYPE_CHECKING:
    import onnxruntime

    from legitseg.factory import LoadedModel
    from legitseg.manifest import ModelSpec

log = logging.getLogger(__name__)

OPSET = 17
INPUT, OUTPUT = "input", "logits"
# Bump when the way graphs are exported changes, so old cache entries are not reused.
EXPORT_FORMAT = 1
THREADS_ENV = "LEGITSEG_ORT_THREADS"
CACHE_ENV = "LEGITSEG_CACHE_DIR"
PROBE_SEED = 0


class ExportFailed(LegitsegError):
    """A model could not be exported to ONNX or does not run under ONNX Runtime (exit 4)."""


# -- threads ------------------------------------------------------------------------------
def available_cores() -> int:
    """Cores this process may run on (respects taskset/cgroup affinity where the OS reports it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def ort_threads() -> int:
    """ONNX Runtime intra-op threads: $LEGITSEG_ORT_THREADS, else every core this process may use.

    Decode and writer threads spend most of their time in GIL-free OpenCV and
    numpy calls, between forward passes; on 2 cores a whole run went 1.5x faster
    with two intra-op threads than with one (docs/onnx.md). Raises UsageError.
    """
    value = os.environ.get(THREADS_ENV, "").strip()
    if not value:
        return available_cores()
    try:
        threads = int(value)
    except ValueError:
        threads = 0
    if threads < 1:
        raise UsageError(f"${THREADS_ENV}={value!r}: expected a whole number of threads >= 1")
    return threads


# -- which backend -------------------------------------------------------------------------
def choose_backend(requested: str | None, spec: ModelSpec, device: torch.device, precision: str) -> str:
    """torch or onnxruntime for one model: `requested` (--backend) if given, else the manifest's.

    auto means onnxruntime on the CPU in fp32, torch otherwise. onnxruntime asked
    for on the command line where it cannot run (CUDA, fp16/bf16) is a UsageError;
    asked for by the manifest, it becomes torch with a warning, since one manifest
    serves CPU and GPU machines alike.
    """
    choice = requested or spec.backend
    fits = device.type == "cpu" and precision == "fp32"
    if choice == "auto":
        return "onnxruntime" if fits else "torch"
    if choice == "onnxruntime" and not fits:
        why = f"the onnxruntime backend runs on the CPU in fp32 only (device {device}, precision {precision})"
        if requested:
            raise UsageError(f"--backend onnxruntime: {why}; use --backend torch or auto")
        log.warning("%s: manifest asks for backend onnxruntime but %s; using torch", spec.name, why)
        return "torch"
    return choice


# -- export --------------------------------------------------------------------------------
def _example_shape(loaded: LoadedModel) -> tuple[int, int, int, int]:
    spec = loaded.spec
    h, w = spec.probe_size
    if spec.resize == "pad":
        s = loaded.stride
        h, w = h + (-h) % s, w + (-w) % s
    return (2, spec.in_channels, h, w)


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
def cache_dir() -> Path:
    """$LEGITSEG_CACHE_DIR/onnx, else $XDG_CACHE_HOME/legitseg/onnx, else ~/.cache/legitseg/onnx."""
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root) / "onnx"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "legitseg" / "onnx"


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
        "pooling": spec.pooling if spec.task == "severity" else None,
        "resize": spec.resize,
        # stretch graphs have a fixed height and width; pad graphs take any size
        "input_size": list(spec.input_size) if spec.resize == "stretch" else None,
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


@dataclass
class CachedGraph:
    data: bytes
    sha256: str
    path: Path | None  # None when the cache folder could not be written
    reused: bool


def cached_onnx(loaded: LoadedModel, opset: int = OPSET) -> CachedGraph:
    """The model's ONNX graph from the cache, or freshly exported and stored there.

    An entry is used only when its metadata matches and the graph's sha256 is the
    one recorded when it was written; anything else is exported again. When the
    cache cannot be written the graph is used from memory for this run. Raises ExportFailed.
    """
    fields = cache_fields(loaded, opset)
    key = cache_key(fields)
    folder = cache_dir()
    onnx_path, meta_path = folder / f"{key}.onnx", folder / f"{key}.json"
    data = _read_cached(onnx_path, meta_path, fields)
    if data is not None:
        log.info("%s: using cached ONNX graph %s", loaded.spec.name, onnx_path)
        return CachedGraph(data, hashlib.sha256(data).hexdigest(), onnx_path, True)
    started = time.perf_counter()
    data = export_onnx(loaded, opset)
    digest = hashlib.sha256(data).hexdigest()
    log.info("%s: exported to ONNX in %.1fs", loaded.spec.name, time.perf_counter() - started)
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


# -- sessions and the runner ---------------------------------------------------------------
def ort_errors() -> tuple[type[Exception], ...]:
    """ONNX Runtime's own exception types (Fail, InvalidGraph, ...): they derive from Exception only."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    return tuple(v for v in vars(state).values() if isinstance(v, type) and issubclass(v, Exception))


def make_session(data: bytes, threads: int | None = None) -> onnxruntime.InferenceSession:
    """A CPU ONNX Runtime session for a serialized graph; `threads` defaults to `ort_threads()`."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or ort_threads()
    options.inter_op_num_threads = 1
    # Idle intra-op threads sleep instead of spinning: in a run, decode and writer
    # threads need those cycles between forward passes.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: ORT's own warnings go to stderr, not our log
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def ort_session(loaded: LoadedModel, threads: int | None = None) -> onnxruntime.InferenceSession:
    """A session for `loaded` through the cache (for benchmarks; runs use `build_ort_runner`).

    Raises ExportFailed. Does not run the parity gate.
    """
    return make_session(cached_onnx(loaded).data, threads)


@dataclass
class OrtRunner(TorchRunner):
    """A TorchRunner whose forward pass runs an ONNX Runtime session on the CPU."""

    session: Any = None
    backend: str = "onnxruntime"
    channels_last: bool = False  # ORT graphs take contiguous NCHW

    def __post_init__(self) -> None:
        if self.device.type != "cpu":
            raise UsageError(f"{self.name}: the onnxruntime backend runs on the CPU only, not {self.device}")
        if self.precision != "fp32":
            raise UsageError(f"{self.name}: the onnxruntime backend runs in fp32 only, not {self.precision}")
        # The torch module stays as it is (the torch runner may share it).
        c = self.loaded.spec.in_channels
        self.module = None
        self.mean = torch.tensor(self.loaded.mean).view(1, c, 1, 1) * 255.0
        self.std = torch.tensor(self.loaded.std).view(1, c, 1, 1) * 255.0
        self.prep = prep_for(self.loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (y,) = self.session.run([OUTPUT], {INPUT: np.ascontiguousarray(x.numpy(), dtype=np.float32)})
        return torch.from_numpy(y)


# -- parity gate ---------------------------------------------------------------------------
def probe_arrays(loaded: LoadedModel) -> list[list[np.ndarray]]:
    """Seeded random uint8 HWC batches of 2 at the probe size; pad models also get an odd size."""
    spec = loaded.spec
    rng = np.random.default_rng(PROBE_SEED)
    h, w = spec.probe_size
    sizes = [(h, w)]
    if spec.resize == "pad":
        # A size off the stride grid exercises padding, cropping and the dynamic axes.
        sizes.append((max(8, h * 3 // 4 + 5), max(8, w // 2 + 3)))
    return [[rng.integers(0, 256, (sh, sw, spec.in_channels), dtype=np.uint8) for _ in range(2)]
            for sh, sw in sizes]


def probabilities(logits: torch.Tensor, loaded: LoadedModel) -> torch.Tensor:
    """The activation legitseg applies (SPEC 4.3, 4.4), at the model's resolution."""
    spec = loaded.spec
    if spec.task == "severity":
        return torch.softmax(logits / spec.temperature, dim=1)
    return torch.sigmoid(logits) if spec.classes == 1 else torch.softmax(logits, dim=1)


def parity(reference: TorchRunner, candidate: TorchRunner) -> float:
    """Largest absolute difference in probabilities between two runners on the probe batches.

    NaN or Inf anywhere gives inf. Errors of the candidate propagate.
    """
    worst = 0.0
    with torch.inference_mode():
        for arrays in probe_arrays(reference.loaded):
            p_ref = probabilities(reference.logits(arrays).float().cpu(), reference.loaded)
            p_new = probabilities(candidate.logits(arrays).float().cpu(), candidate.loaded)
            if p_ref.shape != p_new.shape:
                return math.inf
            diff = (p_ref - p_new).abs().max().item()
            if not math.isfinite(diff):
                return math.inf
            worst = max(worst, diff)
    return worst


@dataclass
class GateResult:
    """What the gate decided for one model; `runner` is the one to use."""

    runner: TorchRunner
    parity: float | None
    reason: str | None  # why torch is used instead, or None
    graph: CachedGraph | None = None


def build_ort_runner(loaded: LoadedModel, reference: TorchRunner, tolerance: float,
                     threads: int | None = None) -> GateResult:
    """Export (or reuse) the model's graph and gate it against `reference` (a CPU fp32 torch runner).

    Returns the OrtRunner when the probabilities agree within `tolerance`, else the
    reference runner with the reason, which is also logged as a warning. Never raises
    for a model that cannot be exported or does not match: torch is always the fallback.
    Raises UsageError for a bad $LEGITSEG_ORT_THREADS.
    """
    name = loaded.spec.name
    threads = threads or ort_threads()
    try:
        graph = cached_onnx(loaded)
        runner = OrtRunner(loaded, reference.device, "fp32", session=make_session(graph.data, threads))
        figure = parity(reference, runner)
    except ExportFailed as err:
        return _fallback(reference, None, f"{err}")
    except (RuntimeError, ValueError, *ort_errors()) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        return _fallback(reference, None, f"model {name!r}: ONNX Runtime cannot run the exported graph: {reason}")
    if figure > tolerance:
        return _fallback(reference, figure, f"model {name!r}: ONNX Runtime probabilities differ from torch by "
                                            f"{figure:.3g} > parity tolerance {tolerance:g}", graph)
    runner.parity = figure
    log.info("%s: onnxruntime backend, %d thread(s), parity %.2g (tolerance %g)", name, threads, figure, tolerance)
    return GateResult(runner, figure, None, graph)


def _fallback(reference: TorchRunner, figure: float | None, reason: str,
              graph: CachedGraph | None = None) -> GateResult:
    log.warning("%s; using the torch backend for this model", reason)
    reference.parity = figure if figure is None or math.isfinite(figure) else None
    return GateResult(reference, figure, reason, graph)
