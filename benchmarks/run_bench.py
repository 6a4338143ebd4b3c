"""`make bench`: legitseg run against the forward bound and a researcher's loop.

    .venv/bin/python benchmarks/run_bench.py                 # CPU rows (+ GPU rows if CUDA), ~10-15 min
    .venv/bin/python benchmarks/run_bench.py --quick         # fewer images and batch sizes, ~3 min
    PYTHONPATH=. python benchmarks/run_bench.py --device cuda --quick --out-md gpu.md --out-json gpu.json

Builds production-shaped models with random weights through legitseg's factory,
pins them in a generated models.yaml, generates photo-like JPEGs, then measures
per row (a) the forward bound, (b) a researcher's loop and (c) `legitseg run` as
a subprocess (steady-state images/s, start-up to the first image written, peak
RSS). Prints the tables and writes them, with the machine's description, to a
generated section of docs/benchmarks.md and to a JSON file. Timings belong
here, not in the unit tests; tests/test_bench_smoke.py runs `--tiny`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # runnable as `python benchmarks/run_bench.py` without an install
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import cv2  # noqa: E402
import torch  # noqa: E402

from benchmarks import measure, report, workload  # noqa: E402
from benchmarks.workload import BenchModel  # noqa: E402

CPU_TARGETS = {"c_over_a": 0.90, "c_over_b": 1.25, "startup_s": 8.0, "rss_growth": 1.10}
GPU_TARGETS = {"c_over_a": 0.85}
# Issue 18: 12 MP photos on the GPU against the slowest of the stages legitseg cannot go faster
# than (forward bound, JPEG decode, PNG encode of the masks); two models against their combined bound.
GPU_LARGE_TARGETS = {"c_over_ceiling": 0.8}
GPU_TWO_TARGETS = {"c_over_a": 0.8}
# 12 MP phone photos on the CPU (issue 10): against the researcher's loop and torch's forward bound,
# whichever backend the row runs (onnxruntime is the CPU default).
LARGE_TARGETS = {"c_over_b": 1.3, "c_over_torch_a": 0.6}
# Issue 26: the default backend (ONNX Runtime once the sharp model passes the gate) against ONNX
# Runtime's own forward bound (a') and the researcher's loop; 12 MP with the default decode and
# with `decode: reduced`.
DEFAULT_TARGETS = {"c_over_ort": 0.85, "c_over_b": 2.0}
DEFAULT_LARGE_TARGETS = {"c_over_ort": 0.45, "c_over_b": 1.8}
REDUCED_LARGE_TARGETS = {"c_over_ort": 0.6}
# A GPU row's expected legitseg rate (img/s) sizes its image set: the forward bound (~1000 img/s
# at fp16) would ask for more images than the device check's minutes allow.
GPU_EXPECTED_RATE = 150.0


@dataclass
class Mode:
    """Sizes of one benchmark mode; models are keys of `models`."""

    name: str
    models: dict[str, BenchModel]
    primary: str  # the CPU row that carries the targets
    gpu_primary: str  # the GPU row that carries the target (fp16)
    expert: str  # the second model of the K-models row
    heavy: list[str]  # further single-model rows (CPU)
    small: tuple[int, int]  # (width, height)
    large: tuple[int, int]
    n: int
    n_large: int
    n_heavy: int
    n_gpu: int
    n_gpu_large: int
    batch_sizes: list[int]
    gpu_batch_sizes: list[int]
    min_time: float
    batch_overrides: dict[str, list[int]] = field(default_factory=dict)  # CPU batch sizes per model
    stage_images: int = 8


def make_mode(args: argparse.Namespace) -> Mode:
    if args.tiny:
        mode = Mode("tiny", workload.TINY, "tiny_seg_64", "tiny_seg_96", "tiny_sev_64", ["tiny_seg_96"],
                    (160, 120), (640, 480), 8, 8, 0, 32, 16, [1, 2], [1, 4], 0.05, {}, 3)
    elif args.quick:
        mode = Mode("quick", workload.PRODUCTION, "dlv3p_b2_384", "dlv3p_b2_512", "severity_b2_384", [],
                    (1024, 768), (4000, 3000), 12, 8, 0, 128, 32, [1, 4], [1, 8, 16, 32], 1.0, {}, 4)
    else:
        mode = Mode("full", workload.PRODUCTION, "dlv3p_b2_384", "dlv3p_b2_512", "severity_b2_384",
                    ["dlv3p_b2_512", "unet_r101_512"], (1024, 768), (4000, 3000), 32, 24, 12, 512, 64,
                    [1, 2, 4, 8], [1, 2, 4, 8, 16, 32], 3.0, {"unet_r101_512": [1, 2, 4]}, 8)
    for attr in ("n", "n_large", "n_heavy", "n_gpu", "n_gpu_large", "min_time"):
        value = getattr(args, attr)
        if value is not None:
            setattr(mode, attr, value)
    if args.batch_sizes:
        mode.batch_sizes = args.batch_sizes
        mode.batch_overrides = {}
    if args.gpu_batch_sizes:
        mode.gpu_batch_sizes = args.gpu_batch_sizes
    return mode


class Bench:
    """Runs the rows and keeps every result, keyed so that shared measurements run once."""

    def __init__(self, mode: Mode, work: Path, args: argparse.Namespace, machine: dict):
        self.mode, self.work, self.args, self.machine = mode, work, args, machine
        self.t0 = time.monotonic()
        self.loaded: dict[str, object] = {}
        self.bounds: dict[tuple, measure.ForwardBound] = {}
        self.loops: dict[tuple, measure.LoopResult] = {}
        self.rows: list[dict] = []
        self.stages: list[dict] = []
        self.not_measured: list[str] = []
        self.targets: list[dict] = []
        self.ceilings: list[dict] = []
        self.failures = 0
        self.manifest: Path | None = None
        self.json_path: Path | None = None  # written after every row (a stopped run keeps what it measured)
        self.started = time.monotonic()
        self.onnx = (not args.no_onnx) and importlib.util.find_spec("legitseg.models.onnx_export") is not None
        # One ONNX graph cache for this process (the onnxruntime bound exports into it) and the
        # legitseg subprocesses, so that their start-up does not include a cold export.
        os.environ["LEGITSEG_CACHE_DIR"] = str(work / "cache")

    def say(self, message: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {message}", file=sys.stderr, flush=True)

    # -- set-up --------------------------------------------------------------------------
    def prepare(self, names: list[str]) -> None:
        self.say(f"models: {', '.join(names)} (random weights, pinned in {self.work / 'models.yaml'})")
        self.manifest = workload.write_manifest([self.mode.models[n] for n in names], self.work)

    def images(self, size: tuple[int, int], n: int) -> Path:
        t = time.monotonic()
        # --gpu-unique pictures of 1024x768, or as many megapixels of larger ones
        unique = max(8, self.args.gpu_unique * 1024 * 768 // (size[0] * size[1]))
        folder = workload.image_set(self.work, size[0], size[1], n, unique)
        if time.monotonic() - t > 1:
            self.say(f"generated {size[0]}x{size[1]} JPEGs in {time.monotonic() - t:.0f}s")
        return folder

    def model(self, name: str):
        """legitseg's LoadedModel (sha256 checked, strict load), built once."""
        if name not in self.loaded:
            from legitseg.manifest.spec import load_manifest
            from legitseg.models.factory import load_model

            self.loaded[name] = load_model(load_manifest(self.manifest).select([name])[0])
        return self.loaded[name]

    # -- measurements, each done once ------------------------------------------------------
    def bound(self, name: str, device: torch.device, precision: str, backend: str = "torch",
              sizes: list[int] | None = None) -> measure.ForwardBound:
        base = name.removesuffix("_reduced")
        if base != name and base in self.mode.models:  # the same network: decoding is not in the bound
            name = base
        key = (name, device.type, precision, backend)
        if key in self.bounds:
            return self.bounds[key]
        m = self.mode.models[name]
        if sizes is None and device.type == "cuda":
            sizes = self.mode.gpu_batch_sizes
        elif sizes is None:
            sizes = self.mode.batch_overrides.get(name, self.mode.batch_sizes)
        loaded = self.model(name)
        self.say(f"(a) forward bound {name} {device.type} {precision} {backend}, batches {sizes}")
        if backend == "onnxruntime":
            from legitseg.inference.ort_runner import available_cores, ort_session
            from legitseg.options import Environment

            env = Environment.read()
            threads = env.ort_threads or available_cores()
            t = time.perf_counter()
            session = ort_session(loaded, threads, env.cache_dir)
            setup = time.perf_counter() - t
            result = measure.ort_forward_bound(session, name, loaded.spec.in_channels, m.size, sizes,
                                               self.mode.min_time, threads)
            result.note = f"export (or cache read) + session {setup:.1f}s"
        else:
            result = measure.forward_bound(loaded.module, name, loaded.spec.in_channels, m.size, device,
                                           precision, sizes, self.mode.min_time,
                                           half_weights=device.type == "cuda" and precision == "fp16")
            loaded.module.to("cpu")
        self.bounds[key] = result
        return result

    def loop(self, names: tuple[str, ...], folder: Path, device: torch.device) -> measure.LoopResult:
        key = (names, str(folder), device.type)
        if key not in self.loops:
            self.say(f"(b) researcher's loop {'+'.join(names)} on {folder.name} ({device.type})")
            models = []
            for n in names:
                lm = self.model(n)
                models.append(measure.LoopModel(n, lm.module, self.mode.models[n].size, lm.mean, lm.std,
                                                lm.spec.task))
            files = sorted(folder.glob("*.jpg"))[:self.args.loop_images]  # steady after a few dozen
            self.loops[key] = measure.researcher_loop(models, files, self.work / "out" / "researcher", device)
            for lm in models:
                lm.module.to("cpu")
            if device.type == "cuda":
                torch.cuda.empty_cache()
        return self.loops[key]

    def run(self, names: list[str], folder: Path, n: int, device: str, precision: str, backend: str,
            tag: str, extra: list[str] | None = None, env: dict[str, str] | None = None) -> measure.RunResult:
        out = self.work / "out" / tag
        cmd = measure.legitseg_command(self.manifest, names, folder, out, device, precision, backend, extra)
        self.say(f"(c) legitseg run {tag}: {n} images")
        profile = out.parent / f"{tag}.profile.json"
        profile.unlink(missing_ok=True)
        result = measure.legitseg_run(cmd, out, n, env=measure.child_env({**(env or {}),
                                                                             "LEGITSEG_PROFILE": str(profile)}))
        result.profile = json.loads(profile.read_text()) if profile.is_file() else None
        return result

    # -- rows ----------------------------------------------------------------------------
    def row(self, label: str, names: list[str], size: tuple[int, int], n: int, device: torch.device,
            precision: str, backend: str = "torch", rss_double: bool = False, targets: dict | None = None,
            extra: list[str] | None = None, env: dict[str, str] | None = None, ceiling: bool = False) -> dict | None:
        folder = self.images(size, n)
        bounds = [self.bound(name, device, precision, backend) for name in names]
        a = measure.combined_rate([b.best[2] for b in bounds])
        how = " + ".join(f"{b.best[0]}, {b.best[1]}" for b in bounds)
        b_rate = self.loop(tuple(names), folder, device).img_s
        ort_a = None
        if self.onnx and device.type == "cpu" and precision == "fp32":
            ort_a = measure.combined_rate([self.bound(n, device, "fp32", "onnxruntime").best[2] for n in names])
        tag = f"{label}".replace(" ", "_").replace("/", "-")
        try:
            c = self.run(names, folder, n, str(device), precision, backend, tag, extra, env)
            c2 = None
            if rss_double:
                c2 = self.run(names, self.images(size, 2 * n), 2 * n, str(device), precision, backend,
                              tag + "_2N", extra, env)
        except measure.RunFailed as err:
            self.failures += 1
            self.not_measured.append(f"{label}: legitseg run failed: {err}")
            self.say(f"FAILED: {err}")
            return None
        row = {
            "row": label,
            "models": " + ".join(self.mode.models[x].label for x in names),
            "images": f"{n} x {size[0]}x{size[1]}",
            "device": f"{device} {precision} {backend}",
            "bound_img_s": a,
            "bound_how": how,
            "ort_bound_img_s": ort_a,
            "researcher_img_s": b_rate,
            "legitseg_img_s": c.steady_img_s,
            "from_start_img_s": c.from_start_img_s,
            "startup_split": c.startup_split,
            "c_over_a": c.steady_img_s / a,
            "c_over_b": c.steady_img_s / b_rate if b_rate else None,
            "c_over_ort": c.steady_img_s / ort_a if ort_a else None,
            "ran": ", ".join(f"{m} {b}" + (f" ({c.variants[m]})" if c.variants.get(m) else "")
                             for m, b in sorted(c.backends.items())),
            "area_fraction": c.area_fraction,
            "parity_gate": c.parity_gate,
            "out": str(self.work / "out" / tag),
            "startup_s": c.startup_s,
            "peak_rss_mb": c.peak_rss_mb if c2 is None else
            f"{c.peak_rss_mb:.0f} (N={n}) / {c2.peak_rss_mb:.0f} (2N={2 * n})",
            "batch_workers": f"{c.batch_size}, {c.workers}",
            "targets": "",
            "run": asdict(c),
            "run_2n": asdict(c2) if c2 else None,
            "backends": c.backends,
            "profile": c.profile,
        }
        if backend != "auto" and set(c.backends.values()) != {backend}:
            row["targets"] = f"backend used: {c.backends}"
        if ceiling or (targets and "c_over_ceiling" in targets):
            self.ceiling(row, folder, self.work / "out" / tag, device, a)
        if targets:
            row["targets"] = self.check(label, row, c, c2, targets, names, device)
        self.rows.append(row)
        area = "-" if c.area_fraction is None else f"{c.area_fraction:.3f}"
        self.say(f"    {label}: (a) {a:.2f}  (a') {ort_a or 0:.2f}  (b) {b_rate or 0:.2f}  (c) {c.steady_img_s:.2f} "
                 f"img/s (from start {c.from_start_img_s or 0:.2f}), start-up {c.startup_s:.1f}s, peak RSS {c.peak_rss_mb:.0f} MB, ran {row['ran']}, "
                 f"mask area {area}")
        if c.startup_split:
            self.say("      start-up: " + ", ".join(f"{step} {s:.2f}s" for step, s in c.startup_split))
        self.write_partial()
        return row

    def results(self) -> dict:
        """Everything measured so far, as the JSON file and the report take it."""
        return {
            "mode": self.mode.name, "section": self.args.section,
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "finished": time.strftime("%Y-%m-%d %H:%M %Z"), "seconds": time.monotonic() - self.started,
            "machine": self.machine, "load_average_end": [round(v, 2) for v in os.getloadavg()],
            "rows": self.rows, "forward": [b.as_dict() for b in self.bounds.values()], "stages": self.stages,
            "not_measured": self.not_measured, "targets": self.targets, "ceilings": self.ceilings,
            "columns": [key for key, _ in report.COLUMNS],
        }

    def write_partial(self) -> None:
        if self.json_path is not None:
            report.write_json(self.json_path, self.results())

    def check(self, label: str, row: dict, c: measure.RunResult, c2: measure.RunResult | None,
              targets: dict, names: list[str], device: torch.device) -> str:
        marks = []

        def verdict(what: str, ok: bool, value: str) -> None:
            self.targets.append({"row": label, "what": f"{label}: {what}", "ok": ok, "value": value})
            marks.append(("" if ok else "MISS ") + what)

        if "c_over_a" in targets:
            t = targets["c_over_a"]
            verdict(f"(c)/(a) >= {t}", row["c_over_a"] >= t, f"{row['c_over_a']:.2f}")
        if "c_over_ort" in targets and row["c_over_ort"] is not None:
            t = targets["c_over_ort"]
            verdict(f"(c)/(a') >= {t}", row["c_over_ort"] >= t, f"{row['c_over_ort']:.2f}")
        if "c_over_b" in targets and row["c_over_b"] is not None:
            t = targets["c_over_b"]
            verdict(f"(c)/(b) >= {t}", row["c_over_b"] >= t, f"{row['c_over_b']:.2f}")
        if "c_over_torch_a" in targets:
            t = targets["c_over_torch_a"]
            torch_a = measure.combined_rate([self.bound(n, device, "fp32").best[2] for n in names])
            ratio = row["legitseg_img_s"] / torch_a
            verdict(f"(c)/(a torch fp32) >= {t}", ratio >= t, f"{ratio:.2f} (a torch = {torch_a:.2f} img/s)")
        if "c_over_ceiling" in targets and row.get("ceiling"):
            t, ceiling = targets["c_over_ceiling"], row["ceiling"]
            verdict(f"(c) >= {t} x the smallest ceiling", ceiling["ratio"] >= t,
                    f"{ceiling['ratio']:.2f} (smallest {ceiling['smallest']:.2f} img/s)")
        if "startup_s" in targets:
            t = targets["startup_s"]
            verdict(f"start-up <= {t:g} s", c.startup_s <= t, f"{c.startup_s:.2f} s")
        if "rss_growth" in targets and c2 is not None:
            growth = c2.peak_rss_mb / c.peak_rss_mb
            t = targets["rss_growth"]
            verdict(f"peak RSS(2N)/RSS(N) <= {t}", growth <= t,
                    f"{growth:.3f} ({c.peak_rss_mb:.0f} -> {c2.peak_rss_mb:.0f} MB)")
        return "; ".join(marks)

    def ceiling(self, row: dict, folder: Path, out: Path, device: torch.device, forward: float) -> None:
        """What the stages around the model can do on this machine, measured now: JPEG decode
        (OpenCV in one thread per core; nvJPEG in batches of 32 on a GPU), PNG encoding of the
        row's own masks (one thread per core) and the forward bound; (c) against the smallest."""
        threads = os.cpu_count() or 1
        files = sorted(folder.glob("*.jpg"))
        masks = [cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in sorted((out / "masks").rglob("*.png"))[:16]]
        self.say(f"ceilings of {row['row']}: decode and PNG encode, {threads} threads")
        t = self.mode.min_time
        c = {"row": row["row"], "threads": threads, "forward": forward,
             "decode_cpu": measure.decode_ceiling(files, threads, t),
             "decode_gpu": measure.gpu_decode_ceiling(files, device, 32, t) if device.type == "cuda" else None,
             "encode": measure.encode_ceiling(masks, threads, t) if masks else None}
        decode = c["decode_gpu"] or c["decode_cpu"]  # the decoder legitseg uses for these JPEGs
        c["smallest"] = min(v for v in (forward, decode, c["encode"]) if v)
        c["legitseg"] = row["legitseg_img_s"]
        c["ratio"] = c["legitseg"] / c["smallest"]
        row["ceiling"] = c
        self.ceilings.append(c)

    def stage_profile(self, name: str, size: tuple[int, int], n: int, device: torch.device, precision: str) -> None:
        folder = self.images(size, n)
        files = sorted(folder.glob("*.jpg"))[: self.mode.stage_images + 1]
        label = f"{size[0]}x{size[1]} {device.type} {precision}"
        self.say(f"stages {name} on {label}")
        loop = self.loop((name,), folder, device)
        self.stages.append({"pipeline": "researcher", "model": name, "images": f"{size[0]}x{size[1]} {device.type} fp32",
                            "ms": loop.stages_ms})
        try:
            ms, cpu_ms = measure.legitseg_stages(self.manifest, name, files, self.work / "out" / "stages", device, precision)
        except (ImportError, AttributeError, TypeError) as err:
            # legitseg's internals moved: say so rather than lose the whole run.
            self.failures += 1
            self.not_measured.append(f"legitseg stage profile of {name}: {type(err).__name__}: {err}")
            return
        self.stages.append({"pipeline": "legitseg (serial)", "model": name, "images": label, "ms": ms})
        self.stages.append({"pipeline": "legitseg (serial), CPU ms", "model": name, "images": label,
                            "ms": cpu_ms})

    def sweep(self) -> None:
        """legitseg's --batch-size/--workers choices and OpenMP settings on the primary row (CPU, torch)."""
        mode, cpu = self.mode, torch.device("cpu")
        for batch, workers in ((1, 1), (2, 1), (8, 1), (4, 0), (4, 2)):
            self.row(f"sweep b{batch} w{workers}", [mode.primary], mode.small, mode.n, cpu, "fp32",
                     extra=["--batch-size", str(batch), "--workers", str(workers)])
        # OpenMP threads spin while they wait; beside decode and writer threads on few cores that can cost.
        for variable, value in (("OMP_WAIT_POLICY", "PASSIVE"), ("OMP_NUM_THREADS", "1")):
            self.row(f"sweep {variable}={value}", [mode.primary], mode.small, mode.n, cpu, "fp32",
                     env={variable: value})
        # Issue 26: the cores split between ONNX Runtime's intra-op threads and legitseg's decode pool
        # (default backend, the calibrated model), 1024x768 and 12 MP.
        for size, n, where in ((mode.small, mode.n, "1024x768"), (mode.large, mode.n_large, "12 MP")):
            for threads, workers in ((2, 1), (1, 1), (2, 2), (1, 2)):
                self.row(f"sweep {where} ORT threads {threads} workers {workers}", [mode.primary], size, n, cpu,
                         "fp32", backend="auto", env={"LEGITSEG_ORT_THREADS": str(threads)},
                         extra=["--workers", str(workers)])

    # -- the whole plan --------------------------------------------------------------------
    def cpu_rows(self) -> None:
        mode, cpu = self.mode, torch.device("cpu")
        plain = self.row("single model", [mode.primary], mode.small, mode.n, cpu, "fp32", rss_double=True,
                         targets=CPU_TARGETS)
        tta = (self.row("single model TTA hflip", [f"{mode.primary}_hflip"], mode.small, mode.n, cpu, "fp32")
               if mode.name != "tiny" else None)
        if plain and tta:  # issue 11: TTA with hflip costs at most 2.1x the plain run
            cost = plain["legitseg_img_s"] / tta["legitseg_img_s"]
            tta["targets"] = f"cost vs plain {cost:.2f}x (target <= 2.1x): {'PASS' if cost <= 2.1 else 'FAIL'}"
        # What `run --overlay` costs: the same rows again, drawing and encoding one JPEG per image
        # (not in --tiny: the smoke test covers the row mechanics once).
        overlay = mode.name != "tiny"
        if overlay:
            self.row("single model --overlay", [mode.primary], mode.small, mode.n, cpu, "fp32", extra=["--overlay"])
        self.row("large images", [mode.primary], mode.large, mode.n_large, cpu, "fp32", targets=LARGE_TARGETS,
                 ceiling=True)
        if overlay:
            self.row("large images --overlay", [mode.primary], mode.large, mode.n_large, cpu, "fp32",
                     extra=["--overlay"])
        if mode.name != "tiny":  # tests/test_bench_smoke.py runs the two-model loop and bound in process
            self.row("two models", [mode.primary, mode.expert], mode.small, mode.n, cpu, "fp32")
        if self.onnx:
            self.row("single model onnxruntime", [mode.primary], mode.small, mode.n, cpu, "fp32",
                     backend="onnxruntime")
            if mode.name != "tiny":
                self.row("large images onnxruntime", [mode.primary], mode.large, mode.n_large, cpu, "fp32",
                         backend="onnxruntime", targets=LARGE_TARGETS)
            # Issue 26: the default backend (whatever the gate decides for the calibrated model: `ran`),
            # 1024x768 and 12 MP, the default decode and `decode: reduced`.
            reduced = f"{mode.primary}_reduced"
            if mode.name != "tiny":
                self.row("single model default", [mode.primary], mode.small, mode.n, cpu, "fp32", backend="auto",
                         targets=DEFAULT_TARGETS)
                self.row("single model default decode reduced", [reduced], mode.small, mode.n, cpu, "fp32",
                         backend="auto")
                self.row("large images default", [mode.primary], mode.large, mode.n_large, cpu, "fp32",
                         backend="auto", targets=DEFAULT_LARGE_TARGETS)
            self.row("large images default decode reduced", [reduced], mode.large, mode.n_large, cpu, "fp32",
                     backend="auto", targets=REDUCED_LARGE_TARGETS)
        else:
            why = "--no-onnx" if self.args.no_onnx else "legitseg has no onnxruntime backend (legitseg/models/onnx_export.py)"
            self.not_measured.append(f"ONNX Runtime rows (forward bound through onnxruntime, legitseg run "
                                     f"--backend onnxruntime): not measured, {why}")
        if mode.n_heavy:
            for name in mode.heavy:
                self.row(f"single model {name}", [name], mode.small, mode.n_heavy, cpu, "fp32")
        else:
            self.not_measured.append("single-model rows of " + ", ".join(mode.models[n].label for n in mode.heavy)
                                     + f" on the CPU: skipped in --{mode.name}")
        # Informational: what --precision bf16 would give, at fp32's best batch size. Without bf16
        # instructions PyTorch emulates it: a trial batch of 4 at 384 ran for over 9 minutes.
        if {"avx512_bf16", "amx_bf16"} & set(self.machine["cpu_flags"]):
            self.bound(mode.primary, cpu, "bf16", sizes=[self.bound(mode.primary, cpu, "fp32").best[1]])
        else:
            self.not_measured.append("bf16 forward bound on the CPU: not measured, this CPU has no bf16 "
                                     "instructions (avx512_bf16, amx_bf16), so PyTorch emulates bf16 at a small "
                                     "fraction of fp32's speed; use fp32 or --backend onnxruntime here")
        if self.args.sweep:
            self.sweep()
        self.stage_profile(mode.primary, mode.small, mode.n, cpu, "fp32")
        self.stage_profile(mode.primary, mode.large, mode.n_large, cpu, "fp32")

    def gpu_images(self, models: int = 1) -> int:
        """Images for a 1024x768 GPU row: --gpu-images, or with --gpu-seconds enough for that long at the
        expected legitseg rate (--gpu-rate, shared by `models` models), never at the forward bound."""
        least = 3 * self.args.gpu_batch  # the first batch is warm-up: two more make a steady state
        if not self.args.gpu_seconds:
            return max(self.mode.n_gpu, least)
        return max(self.mode.n_gpu, least, math.ceil(self.args.gpu_rate / models * self.args.gpu_seconds / 32) * 32)

    def gpu_rows(self, gpu: torch.device | None = None) -> None:
        """The device check's rows (issue 25): batch 32, the GPU-decode run and a LEGITSEG_GPU_DECODE=0 run
        on the same photos compared mask by mask. `gpu` cpu: the same rows on the CPU (--gpu-dry-run)."""
        mode, gpu = self.mode, gpu or torch.device("cuda:0")
        half = "fp16" if gpu.type == "cuda" else "fp32"
        batch = ["--batch-size", str(self.args.gpu_batch)]
        one, two = [mode.gpu_primary], [mode.gpu_primary, mode.expert]
        n = self.gpu_images()
        first = self.row("GPU single model", one, mode.small, n, gpu, half, targets=GPU_TARGETS, extra=batch)
        twin = self.row("GPU single model, LEGITSEG_GPU_DECODE=0", one, mode.small, n, gpu, half, extra=batch,
                        env={"LEGITSEG_GPU_DECODE": "0"})
        if first and twin:  # nvJPEG against the CPU decoder on the same photos (issue 25, item 1)
            same = measure.mask_agreement(Path(first["out"]), Path(twin["out"]))
            twin["compare"] = same
            ok = same.get("changed_share", 1.0) <= 1e-3 and "missing_or_other_size" not in same
            twin["targets"] = (f"masks vs GPU decode: {same.get('identical')}/{same['masks']} identical, "
                               f"{same.get('changed_share', float('nan')):.2g} of pixels differ"
                               + ("" if ok else " MISS (<= 0.001)"))
            self.targets.append({"row": twin["row"], "what": f"{twin['row']}: masks vs GPU decode <= 0.001 of pixels",
                                 "ok": ok, "value": twin["targets"]})
            self.write_partial()
        self.row("GPU large images", one, mode.large, max(mode.n_gpu_large, 3 * self.args.gpu_batch), gpu, half,
                 targets=GPU_LARGE_TARGETS, extra=batch)
        self.row("GPU two models", two, mode.small, self.gpu_images(2), gpu, half, targets=GPU_TWO_TARGETS,
                 extra=batch)
        self.row("GPU single model fp32", one, mode.small, self.gpu_images(), gpu, "fp32", targets=GPU_TARGETS,
                 extra=batch)
        self.stage_profile(mode.gpu_primary, mode.small, mode.n_gpu, gpu, half)
        self.stage_profile(mode.gpu_primary, mode.large, mode.n_gpu_large, gpu, half)


