"""The ONNX Runtime backend (CPU, fp32) and the parity gate that decides whether it is used.

`OrtRunner` is a sibling of `TorchRunner`: both hold a `Preprocessor` and differ only in
`forward`. A model runs under ONNX Runtime only after its probabilities agree with
torch's on seeded probe batches (`gate`); `legitseg run` and `legitseg export` call the
same gate. docs/onnx.md.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from legitseg.errors import UsageError
from legitseg.images.decoded import Prep
from legitseg.inference import ort_calls
from legitseg.inference.ort_import import onnxruntime as import_ort
from legitseg.inference.parity_rule import ParityFigures, compare
from legitseg.inference.runners import Preprocessor, Runner, prep_for
from legitseg.models.onnx_export import CachedGraph, ExportFailed, cached_onnx
from legitseg.timeline import mark

if TYPE_CHECKING:
    from legitseg.models.factory import LoadedModel

log = logging.getLogger(__name__)


# -- threads ------------------------------------------------------------------------------
def available_cores() -> int:
    """Cores this process may run on (respects taskset/cgroup affinity where the OS reports it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


# -- sessions and the runner ---------------------------------------------------------------
def ort_errors() -> tuple[type[Exception], ...]:
    """ONNX Runtime's own exception types (Fail, InvalidGraph, ...): they derive from Exception only."""
    state = import_ort().capi.onnxruntime_pybind11_state
    return tuple(v for v in vars(state).values() if isinstance(v, type) and issubclass(v, Exception))


def make_session(data: bytes, threads: int | None = None) -> Any:
    """A CPU ONNX Runtime session for a serialized graph; `threads` defaults to every core this process may use.

    Decode and writer threads spend most of their time in GIL-free OpenCV and numpy
    calls, between forward passes; on 2 cores a whole run went faster with two intra-op
    threads than with one (docs/onnx.md). The run's `$LEGITSEG_ORT_THREADS` arrives as `threads`.
    """
    ort = import_ort()

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or available_cores()
    options.inter_op_num_threads = 1
    # Idle intra-op threads sleep instead of spinning: in a run, decode and writer
    # threads need those cycles between forward passes.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: ORT's own warnings go to stderr, not our log
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def ort_session(loaded: LoadedModel, threads: int | None = None, cache_dir: Path | None = None) -> Any:
    """A session for `loaded` through the cache under `cache_dir` (for benchmarks; runs use `gate`).

    Raises ExportFailed. Does not run the parity gate.
    """
    return make_session(cached_onnx(loaded, cache_dir).data, threads)


@dataclass
class OrtRunner:
    """Forward passes of one model through an ONNX Runtime session on the CPU (contiguous NCHW)."""

    loaded: LoadedModel
    session: Any
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "fp32"
    backend: str = "onnxruntime"
    parity: float | None = None
    parity_gate: dict | None = None  # the rule's figures (run.json), parity_rule.ParityFigures.to_json
    image_errors: tuple[type[BaseException], ...] = ()
    # Images per session call (ort_calls.py): chosen on the first batch of two or more once
    # `tune` is set (by the gate, after parity), with the cache under `cache_dir`; None: whole batches.
    per_call: int | None = None
    tune: bool = False
    cache_dir: Path | None = None
    threads: int = 0
    graph_sha256: str = ""

    def __post_init__(self) -> None:
        if self.device.type != "cpu":
            raise UsageError(f"{self.name}: the onnxruntime backend runs on the CPU only, not {self.device}")
        if self.precision != "fp32":
            raise UsageError(f"{self.name}: the onnxruntime backend runs in fp32 only, not {self.precision}")
        self.pre = Preprocessor.for_model(self.loaded, self.device, channels_last=False)
        self.prep: Prep = prep_for(self.loaded)

    @property
    def name(self) -> str:
        return self.loaded.spec.name

    @property
    def variant(self) -> str | None:
        """run.json's `variant`: images per ONNX Runtime call, once chosen."""
        return None if self.per_call is None else f"{self.per_call} image(s) per call"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = np.ascontiguousarray(x.numpy(), dtype=np.float32)
        if self.per_call is None and self.tune and batch.shape[0] > 1:
            key = ort_calls.cache_key(self.graph_sha256, batch.shape[0], self.threads, import_ort().__version__)
            self.per_call, y = ort_calls.choose(self.session, batch, key, self.cache_dir, self.name)
        else:
            y = ort_calls.run_in_calls(self.session, batch, self.per_call or batch.shape[0])
        return torch.from_numpy(y)

    def logits(self, arrays: list[np.ndarray]) -> torch.Tensor:
        return self.pre.run(self.forward, arrays)


@dataclass
class GateResult:
    """What the gate decided for one model; `runner` is the one to use."""

    runner: Runner
    parity: float | None  # max |dp| on the probes (the records' `parity`)
    reason: str | None  # why torch is used instead, or None
    graph: CachedGraph | None = None
    figures: ParityFigures | None = None  # every figure of the rule (parity_rule.py)


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]


def gate(loaded: LoadedModel, reference: Runner, tolerance: float, threads: int | None = None,
         cache_dir: Path | None = None) -> GateResult:
    """Export (or reuse) the model's graph and compare it with `reference` (a CPU fp32 torch runner).

    Returns an OrtRunner when its outputs meet the parity rule (parity_rule.py, docs/onnx.md)
    with `tolerance` (the model's parity_tolerance: the largest logit difference relative
    to the largest logit), else the reference runner with the reason, which is also logged
    as a warning. An OrtRunner carries the figures (`parity`, `parity_gate`). Never
    raises for a model that cannot be exported or does not match: torch is always the
    fallback. The graph is kept under `cache_dir` (None: exported for this process only).
    """
    name = loaded.spec.name
    threads = threads or available_cores()
    graph: CachedGraph | None = None
    try:
        graph = cached_onnx(loaded, cache_dir)
        mark(f"exported {name}")
        runner = OrtRunner(loaded, make_session(graph.data, threads))
        figures = compare(reference, runner)
        mark(f"gated {name}")
    except ExportFailed as err:
        return _fallback(reference, None, f"{err}")
    except (RuntimeError, ValueError, *ort_errors()) as err:
        return _fallback(reference, None, f"model {name!r}: ONNX Runtime cannot run the exported graph: "
                                          f"{_first_line(err)}", graph)
    failures = figures.decide(tolerance)
    if failures:
        return _fallback(reference, figures, f"model {name!r}: ONNX Runtime's outputs differ from torch's: "
                                             + "; ".join(failures), graph)
    runner.parity, runner.parity_gate = figures.probability, figures.to_json()
    runner.tune, runner.cache_dir, runner.threads, runner.graph_sha256 = True, cache_dir, threads, graph.sha256
    compared = "mask pixels" if runner.loaded.spec.task == "segmentation" else "grades"
    log.info("%s: onnxruntime backend, %d thread(s), logits within %.2g of the largest (tolerance %g), "
             "probabilities within %.2g, %d of %d %s changed (all near-ties)", name, threads,
             figures.relative, tolerance, figures.probability, figures.changed, figures.compared, compared)
    return GateResult(runner, figures.probability, None, graph, figures)


def _fallback(reference: Runner, figures: ParityFigures | None, reason: str,
              graph: CachedGraph | None = None) -> GateResult:
    log.warning("%s; using the torch backend for this model", reason)
    figure = figures.probability if figures is not None else None
    return GateResult(reference, figure, reason, graph, figures)
