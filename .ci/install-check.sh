#!/usr/bin/env bash
# Installed like a user, not checked out: build the wheel, install it into a fresh virtual
# environment away from the checkout (torch from this machine's own wheels, as `make` does), and
# from another folder run a tiny train, the smoke study, its report, and a study kept in that
# folder. A traceback anywhere fails it.   Usage: bash .ci/install-check.sh [WORK_DIR]
# DEPS_FROM=<python>: the fresh environment sees that environment's installed packages (a path
# line, so none of its .pth files run: an editable checkout stays out) and gets the wheel alone,
# with `pip check` for its declared requirements. What the suite runs: the wheel, its configs and
# the commands from another folder are checked the same; pip installing torch & co from scratch,
# and byte-compiling them on first import, is left to `make install-check`. Measured here, one
# after the other beside a training run: 433 s of CPU (680 s wall) from scratch, 178 s (270 s) so.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$(mktemp -d)}
mkdir -p "$work"
python=${PYTHON:-python3}
# a user's environment: a PYTHONPATH onto a checkout (as when the tests run from a worktree) makes
# pip find the package "already satisfied" there and install no command
unset PYTHONPATH
echo "== wheel"
quietly() {  # a step whose output matters only when it fails (pip's notes on this machine's indexes aside)
  local out
  if ! out=$("$@" 2>&1); then echo "$out" | grep -v "is ignored" | tail -30; echo "error: '$*' failed"; exit 1; fi
}
quietly "$python" -m pip wheel --quiet --no-deps -w "$work/dist" "$repo"
wheel=$(ls "$work"/dist/vgg_ablation-*.whl)
echo "$wheel"
listing=$("$python" -m zipfile -l "$wheel")
if grep -q "vgg_ablation/conf/experiment/smoke.yaml" <<<"$listing"; then echo "configs inside the wheel"; else echo "error: the wheel holds no configs"; exit 1; fi
echo "== a fresh environment"
if [ -n "${DEPS_FROM:-}" ]; then
  # no pip or setuptools of its own (an old bundled setuptools would shadow the newer one torch
  # needs): the other environment's pip installs into it (pip --python)
  "$python" -m venv --without-pip "$work/venv"
  deps=$("$DEPS_FROM" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  own=$("$work/venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  echo "$deps" > "$own/deps-from.pth"
  echo "dependencies from $deps"
  pip_there=("$DEPS_FROM" -m pip --python "$work/venv/bin/python")
  quietly "${pip_there[@]}" install --quiet --no-deps --no-compile "$wheel"
  quietly "${pip_there[@]}" check
else
  "$python" -m venv "$work/venv"
  quietly "$work/venv/bin/pip" install --quiet --upgrade pip
  # --no-compile: the modules a command imports are byte-compiled when first imported; compiling
  # all of torch's up front was half of this step's CPU time (user 144 s -> 56 s for the install)
  quietly "$work/venv/bin/pip" install --quiet --no-compile "$wheel"
fi
found=$(cd / && "$work/venv/bin/python" -c "import vgg_ablation; print(vgg_ablation.__file__)")
case "$found" in
  "$work/venv/"*) echo "the package imported from the wheel's install" ;;
  *) echo "error: vgg_ablation imported from $found, not from the fresh environment"; exit 1 ;;
esac
cd "$work" && mkdir -p elsewhere && cd elsewhere
export PATH="$work/venv/bin:$PATH" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
unset MLFLOW_TRACKING_URI
run() {  # a command as a user types it; its output's tail; fails on an error or a traceback
  echo "== $*"
  if ! out=$("$@" 2>&1); then echo "$out" | tail -30; echo "error: '$*' failed"; exit 1; fi
  if grep -q "Traceback" <<<"$out"; then echo "$out" | tail -40; echo "error: a traceback in '$*'"; exit 1; fi
  echo "$out" | tail -3
}
tiny=(model.width=0.0625 trainer.limit_train_batches=2 trainer.limit_val_batches=1 trainer.limit_test_batches=2 data.batch_size=32)
run vgg-ablation --version
run vgg-ablation summary arch=D
run vgg-ablation train trainer.max_epochs=1 "${tiny[@]}"
run vgg-ablation study experiment=smoke "${tiny[@]}"
run vgg-ablation report experiment=smoke "${tiny[@]}"
mkdir -p my-studies
cat > my-studies/mine.yaml <<'YAML'
# @package _global_
# A study of my own, kept in my own folder: a delta on the package's config, like its studies.
defaults:
  - override /trainer: smoke
study:
  name: mine
  archs: [A, A-LRN]
  seeds: [0, 1]
model:
  width: 0.0625
YAML
run vgg-ablation study experiment=mine study_dir=my-studies
test -s reports/smoke.md && test -s reports/mine.md && test -s reports/mine-runs.csv
if vgg-ablation study experiment=nope study_dir=my-studies 2>err.txt; then echo "error: an unknown study ran"; exit 1; fi
grep -q "looked in .*my-studies" err.txt && echo "an unknown study names where it was looked for"
echo "install check passed: $(vgg-ablation --version)"
