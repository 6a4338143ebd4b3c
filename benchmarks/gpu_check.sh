#!/usr/bin/env bash
# The device check, in one go on a lent GPU machine (16 cores; torch, timm, OpenCV and onnxruntime
# present, no network): a preflight, then make bench's GPU rows, then the CUDA tests with what is left.
# One run of at most 7 minutes that cannot come back empty: the preflight stops it in ~20 s with one
# clear line when something is missing, and every later step writes its results to $OUT as it goes.
#
#   bash benchmarks/gpu_wheels.sh              # here: fills .whl/ for the device's Python
#   bash benchmarks/gpu_check.sh               # there, through the device tool, carrying [".whl"]
#   bash benchmarks/gpu_check.sh --dry-run     # here, on the CPU: the preflight's CPU parts and the plan
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
OUT=${OUT:-/tmp/gpu-out}
PY=${PYTHON:-python3}
(( DRY )) && [[ -z "${PYTHON:-}" && -x .venv/bin/python ]] && PY=.venv/bin/python
BUDGET=${BUDGET:-420}          # seconds for the whole check (the device tool allows 600 per command)
PREFLIGHT=${PREFLIGHT_BUDGET:-30}
BENCH=${BENCH_TIMEOUT:-270}
mkdir -p "$OUT"
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
say() { echo "gpu_check [$(elapsed) s]: $*" | tee -a "$OUT/gpu.txt"; }
fail() { say "PREFLIGHT FAILED: $*"; exit 3; }

plan() {
  local tests=$(( BUDGET - PREFLIGHT - BENCH ))
  cat <<EOF | tee -a "$OUT/gpu.txt"
plan (budget ${BUDGET} s; the device tool stops a command at 600 s):
  0-${PREFLIGHT} s      install .whl/ into /tmp/site; preflight: Python vs wheels, every runtime import,
                 one batched nvJPEG decode (1024x768 + 4000x3000), a two-batch legitseg run
  ${PREFLIGHT}-$(( PREFLIGHT + BENCH )) s     bench first (nvidia-smi dmon in the background, JSON after every row):
                 forward bounds at batch 32 only (fp16 each variant, fp32), legitseg runs with
                 --batch-size 32 and images for ${GPU_SECONDS:-15} s at an expected ${GPU_RATE:-150} img/s (not the bound),
                 LEGITSEG_GPU_DECODE=0 beside the GPU-decode run on the same photos (masks compared),
                 calibrated heads (mask area printed per row)
  $(( PREFLIGHT + BENCH ))-${BUDGET} s    tests with what is left (${tests} s): test_cuda, test_gpu_second_pass,
                 test_device_path, test_precision
EOF
}

