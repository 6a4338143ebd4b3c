#!/usr/bin/env bash
# Wheels that benchmarks/gpu_check.sh installs on a lent GPU machine (Python 3.12, torch, timm,
# OpenCV and onnxruntime present; no network there). Run here, where the package registry is
# reachable; the device tool carries .whl/ (ignored by git) with the working tree.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${GPU_PYTHON_VERSION:-3.12}
pin() { grep -i -E "^$1==" requirements_lock.txt | head -1; }
rm -rf .whl && mkdir -p .whl
pkgs=()
# Not huggingface_hub (nor its filelock, fsspec, tqdm): the machine's timm brings its own, and the
# locked one needs httpx2 and hf-xet, which the machine lacks.
for name in segmentation_models_pytorch pydantic pydantic_core annotated-types typing-inspection typing_extensions \
    safetensors typer click rich shellingham markdown-it-py mdurl Pygments PyYAML psutil \
    packaging annotated-doc pytest pluggy iniconfig; do
  pkgs+=("$(pin "$name")")
done
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  --implementation cp -d .whl "${pkgs[@]}"
ls .whl | wc -l
du -sh .whl
