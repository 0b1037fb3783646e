#!/usr/bin/env bash
# Prepare, here (with network to the package registries), the wheels the GPU check needs on a
# lent GPU machine: it has torch, torchvision and Lightning but not hydra-core, omegaconf or
# MLflow, and no network. Writes .whl/ (git-ignored); carry it with the repo (limit 64 MiB).
#   usage: bash .ci/gpu-wheels.sh [python]     (make gpu-wheels)
# The machine's Python is 3.12 on x86-64 (KINDS.md); antlr4-python3-runtime 4.9.3 (hydra's
# parser runtime) has no wheel on PyPI, so it is built from its sdist (pure Python).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python3}
MLFLOW=$("$PY" -c "import importlib.metadata as m; print(m.version('mlflow'))")  # the store schema we test with
rm -rf .whl && mkdir .whl
"$PY" -m pip wheel --quiet --no-deps antlr4-python3-runtime==4.9.3 -w .whl
# MLflow's client and SQLite store (mlflow-skinny: no UI or server dependencies) and Hydra, with
# every dependency resolved for the GPU machine's platform
"$PY" -m pip download --quiet --only-binary=:all: --find-links .whl --dest .whl \
  --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  "hydra-core==1.3.2" "omegaconf==2.3.0" "mlflow-skinny==$MLFLOW" sqlalchemy alembic
# drop what the machine already has (one version of each package, or pip refuses the set)
"$PY" - <<'PY'
import re
from pathlib import Path

have = {w for line in Path(".ci/gpu-image-packages.txt").read_text().splitlines()
        if not line.startswith("#") for w in line.split()}
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
have = {norm(n) for n in have}
kept = 0
for wheel in sorted(Path(".whl").glob("*.whl")):
    if norm(wheel.name.split("-")[0]) in have:
        wheel.unlink()
    else:
        kept += wheel.stat().st_size
print(f".whl: {len(list(Path('.whl').glob('*.whl')))} wheels, {kept / 2**20:.1f} MiB")
PY