# -- preflight -----------------------------------------------------------------------------------
WHEELS=()
wheels_match() {
  # gpu_wheels.sh carries wheels for several Pythons; each package needs one for this Python (cpXY,
  # or abi3 from an older cpXY) or a pure-Python one. Only those are installed.
  local tag minor name base missing=()
  tag=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")') || fail "no $PY"
  minor=${tag#cp3}
  if ! compgen -G ".whl/*.whl" >/dev/null; then
    if (( DRY )); then say "no .whl/ here (bash benchmarks/gpu_wheels.sh fills it); wheel check skipped"; return; fi
    fail "no wheels in .whl/: run bash benchmarks/gpu_wheels.sh here and carry .whl"
  fi
  declare -A found=()
  for w in .whl/*.whl; do
    base=$(basename "$w")
    name=${base%%-*}
    found[$name]=${found[$name]:-0}
    case "$base" in
      *-py3-none-any.whl|*-py2.py3-none-any.whl|*-"$tag"-"$tag"-*) ;;
      *-cp3*-abi3-*) (( $(sed -E 's/.*-cp3([0-9]+)-abi3-.*/\1/' <<<"$base") <= minor )) || continue ;;
      *) continue ;;
    esac
    found[$name]=1
    WHEELS+=("$w")
  done
  for name in "${!found[@]}"; do
    (( found[$name] )) || missing+=("$name")
  done
  (( ${#missing[@]} == 0 )) || fail "no wheel for this Python ($tag) of: ${missing[*]}; run GPU_PYTHON_VERSIONS=${tag:2:1}.${minor} bash benchmarks/gpu_wheels.sh here"
  say "wheels: ${#WHEELS[@]} for $tag or pure Python, every package covered"
}

preflight() {
  wheels_match
  if (( ! DRY )); then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${WHEELS[@]}" \
      || fail "pip could not install .whl/ into /tmp/site"
    export PYTHONPATH=/tmp/site:$PWD
  else
    export PYTHONPATH=$PWD
  fi
  export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 LEGITSEG_CACHE_DIR=${LEGITSEG_CACHE_DIR:-/tmp/legitseg-cache}
  local device=cuda
  (( DRY )) && device=cpu
  DEVICE=$device OUT=$OUT "$PY" - <<'PY' 2>&1 | tee -a "$OUT/gpu.txt"
import importlib, json, os, subprocess, sys, tempfile, time, warnings
from pathlib import Path

device = os.environ["DEVICE"]
warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 and click 8.5 announce removals
def stop(step, err):
    print(f"PREFLIGHT FAILED at {step}: {type(err).__name__}: {err}")
    sys.exit(3)

t0 = time.perf_counter()
versions = {}
for name in ("numpy", "torch", "torchvision", "cv2", "PIL", "pillow_heif", "segmentation_models_pytorch", "timm",
             "safetensors", "pydantic", "yaml", "typer", "click", "rich", "psutil", "onnxruntime", "pytest",
             "legitseg", "legitseg.cli", "legitseg.engines.local"):
    try:
        module = importlib.import_module(name)
    except Exception as err:  # noqa: BLE001 - any import failure stops the check with its name
        stop(f"import {name}", err)
    versions[name] = getattr(module, "__version__", "")
print("imports:", json.dumps({k: v for k, v in versions.items() if v}))

import cv2
import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg

if device == "cuda" and not torch.cuda.is_available():
    stop("CUDA", RuntimeError("torch.cuda.is_available() is False"))
work = Path(tempfile.mkdtemp(prefix="preflight-"))
rng = np.random.default_rng(0)
photos = []
for h, w in ((768, 1024), (3000, 4000)):
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.dstack([np.sin(xx / 97), np.cos(yy / 53), np.sin((xx + yy) / 211)]) * 90 + 128
    img = (img + rng.normal(0, 6, img.shape)).clip(0, 255).astype(np.uint8)
    ok, enc = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
    path = work / f"photo_{w}x{h}.jpg"
    path.write_bytes(enc.tobytes())
    photos.append((path, (h, w)))
try:  # one batched decode of both, as the engine does (the CPU decoder stands in on a dry run)
    encoded = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p, _ in photos]
    images = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    if device == "cuda":
        torch.cuda.synchronize()
    shapes = [tuple(i.shape) for i in images]
    if shapes != [(3, *size) for _, size in photos]:
        raise RuntimeError(f"decoded shapes {shapes}")
except Exception as err:  # noqa: BLE001
    stop(f"batched JPEG decode on {device}", err)
print(f"batched JPEG decode on {device}: {shapes}")
images_dir = work / "in"
images_dir.mkdir()
for i in range(4):  # two batches of two
    (images_dir / f"{i}.jpg").write_bytes(photos[0][0].read_bytes())
cmd = [sys.executable, "-m", "legitseg", "run", str(images_dir), "-m", "models.yaml", "-o", str(work / "out"),
       "--device", device, "--batch-size", "2", "--backend", "torch", "-q"]
proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
if proc.returncode != 0:
    stop("a two-batch legitseg run", RuntimeError(f"exit {proc.returncode}: {proc.stderr.strip()[-600:]}"))
run = json.loads((work / "out" / "run.json").read_text())
if device == "cuda" and run.get("jpeg_decoder") != "nvjpeg":
    stop("a two-batch legitseg run", RuntimeError(f"jpeg_decoder is {run.get('jpeg_decoder')!r}, not nvjpeg"))
print(f"two-batch legitseg run on {device}: {run['status']}, jpeg_decoder {run.get('jpeg_decoder')}, "
      f"{time.perf_counter() - t0:.1f} s for the preflight's Python part")
PY
  (( PIPESTATUS[0] == 0 )) || fail "see the line above"
  say "preflight passed"
}

plan
preflight
if (( DRY )); then
  # The GPU rows' code on the CPU with the tiny models: sizing, batch 32, the LEGITSEG_GPU_DECODE=0 twin and
  # its mask comparison, JSON after every row. Numbers mean nothing; a failure here would fail there.
  timeout 300 "$PY" benchmarks/run_bench.py --tiny --gpu-dry-run --work /tmp/bench-dry --gpu-seconds 1 \
    --gpu-rate 64 --out-md "$OUT/benchmarks-dry.md" --out-json "$OUT/benchmarks-dry.json" 2>&1 \
    | tee "$OUT/bench-dry.log" | grep -E "^\[|GPU|MISS" | tail -20
  (( PIPESTATUS[0] == 0 )) || fail "the GPU rows failed on the CPU (see $OUT/bench-dry.log)"
  say "dry run: GPU rows ran on the CPU; stopping before the GPU steps (nvidia-smi, bench, CUDA tests)"
  exit 0
fi

# -- bench first, then the tests with what is left -------------------------------------------------
nvidia-smi -L | tee -a "$OUT/gpu.txt"
nvidia-smi dmon -s pucm -d 1 > "$OUT/dmon.txt" 2>&1 &
dmon=$!
timeout "$BENCH" "$PY" benchmarks/run_bench.py --device cuda --quick --work /tmp/bench \
  --gpu-batch-sizes 32 --gpu-batch 32 --min-time 1 --gpu-seconds "${GPU_SECONDS:-15}" --gpu-rate "${GPU_RATE:-150}" \
  --gpu-large-images "${GPU_LARGE_IMAGES:-600}" --loop-images 48 \
  --out-md "$OUT/benchmarks-gpu.md" --out-json "$OUT/benchmarks-gpu.json" 2>&1 | tee "$OUT/bench.log" | tail -70
cp /tmp/bench/out/*.stderr.log "$OUT/" 2>/dev/null
say "bench done"
kill "$dmon" 2>/dev/null
left=$(( BUDGET - $(elapsed) - 10 ))
if (( left > 30 )); then
  timeout "$left" "$PY" -m pytest -q -p no:cacheprovider -o addopts="" -rA tests/test_cuda.py \
    tests/test_gpu_second_pass.py tests/test_device_path.py tests/test_precision.py 2>&1 | tail -40 | tee "$OUT/cuda_tests.log"
else
  say "no time left for the tests (${left} s)"
fi
say "all done"
