#!/usr/bin/env bash
# Wheels that benchmarks/gpu_check.sh installs on a lent GPU machine (torch, timm, OpenCV and
# onnxruntime present; no network there). Run here, where the package registry is reachable; the
# device tool carries .whl/ (ignored by git) with the working tree. Which Python the lent machine
# has is not known in advance, so binary wheels come for each of GPU_PYTHON_VERSIONS; the check's
# preflight installs those for the Python it finds and stops at once if a package has none.
set -euo pipefail
cd "$(dirname "$0")/.."
PYS=${GPU_PYTHON_VERSIONS:-${GPU_PYTHON_VERSION:-3.10 3.11 3.12 3.13}}
pin() { grep -i -E "^$1==" requirements_lock.txt | head -1; }
rm -rf .whl && mkdir -p .whl
pkgs=()
# Not huggingface_hub (nor its filelock, fsspec, tqdm): the machine's timm brings its own, and the
# locked one needs httpx2 and hf-xet, which the machine lacks.
for name in segmentation_models_pytorch pydantic pydantic_core annotated-types typing-inspection typing_extensions \
    safetensors typer click rich shellingham markdown-it-py mdurl Pygments PyYAML psutil \
    packaging annotated-doc pytest pluggy iniconfig pillow-heif; do
  pkgs+=("$(pin "$name")")
done
for py in $PYS; do
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version "$py" \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --implementation cp -d .whl "${pkgs[@]}"
done
ls .whl | wc -l
du -sh .whl