def _stopped(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    def sizes(text: str) -> list[int]:
        return [int(v) for v in text.split(",") if v.strip()]

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="cpu: CPU rows; cuda: GPU rows only; auto: CPU rows, plus GPU rows when CUDA is available")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer images, batch sizes 1 and 4, no resnet101/512 rows")
    size.add_argument("--tiny", action="store_true", help="tiny test models and images (seconds; for tests)")
    p.add_argument("--images", dest="n", type=int, help="images per CPU row (1024x768; the RSS row also runs 2N)")
    p.add_argument("--large-images", dest="n_large", type=int, help="images in the 4000x3000 CPU row")
    p.add_argument("--heavy-images", dest="n_heavy", type=int, help="images in the 512/resnet101 CPU rows (0 skips)")
    p.add_argument("--gpu-images", dest="n_gpu", type=int, help="images per GPU row (1024x768)")
    p.add_argument("--gpu-large-images", dest="n_gpu_large", type=int, help="images in the 4000x3000 GPU row")
    p.add_argument("--gpu-seconds", type=float,
                   help="1024x768 GPU rows: enough images for about this many seconds at the row's forward bound")
    p.add_argument("--gpu-rate", type=float, default=GPU_EXPECTED_RATE,
                   help="expected legitseg img/s of a 1024x768 GPU row, for --gpu-seconds (not the forward bound)")
    p.add_argument("--gpu-batch", type=int, default=32, help="--batch-size of the GPU rows' legitseg runs")
    p.add_argument("--gpu-dry-run", action="store_true",
                   help="the GPU rows' mechanics on the CPU (fp32, tiny sizes with --tiny): no CPU rows")
    p.add_argument("--gpu-unique", type=int, default=512,
                   help="distinct 1024x768 pictures in a larger image set, or as many megapixels of larger ones "
                        "(the rest are hard links to them)")
    p.add_argument("--loop-images", type=int, default=128, help="images the researcher's loop times at most")
    p.add_argument("--batch-sizes", type=sizes, help="forward-bound batch sizes on the CPU, e.g. 1,2,4,8")
    p.add_argument("--gpu-batch-sizes", type=sizes, help="forward-bound batch sizes on CUDA, e.g. 1,8,16,32")
    p.add_argument("--min-time", type=float, help="seconds per forward-bound measurement")
    p.add_argument("--sweep", action="store_true", help="also run legitseg with other --batch-size/--workers (CPU)")
    p.add_argument("--no-onnx", action="store_true", help="skip the onnxruntime rows")
    p.add_argument("--work", type=Path, default=REPO / "bench-data", help="work folder (models, images, outputs)")
    p.add_argument("--out-md", type=Path, help="Markdown file whose generated section is (re)written "
                   "[default: docs/benchmarks.md for a full run, WORK/benchmarks-MODE.md otherwise]")
    p.add_argument("--out-json", type=Path, help="results as JSON [default: WORK/results-MODE-DEVICES.json]")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    mode = make_mode(args)
    cuda = torch.cuda.is_available()
    if args.device == "cuda" and not cuda:
        print("run_bench: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    do_cpu = args.device in ("auto", "cpu") and not args.gpu_dry_run
    do_gpu = args.device == "cuda" or (args.device == "auto" and cuda) or args.gpu_dry_run
    section = "+".join(d for d, on in (("cpu", do_cpu), ("cuda", do_gpu)) if on)
    args.section = section
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work / "out", ignore_errors=True)
    machine = report.machine([torch.cuda.get_device_name(0)] if do_gpu and cuda else [])
    bench = Bench(mode, work, args, machine)
    out_json = args.out_json or work / f"results-{mode.name}-{section}.json"
    bench.json_path = out_json

    names = [mode.primary, mode.expert] + (mode.heavy if do_cpu and mode.n_heavy else [])
    names += [f"{mode.primary}_hflip", f"{mode.primary}_reduced"] if do_cpu else []
    names += [mode.gpu_primary] if do_gpu else []
    bench.prepare(list(dict.fromkeys(names)))
    gpu_what = (f"GPU rows ({mode.models[mode.gpu_primary].label} fp16: forward bound, researcher's loop, "
                f"legitseg run; target (c)/(a) >= {GPU_TARGETS['c_over_a']})")
    # A time limit (timeout's SIGTERM) ends the bench with the rows measured so far written out.
    previous = signal.signal(signal.SIGTERM, _stopped)
    try:
        if do_cpu:
            bench.cpu_rows()
        else:
            bench.not_measured.append("CPU rows: not measured, --device cuda")
        if do_gpu:
            bench.gpu_rows(torch.device("cpu") if args.gpu_dry_run and not cuda else None)
    except KeyboardInterrupt:
        bench.failures += 1
        bench.not_measured.append("the bench was stopped (SIGTERM or Ctrl-C) before it finished: the rows after "
                                  "the last one shown were not measured")
    finally:
        signal.signal(signal.SIGTERM, previous)
    if args.gpu_dry_run:
        bench.not_measured.append("GPU rows: --gpu-dry-run ran their mechanics on the CPU; no GPU numbers")
    if not do_gpu:
        why = "no GPU here (torch.cuda.is_available() is False)" if not cuda else "--device cpu"
        bench.not_measured.append(f"{gpu_what}: not measured, {why}")

    results = bench.results()
    print(report.render(results, markdown=False))
    out_md = args.out_md or (REPO / "docs" / "benchmarks.md" if mode.name == "full" else work / f"benchmarks-{mode.name}.md")
    report.write_markdown(out_md, section, report.render(results, markdown=True))
    report.write_json(out_json, results)
    print(f"wrote {out_md} (section '{section}') and {out_json}", file=sys.stderr)
    return 1 if bench.failures else 0


if __name__ == "__main__":
    sys.exit(main())
