"""The three measurements of the benchmark, and a serial stage profile of legitseg's own steps.

(a) `forward_bound`: the model's forward pass on ready tensors, best layout and batch.
(b) `researcher_loop`: imread -> resize -> normalise -> model(x[None]) -> sigmoid ->
    resize back -> imwrite, fp32, batch 1, contiguous, inference_mode.
(c) `legitseg_run`: `python -m legitseg run` as a subprocess; start-up and steady state
    from the modification times of the per-image records (written last, atomically).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, precision: str):
    dtype = DTYPES[precision]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def time_calls(call: Callable[[], object], device: torch.device, min_time: float,
               min_iters: int = 2, warmup: int = 1) -> tuple[int, float]:
    """(iterations, seconds) of repeated `call()` after `warmup` calls, lasting at least `min_time`.

    The number of iterations is estimated from the last warm-up call, so the device
    is synchronised only around the timed block (no per-call bubble on a GPU).
    """
    t_one = 0.0
    for _ in range(max(1, warmup)):
        t0 = time.perf_counter()
        call()
        sync(device)
        t_one = time.perf_counter() - t0
    iters = max(min_iters, math.ceil(min_time / max(t_one, 1e-6)))
    t0 = time.perf_counter()
    for _ in range(iters):
        call()
    sync(device)
    return iters, time.perf_counter() - t0


# -- (a) the forward bound --------------------------------------------------------------------
@dataclass
class ForwardBound:
    """Images/s of the bare forward pass per (variant, batch); `best` picks the fastest."""

    model: str
    backend: str  # torch | onnxruntime
    device: str
    precision: str
    threads: int
    grid: dict[str, dict[int, float]] = field(default_factory=dict)  # variant -> batch -> img/s
    note: str = ""

    @property
    def best(self) -> tuple[str, int, float]:
        return max(((v, b, r) for v, row in self.grid.items() for b, r in row.items()), key=lambda t: t[2])

    def as_dict(self) -> dict:
        variant, batch, rate = self.best
        return {**asdict(self), "grid": {v: {str(b): round(r, 3) for b, r in row.items()}
                                         for v, row in self.grid.items()},
                "best_variant": variant, "best_batch": batch, "best_img_s": round(rate, 3)}


def forward_bound(module: torch.nn.Module, name: str, in_channels: int, size: tuple[int, int],
                  device: torch.device, precision: str, batch_sizes: list[int], min_time: float,
                  half_weights: bool = False) -> ForwardBound:
    """Time `module` on random ready tensors for each layout x batch size.

    fp16/bf16 use torch.autocast, as legitseg does; with `half_weights` (CUDA fp16)
    a copy of the model in half precision is timed too, as a bound legitseg might reach.
    """
    result = ForwardBound(name, "torch", str(device), precision, torch.get_num_threads())
    h, w = size
    variants: list[tuple[str, torch.nn.Module, torch.memory_format, torch.dtype]] = []
    for layout, fmt in LAYOUTS.items():
        variants.append((layout, module, fmt, torch.float32))
    if half_weights:
        half = copy.deepcopy(module).half()
        for layout, fmt in LAYOUTS.items():
            variants.append((f"{layout}+half", half, fmt, torch.float16))
    for variant, mod, fmt, in_dtype in variants:
        mod.to(device, memory_format=fmt)
        amp = precision if in_dtype == torch.float32 else "fp32"  # half weights need no autocast
        row: dict[int, float] = {}
        for b in batch_sizes:
            x = torch.randn(b, in_channels, h, w, device=device, dtype=in_dtype).contiguous(memory_format=fmt)

            def call(x=x, mod=mod, amp=amp):
                with torch.inference_mode(), _autocast(device, amp):
                    return mod(x)

            iters, seconds = time_calls(call, device, min_time, warmup=2 if device.type == "cuda" else 1)
            row[b] = b * iters / seconds
            del x
        result.grid[variant] = row
    module.to(device, memory_format=torch.contiguous_format)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def ort_forward_bound(session, name: str, in_channels: int, size: tuple[int, int], batch_sizes: list[int],
                      min_time: float, threads: int) -> ForwardBound:
    """Time an ONNX Runtime session (contiguous NCHW float32 only) for each batch size."""
    result = ForwardBound(name, "onnxruntime", "cpu", "fp32", threads)
    input_name = session.get_inputs()[0].name
    rng = np.random.default_rng(0)
    row: dict[int, float] = {}
    for b in batch_sizes:
        x = rng.standard_normal((b, in_channels, *size), dtype=np.float32)
        iters, seconds = time_calls(lambda x=x: session.run(None, {input_name: x}), torch.device("cpu"), min_time)
        row[b] = b * iters / seconds
    result.grid["contiguous"] = row
    return result


def combined_rate(rates: list[float]) -> float:
    """Images/s when every image goes through each of several models in turn: 1 / sum(1/r)."""
    return 1.0 / sum(1.0 / r for r in rates)


# -- (b) the researcher's loop ----------------------------------------------------------------
@dataclass
class LoopModel:
    """What the loop needs of one model: the module, its input size, mean/std and task."""

    name: str
    module: torch.nn.Module
    size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    task: str


@dataclass
class LoopResult:
    images: int  # timed images (after the warm-up ones)
    seconds: float
    img_s: float
    stages_ms: dict[str, float]  # mean per image


def researcher_loop(models: list[LoopModel], files: list[Path], out: Path, device: torch.device,
                    warmup: int = 1) -> LoopResult:
    """The loop a researcher writes first, one image at a time; each stage is timed.

    Severity models append their softmax to a list instead of writing a mask.
    """
    out.mkdir(parents=True, exist_ok=True)
    for m in models:
        m.module.to(device, memory_format=torch.contiguous_format)
    stages = dict.fromkeys(("read", "preprocess", "forward", "postprocess", "write"), 0.0)
    scores = []
    timed, t_start = 0, 0.0
    for i, path in enumerate(files):
        if i == warmup:
            stages = dict.fromkeys(stages, 0.0)
            t_start = time.perf_counter()
        t0 = time.perf_counter()
        image = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        height, width = image.shape[:2]
        stages["read"] += time.perf_counter() - t0
        for m in models:
            t0 = time.perf_counter()
            x = cv2.resize(image, (m.size[1], m.size[0]), interpolation=cv2.INTER_LINEAR)
            x = (x.astype(np.float32) / 255.0 - np.float32(m.mean)) / np.float32(m.std)
            x = torch.from_numpy(x.transpose(2, 0, 1).copy()).to(device)
            t1 = time.perf_counter()
            with torch.inference_mode():
                y = m.module(x[None])
            sync(device)
            t2 = time.perf_counter()
            if m.task == "severity":
                scores.append(torch.softmax(y, dim=1)[0].cpu().numpy())
                stages["preprocess"] += t1 - t0
                stages["forward"] += t2 - t1
                stages["postprocess"] += time.perf_counter() - t2
                continue
            prob = torch.sigmoid(y)[0, 0].cpu().numpy()
            prob = cv2.resize(prob, (width, height), interpolation=cv2.INTER_LINEAR)
            mask = (prob > 0.5).astype(np.uint8) * 255
            t3 = time.perf_counter()
            cv2.imwrite(str(out / f"{path.stem}_{m.name}.png"), mask)
            stages["preprocess"] += t1 - t0
            stages["forward"] += t2 - t1
            stages["postprocess"] += t3 - t2
            stages["write"] += time.perf_counter() - t3
        timed += i >= warmup
    seconds = time.perf_counter() - t_start
    n = max(timed, 1)
    return LoopResult(timed, seconds, timed / seconds if seconds else 0.0,
                      {k: 1000 * v / n for k, v in stages.items()})


# -- (c) legitseg run ---------------------------------------------------------------------------
@dataclass
class RunResult:
    images: int
    wall_s: float  # process start to exit
    startup_s: float  # process start to the first record written
    steady_img_s: float  # steady state: between the first and the last-but-one batch's records
    k: int
    peak_rss_mb: float
    batch_size: int | None
    workers: int | None
    backends: dict[str, str]
    command: list[str]
    profile: dict | None = None  # LEGITSEG_PROFILE's JSON: GPU busy share, main-thread CPU, syncs
    area_fraction: float | None = None  # mean mask area over the run's masks (scores.jsonl); None: no masks
    parity_gate: dict = field(default_factory=dict)  # model -> run.json's parity_gate (the rule's figures)
    from_start_img_s: float | None = None  # N / (last record - engine start): pipeline fill included
    startup_split: list = field(default_factory=list)  # [step, seconds] from spawn to the first record
    variants: dict = field(default_factory=dict)  # model -> run.json's variant (layout, or images per ONNX Runtime call)


class RunFailed(RuntimeError):
    pass


class StepClock:
    """Wall and process-CPU clocks at the end of each step of one image (the serial stage
    profiles here and in cpu_stages.py): `mark()` after each step, `steps()` the intervals."""

    def __init__(self) -> None:
        self.wall, self.cpu = [time.perf_counter()], [time.process_time()]

    def mark(self) -> None:
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())

    def steps(self) -> list[tuple[float, float]]:
        """(wall s, CPU s) of each step, in order."""
        return [(w1 - w0, c1 - c0) for w0, w1, c0, c1 in
                zip(self.wall, self.wall[1:], self.cpu, self.cpu[1:], strict=False)]


def legitseg_command(manifest: Path, models: list[str], images: Path, out: Path, device: str,
                     precision: str, backend: str, extra: list[str] | None = None) -> list[str]:
    return [sys.executable, "-m", "legitseg", "run", str(images), "-m", str(manifest), "--models",
            ",".join(models), "-o", str(out), "--device", device, "--precision", precision,
            "--backend", backend, "--quiet", *(extra or [])]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a legitseg subprocess: this repo first on PYTHONPATH (works uninstalled)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(extra or {})}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def _peak_rss(pid: int) -> int:
    """Bytes: the process's own high-water RSS (VmHWM) plus its children's current RSS.

    Not the ru_maxrss of wait4: a child inherits the parent's high-water mark at
    fork, so it would report this (large) benchmark process instead of legitseg.
    VmHWM belongs to the process's own address space after exec and only grows,
    so the last reading before exit is the peak up to the last 50 ms.
    """
    import psutil

    try:
        proc = psutil.Process(pid)
        children = sum(c.memory_info().rss for c in proc.children(recursive=True))
        with open(f"/proc/{pid}/status") as f:
            hwm = next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")), None)
        return (hwm if hwm is not None else proc.memory_info().rss) + children
    except (psutil.Error, OSError):  # exited between the calls, or no /proc (not Linux)
        return 0


def legitseg_run(command: list[str], out: Path, expected: int, k: int | None = None,
                 env: dict[str, str] | None = None, timeout: float = 3600, cwd: Path | None = None) -> RunResult:
    """Run one `legitseg run` subprocess over a fresh OUT and time it.

    Start-up: from just before the process is spawned to the modification time of
    the first record, split by step (`rates`); rates: steady and from the engine's start
    (`rates`). Peak RSS: see `_peak_rss`, sampled every 50 ms. Raises RunFailed when
    the run fails or writes fewer records than expected.
    """
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    log_path = out.parent / f"{out.name}.stderr.log"
    with open(log_path, "wb") as log:
        t0 = time.time()
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, stdin=subprocess.DEVNULL,
                                env=env or child_env(), cwd=cwd)
        deadline = time.monotonic() + timeout
        peak = 0
        try:
            while True:
                peak = max(peak, _peak_rss(proc.pid))
                pid, status, _ = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                if time.monotonic() > deadline:
                    proc.kill()
                    _, status, _ = os.wait4(proc.pid, 0)
                    break
                time.sleep(0.05)
        except BaseException:  # the bench is being stopped: no legitseg run outlives it
            proc.kill()
            os.wait4(proc.pid, 0)
            raise
        t_end = time.time()
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; tell Popen
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RunFailed(f"`{' '.join(command)}` exited {proc.returncode}:\n{tail}")
    times = sorted(p.stat().st_mtime_ns / 1e9 for p in (out / "records").rglob("*.json"))
    if len(times) != expected:
        raise RunFailed(f"`{' '.join(command)}` wrote {len(times)} records, expected {expected}")
    run_json = json.loads((out / "run.json").read_text())
    k = k or run_json.get("batch_size") or 1
    if not 1 <= k < expected:
        raise RunFailed(f"{expected} images leave no steady state after the first {k} (a batch); use more")
    steady, from_start, split = rates(times, k, t0, (env or {}).get("LEGITSEG_PROFILE"))
    models = run_json.get("models", {})
    return RunResult(
        images=expected, wall_s=t_end - t0, startup_s=times[0] - t0, steady_img_s=steady, k=k,
        from_start_img_s=from_start, startup_split=split,
        peak_rss_mb=peak / 2**20, batch_size=run_json.get("batch_size"),
        workers=run_json.get("workers"),
        backends={m: v.get("backend", "torch") for m, v in models.items()}, command=command,
        area_fraction=mean_area(out), parity_gate={m: v.get("parity_gate") for m, v in models.items()},
        variants={m: v.get("variant") for m, v in models.items()})


def rates(times: list[float], k: int, spawned: float, profile_path: str | None
          ) -> tuple[float, float | None, list]:
    """(steady, from_start, start-up split) of a run from its record times (sorted).

    Steady: (N - 2K) / (t[N-K] - t[K]), from the first batch's last record to the last-but-one
    batch's last record. At both instants the pipeline is equally full (the engine works up to
    two batches ahead of the records), so the rate is neither flattered by the drain at the end
    nor lowered by the fill at the start: it is the pace of a long run, the quantity the forward
    bounds measure. Runs of fewer than 3K images: (N - K) / (t_N - t_K). From start: N /
    (t_N - engine start) (LEGITSEG_PROFILE), the fill counted. The split: from the spawn to the
    first record, by the marks of legitseg/timeline.py.
    """
    n = len(times)
    if n >= 3 * k:
        steady = (n - 2 * k) / (times[n - k - 1] - times[k - 1])
    else:
        steady = (n - k) / (times[-1] - times[k - 1])
    profile = json.loads(Path(profile_path).read_text()) if profile_path and Path(profile_path).is_file() else {}
    started = profile.get("started_at")
    from_start = n / (times[-1] - started) if isinstance(started, float) else None
    split, last = [], spawned
    names = {"run": "python, imports", "planned": "hash weights, find images", "device": "torch, device"}
    for name, at in profile.get("marks", []):
        verb, _, model = name.partition(" ")
        step = names.get(name) or {"built": "build", "exported": "export/cache", "gated": "gate",
                                   "ready": "runner"}.get(verb, verb) + f" {model}"
        split.append([step, at - last])
        last = at
    if isinstance(started, float):
        split += [["engine start", started - last], ["first batch", times[0] - started]]
    return steady, from_start, split


def mean_area(out: Path) -> float | None:
    """Mean foreground area fraction of the masks a run wrote (scores.jsonl): a random head
    marks every pixel or none (0 or 1); the calibrated head about half of each photo."""
    areas = []
    path = out / "scores.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else ():
        area = json.loads(line).get("area_fraction")
        if isinstance(area, dict) and area:
            areas.append(sum(area.values()))
    return sum(areas) / len(areas) if areas else None


def mask_agreement(a: Path, b: Path) -> dict:
    """Two runs of the same images compared mask by mask: the share of pixels that differ
    (largest and overall) and how many masks are byte-identical."""
    names = sorted(p.relative_to(a) for p in (a / "masks").rglob("*.png"))
    differ, total, worst, same = 0, 0, 0.0, 0
    for name in names:
        x = cv2.imread(str(a / name), cv2.IMREAD_UNCHANGED)
        y = cv2.imread(str(b / name), cv2.IMREAD_UNCHANGED)
        if y is None or x.shape != y.shape:
            return {"masks": len(names), "missing_or_other_size": str(name)}
        d = int(np.count_nonzero(x != y))
        differ, total, same = differ + d, total + x.size, same + (d == 0)
        worst = max(worst, d / x.size)
    return {"masks": len(names), "identical": same, "changed_share": differ / total if total else 0.0,
            "worst_mask_changed_share": worst}


# -- legitseg's own steps, one image at a time --------------------------------------------------
def legitseg_stages(manifest: Path, name: str, files: list[Path], out: Path, device: torch.device,
                    precision: str, warmup: int = 1) -> tuple[dict[str, float], dict[str, float]]:
    """Mean wall ms and CPU ms per image of each step of legitseg's pipeline, run serially.

    read+hash, header check, decode, resize (prepare), forward (normalise included),
    (on a GPU, JPEGs are decoded, turned and resized there as the engine does)
    postprocess (upsample, activation, mask, areas, components), PNG encode, and the
    atomic writes (mask + record, each fsync'ed). The engine overlaps these stages;
    this says what each one costs. CPU ms is the process's CPU time (every thread) during
    the step: what the step takes from the cores the other stages share.
    """
    from legitseg.fsio import atomic_write, sha256_bytes
    from legitseg.images import device_decode
    from legitseg.images.decode import (
        check_header,
        decode_8bit,
        prepare,
        read_bytes,
    )
    from legitseg.inference import postprocess
    from legitseg.inference.torch_runner import TorchRunner
    from legitseg.manifest.choices import DEFAULT_MAX_PIXELS
    from legitseg.manifest.spec import load_manifest
    from legitseg.models.factory import load_model
    from legitseg.options import Environment
    from legitseg.output.writers import encode_png, record_path

    spec = load_manifest(manifest).select([name])[0]
    runner = TorchRunner(load_model(spec), device, precision)
    gpu_decode = Environment.read().gpu_decode
    shutil.rmtree(out, ignore_errors=True)
    stages = dict.fromkeys(("read+hash", "header", "decode", "resize", "forward", "postprocess",
                            "png encode", "write+fsync"), 0.0)
    cpu = dict(stages)
    n = 0
    for i, path in enumerate(files):
        if i == warmup:
            stages, cpu = dict.fromkeys(stages, 0.0), dict.fromkeys(stages, 0.0)
        clock = StepClock()
        mark = clock.mark
        data = read_bytes(path)
        digest = sha256_bytes(data)
        mark()
        fmt = check_header(data, DEFAULT_MAX_PIXELS)
        planned = device_decode.plan(data, fmt) if device.type == "cuda" and gpu_decode else None
        mark()
        image = None
        if planned is not None:  # what the engine does on a GPU: nvJPEG, then orientation and resize there
            image = device_decode.decode([torch.frombuffer(bytearray(data), dtype=torch.uint8)], device)[0]
        if image is not None:
            image = device_decode.orient(image, planned[1])
            sync(device)
            mark()
            arr = device_decode.prepare(image, runner.prep)
            size = tuple(image.shape[-2:])
            sync(device)
        else:  # as load_image: the decoder's own channel order, only the model's input converted
            decoded, bgr = decode_8bit(data, fmt)
            mark()
            arr = prepare(decoded, runner.prep, bgr=bgr)
            size = decoded.shape[:2]
        mark()
        logits = runner.logits([arr])
        if device.type == "cpu":
            logits = logits.cpu()
        sync(device)
        mark()
        if spec.task == "severity":
            result = postprocess.severity(logits[0], spec)
            png = None
        else:
            result = postprocess.segmentation(logits[0], size, spec, False)
        mark()
        if spec.task != "severity":
            png = encode_png(result.mask)
        mark()
        if png is not None:
            atomic_write(out / "masks" / f"{path.name}.png", png)
        atomic_write(record_path(out, path.name), json.dumps({"image": str(path), "sha256": digest}).encode())
        mark()
        for key, (wall, used) in zip(stages, clock.steps(), strict=True):
            stages[key] += wall
            cpu[key] += used
        n += i >= warmup
    return ({k: 1000 * v / max(n, 1) for k, v in stages.items()},
            {k: 1000 * v / max(n, 1) for k, v in cpu.items()})


# -- ceilings of the stages around the model (for the 12 MP rows) ------------------------------
def _threaded_rate(work: Callable[[int], object], items: int, threads: int, min_time: float) -> float:
    """Items per second of `work(i)` for i = 0, 1, ... over a pool of `threads`, for at least `min_time`."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(work, range(min(items, threads))))  # warm-up
        done, t0 = 0, time.perf_counter()
        while True:
            list(pool.map(work, range(done, done + items)))
            done += items
            elapsed = time.perf_counter() - t0
            if elapsed >= min_time:
                return done / elapsed


def decode_ceiling(files: list[Path], threads: int, min_time: float) -> float:
    """JPEG decode (OpenCV, EXIF applied, to RGB) in `threads` threads, from bytes in memory: img/s."""
    datas = [p.read_bytes() for p in files]

    def work(i: int) -> None:
        arr = cv2.imdecode(np.frombuffer(datas[i % len(datas)], np.uint8), cv2.IMREAD_COLOR)
        cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)

    return _threaded_rate(work, len(datas), threads, min_time)


def gpu_decode_ceiling(files: list[Path], device: torch.device, batch: int, min_time: float) -> float:
    """JPEG decode on the GPU (torchvision's nvJPEG path) in batches of `batch`, from bytes in memory: img/s."""
    from torchvision.io import ImageReadMode, decode_jpeg

    datas = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in files]
    batches = [[datas[(k + j) % len(datas)] for j in range(batch)] for k in range(0, len(datas), batch)]
    state = {"i": 0}

    def call() -> None:
        decode_jpeg(batches[state["i"] % len(batches)], mode=ImageReadMode.RGB, device=device)
        state["i"] += 1

    iters, seconds = time_calls(call, device, min_time)
    return iters * batch / seconds


def encode_ceiling(masks: list[np.ndarray], threads: int, min_time: float) -> float:
    """PNG encoding of the masks as legitseg writes them, in `threads` threads: img/s."""
    from legitseg.output.writers import encode_png

    def work(i: int) -> None:
        encode_png(masks[i % len(masks)])

    return _threaded_rate(work, len(masks), threads, min_time)
