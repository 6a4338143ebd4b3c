#!/usr/bin/env bash
# The device checks, for a lent GPU machine that has torch, timm and OpenCV but not smp or
# pydantic (carried as wheels in .whl/, see docs/benchmarks.md). Results go to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 LEGITSEG_CACHE_DIR=/tmp/legitseg-cache
nvidia-smi -L | tee "$OUT/gpu.txt"
python3 -c "import torch, segmentation_models_pytorch as smp, timm, cv2; print('torch', torch.__version__, 'smp', smp.__version__, 'timm', timm.__version__, 'cv2', cv2.__version__)" | tee -a "$OUT/gpu.txt"
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_precision.py 2>&1 | tail -25 | tee "$OUT/cuda_tests.log"
timeout "${BENCH_TIMEOUT:-280}" python3 benchmarks/run_bench.py --device cuda --work /tmp/bench \
  --gpu-images "${GPU_IMAGES:-192}" --gpu-large-images "${GPU_LARGE_IMAGES:-24}" \
  --out-md "$OUT/benchmarks-gpu.md" --out-json "$OUT/benchmarks-gpu.json" 2>&1 | tee "$OUT/bench.log" | tail -60
