#!/usr/bin/env bash
# The prepared GPU check (issue 5): run on a machine with one NVIDIA GPU, from the repo root.
# Under 8 minutes. It writes reports/bench-<device>.md/.json and prints the per-run time of the
# cifar10 study's heaviest cell (E at full width, one epoch of 45,000 32px images, extrapolated).
#
# That machine has torch, torchvision and Lightning but not Hydra or MLflow. Prepare the missing
# wheels here first (never committed; .whl/ is git-ignored), then carry .whl to the machine:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     hydra-core==1.3.2 omegaconf==2.3.0 antlr4-python3-runtime==4.9.3 tabulate filelock
# (antlr4 has no wheel for every Python: build one with `pip wheel antlr4-python3-runtime==4.9.3 -w .whl`.)
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import hydra, omegaconf, tabulate" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
# 1. The paper's setting: D at 224x224, bf16, full width, paper head; MFU against the bf16 peak.
python3 -m vgg_ablation bench arch=D archs=A,D,E data=synthetic data.input_size=224 \
  data.synthetic_size=2048 data.batch_size=128 model.width=1 model.head=paper \
  steps=30 warmup=10 rounds=2 logger=none name=vgg-d-224
# 2. The cifar10 study's per-run cost: full-width E on 32px batches (data held on the GPU).
python3 -m vgg_ablation bench arch=E archs=E data=synthetic data.input_size=32 \
  data.synthetic_size=16384 data.batch_size=128 model.width=1 steps=100 warmup=20 rounds=2 logger=none name=cifar10-e
python3 - <<'PY'
import json, glob
for path in sorted(glob.glob("reports/bench-*.json")):
    rec = json.load(open(path))
    ips = rec["median_img_per_s"]["lightning_synthetic"]
    print(f"{path}: {ips:.0f} img/s -> one 45,000-image epoch {45000 / ips:.1f} s, "
          f"60 epochs {60 * 45000 / ips / 60:.1f} min per cifar10 cell (+ validation)")
PY
