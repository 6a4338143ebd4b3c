"""The names a run may choose between, each written once with what it can do: backends,
precisions and engines (and the one default that every entry point shares, --max-pixels).

The CLI's choices and help, `RunConfig`'s checks, the manifest's `backend` literal, the
`auto` rule and the docs' tables are derived from these tables; `inference/registry.py`
maps each backend name to its builder and `run.py` each engine name to its engine. It
sits in manifest/, the lowest folder, because models.yaml names a backend, and it imports
neither torch nor anything above, so the CLI can build its help from it for free.
"""

from __future__ import annotations

from dataclasses import dataclass

from legitseg.errors import UsageError

AUTO = "auto"
# --max-pixels: images whose header declares more pixels are refused before decoding (the
# default of the CLI, the Python API, RunConfig and the decoder).
DEFAULT_MAX_PIXELS = 100_000_000


@dataclass(frozen=True)
class Precision:
    name: str
    devices: tuple[str, ...]  # device types it runs on
    help: str

    def describe(self) -> str:
        return self.help + ("; CUDA only" if self.devices == ("cuda",) else "")


PRECISIONS: dict[str, Precision] = {p.name: p for p in (
    Precision("fp32", ("cpu", "cuda"), "IEEE fp32 math"),
    Precision("tf32", ("cuda",), "fp32 storage, TensorFloat-32 matmuls and convolutions"),
    Precision("fp16", ("cuda",), "autocast to float16"),
    Precision("bf16", ("cpu", "cuda"), "autocast to bfloat16"),
)}


@dataclass(frozen=True)
class Backend:
    name: str
    devices: tuple[str, ...]  # device types it runs on
    precisions: tuple[str, ...]
    export: str | None  # the graph format it runs, exported from the verified torch module; None: the module
    gated: bool  # built only after its probabilities match torch's (the parity gate); else torch runs
    help: str

    def fits(self, device_type: str, precision: str) -> bool:
        return device_type in self.devices and precision in self.precisions

    def describe(self) -> str:
        return f"{self.help}; runs on {self.where()}"

    def where(self) -> str:
        """Where it runs, in words: "the CPU in fp32", "cpu, cuda in fp32, tf32, ..."."""
        devices = "the CPU" if self.devices == ("cpu",) else ", ".join(self.devices)
        return f"{devices} in {', '.join(self.precisions)}"


BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend("torch", ("cpu", "cuda"), tuple(PRECISIONS), None, False, "PyTorch, the reference"),
    Backend("onnxruntime", ("cpu",), ("fp32",), "onnx", True, "ONNX Runtime"),
)}
# `auto`: the first of these that runs on the device in the precision. ONNX Runtime first:
# on the CPU it is faster than torch for the same answer (docs/onnx.md).
AUTO_ORDER = ("onnxruntime", "torch")
BACKEND_CHOICES = (AUTO, *BACKENDS)


@dataclass(frozen=True)
class EngineInfo:
    name: str
    extra: str | None  # the pip extra it needs (legitseg[ray])
    overlay: bool  # can write --overlay images
    address: bool  # takes --address (a cluster)
    help: str

    def describe(self) -> str:
        return self.help + (f"; needs legitseg[{self.extra}]" if self.extra else "")


ENGINES: dict[str, EngineInfo] = {e.name: e for e in (
    EngineInfo("local", None, True, False, "threads in this process"),
    EngineInfo("ray", "ray", False, True, "a Ray Data pipeline"),
)}


def choices(values) -> str:
    """'a, b or c', for error messages."""
    values = list(values)
    return f"{', '.join(values[:-1])} or {values[-1]}" if len(values) > 1 else values[0]


def options_help(table: dict) -> str:
    """'a (what a is) | b (...)', for --help."""
    return " | ".join(f"{k} ({v.describe()})" for k, v in table.items())


def check_precision(precision: str, device_type: str | None = None) -> None:
    """A known precision, and one that runs on `device_type` when it is known. Raises UsageError."""
    if precision not in PRECISIONS:
        raise UsageError(f"--precision {precision!r}: choose {choices(PRECISIONS)}")
    if device_type is not None and device_type not in PRECISIONS[precision].devices:
        usable = [p for p, v in PRECISIONS.items() if device_type in v.devices]
        raise UsageError(f"--precision {precision} needs a CUDA device; on the CPU use {choices(usable)}"
                         if device_type == "cpu" else
                         f"--precision {precision} does not run on {device_type}; use {choices(usable)}")


def check_backend(backend: str | None) -> None:
    if backend is not None and backend not in BACKEND_CHOICES:
        raise UsageError(f"--backend {backend!r}: choose {choices(BACKEND_CHOICES)}")


def check_engine(engine: str) -> EngineInfo:
    if engine not in ENGINES:
        raise UsageError(f"--engine {engine!r}: choose {choices(ENGINES)}")
    return ENGINES[engine]


def auto_backend(device_type: str, precision: str) -> str:
    """What `auto` means on this device in this precision."""
    return next(name for name in AUTO_ORDER if BACKENDS[name].fits(device_type, precision))


def docs_tables() -> str:
    """The tables of docs/user-guide.md ("Backends, precisions and engines"), derived from the ones above."""
    def dev(devices: tuple[str, ...]) -> str:
        return ", ".join("CPU" if d == "cpu" else "CUDA" for d in devices)

    rows = ["| backend | devices | precisions | runs | before use |", "|---|---|---|---|---|"]
    rows += [f"| `{b.name}` | {dev(b.devices)} | {', '.join(b.precisions)} | {b.help} | "
             f"{'exported to ' + b.export.upper() + ', cached, ' if b.export else ''}"
             f"{'a parity check against torch (else torch runs)' if b.gated else '-'} |" for b in BACKENDS.values()]
    rows += ["", f"`auto` is the first of {', '.join(f'`{n}`' for n in AUTO_ORDER)} that runs on the device "
                 "in the precision.", "",
             "| precision | devices | meaning |", "|---|---|---|"]
    rows += [f"| `{p.name}` | {dev(p.devices)} | {p.help} |" for p in PRECISIONS.values()]
    rows += ["", "| engine | extra | `--overlay` | `--address` | runs on |", "|---|---|---|---|---|"]
    rows += [f"| `{e.name}` | {f'`legitseg[{e.extra}]`' if e.extra else '-'} | {'yes' if e.overlay else 'not yet'} | "
             f"{'yes' if e.address else '-'} | {e.help} |" for e in ENGINES.values()]
    return "\n".join(rows) + "\n"
