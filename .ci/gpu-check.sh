#!/usr/bin/env bash
# The prepared GPU check (issue 11), one command on a lent GPU machine, from the repo root:
#   bash .ci/gpu-check.sh            # results under $OUT (the device tool's), else reports/gpu-check/
#   bash .ci/gpu-check.sh --dry-run  # the same steps CPU-sized, on any machine (CI runs this)
# Needs: torch, torchvision, pytorch-lightning (the GPU image has them); hydra-core, omegaconf and
# MLflow come from .whl/ (prepare it here with `make gpu-wheels`, carry it along) when missing; the
# GPU study's data from .gpu-data/ (`make gpu-data`, carried too).
# Within 12 minutes on an H100/H200, start-up included (the study is capped by the time left);
# writes gpu-check.md/.json, the two bench reports, the GPU study's report and runs CSV, a zip of
# its plots and logs, and this log, and prints every figure.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-reports/gpu-check}
mkdir -p "$OUT"
if ! python3 -c "import hydra, omegaconf, mlflow" 2>/dev/null; then
  ls .whl/*.whl >/dev/null 2>&1 || { echo "error: hydra/omegaconf/mlflow missing and no .whl/: run 'make gpu-wheels' and carry .whl" >&2; exit 2; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu-check.log"
DATA=()
if [ -f .gpu-data/cifar10-gpu.zip ]; then  # the GPU study's CIFAR-10 (make gpu-data), carried along
  python3 -m zipfile -e .gpu-data/cifar10-gpu.zip /tmp/gpu-data
  DATA=(--data /tmp/gpu-data/cifar10)
fi
python3 -m vgg_ablation.commands.gpucheck --out "$OUT" "${DATA[@]}" "$@" 2>&1 | tee -a "$OUT/gpu-check.log"
