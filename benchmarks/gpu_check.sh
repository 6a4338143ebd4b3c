#!/usr/bin/env bash
# The device checks, in one go on a lent GPU machine (16 cores; torch, timm, OpenCV and onnxruntime
# present, no network): the CUDA tests, then make bench's GPU rows. Under 8 minutes; results in $OUT.
# Before: `bash benchmarks/gpu_wheels.sh` here (fills .whl/ with smp, pydantic, ... for Python 3.12),
# then run this through the device tool with carry [".whl"].
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
start=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 LEGITSEG_CACHE_DIR=/tmp/legitseg-cache
nvidia-smi -L | tee "$OUT/gpu.txt"
python3 - <<'PY' 2>&1 | tee -a "$OUT/gpu.txt"
import torch, torchvision, segmentation_models_pytorch as smp, timm, cv2
from torchvision.io import decode_jpeg
print("torch", torch.__version__, "torchvision", torchvision.__version__, "smp", smp.__version__, "timm",
      timm.__version__, "cv2", cv2.__version__)
ok, enc = cv2.imencode(".jpg", (torch.rand(64, 64, 3) * 255).byte().numpy())
print("nvJPEG decode:", tuple(decode_jpeg(torch.from_numpy(enc.ravel()), device="cuda").shape))
PY
timeout "${TEST_TIMEOUT:-180}" python3 -m pytest -q -p no:cacheprovider -o addopts="" -rA \
  tests/test_cuda.py tests/test_precision.py tests/test_device_path.py 2>&1 | tail -40 | tee "$OUT/cuda_tests.log"
echo "tests done at $(( $(date +%s) - start )) s" | tee -a "$OUT/gpu.txt"
timeout "${BENCH_TIMEOUT:-270}" python3 benchmarks/run_bench.py --device cuda --quick --work /tmp/bench \
  --gpu-batch-sizes 16,32 --min-time 1 --gpu-seconds "${GPU_SECONDS:-20}" \
  --gpu-large-images "${GPU_LARGE_IMAGES:-1100}" --loop-images 48 \
  --out-md "$OUT/benchmarks-gpu.md" --out-json "$OUT/benchmarks-gpu.json" 2>&1 | tee "$OUT/bench.log" | tail -70
cp /tmp/bench/out/*.stderr.log "$OUT/" 2>/dev/null
echo "all done at $(( $(date +%s) - start )) s" | tee -a "$OUT/gpu.txt"
