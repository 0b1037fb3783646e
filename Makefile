# Everyday commands. Each installs the project into .venv on first use (about a minute here: torch
# and torchvision come from this machine's disk), then reuses it.
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed-stamp
# Every command here starts fresh Pythons (a study: a sweep; the suite: ~250 processes), and a
# start costs 6 s of imports with cached bytecode, 17 without. So bytecode is written even where
# the environment says not to (PYTHONDONTWRITEBYTECODE, as on these machines), and the install
# leaves compiling to each module's first import: the whole suite compiled 7,106 files that way,
# pip's install all 16,782 (here the install took 60-62 s instead of 103 s).
unexport PYTHONDONTWRITEBYTECODE

.PHONY: study smoke sample-report test test-fast lint bench gpu-wheels gpu-data gpu-check install-check ui dashboard-shots clean

$(INSTALLED): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --no-compile -e '.[dev]'
	touch $(INSTALLED)

study: $(INSTALLED)  ## the main job: the six-step study on the embedded sample; its report in outputs/reports/ (not the committed one)
	$(VENV)/bin/vgg-ablation study study.reports_dir=outputs/reports $(ARGS)

smoke: $(INSTALLED)  ## a one-minute study (2 nets x 2 seeds, a few batches): the whole path, end to end
	$(VENV)/bin/vgg-ablation study experiment=smoke study.reports_dir=outputs/reports $(ARGS)

sample-report: $(INSTALLED)  ## maintainers: regenerate the committed reports/sample.* (the defaults: a cell per core, one thread each, reproduce it)
	$(VENV)/bin/vgg-ablation study experiment=sample $(ARGS)

test: $(INSTALLED)  ## every test, the slow (real training, real sweeps) ones included
	$(PY) -m pytest $(ARGS)

test-fast: $(INSTALLED)  ## unit tests only
	$(PY) -m pytest -m "not slow" $(ARGS)

lint: $(INSTALLED)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: $(INSTALLED)  ## training throughput against plain PyTorch, written to reports/bench-<device>.md
	$(VENV)/bin/vgg-ablation bench $(ARGS)

gpu-wheels: $(INSTALLED)  ## here: the wheels the GPU check needs on a bare GPU machine, into .whl/
	bash .ci/gpu-wheels.sh $(PY)

gpu-data:  ## here: the GPU study's CIFAR-10 subset (50 MiB, what a lent machine takes), into .gpu-data/
	python3 .ci/gpu-data.py $(ARGS)

gpu-check:  ## on a lent GPU machine (carry .whl and .gpu-data); ARGS=--dry-run runs it CPU-sized anywhere
	bash .ci/gpu-check.sh $(ARGS)

install-check:  ## the package as a user installs it: a wheel in a fresh environment, run from another folder
	bash .ci/install-check.sh

ui: $(INSTALLED)  ## the MLflow dashboard on this folder's runs, on 127.0.0.1:5000
	$(VENV)/bin/vgg-ablation ui $(ARGS)

dashboard-shots: $(INSTALLED)  ## screenshots of a study in the dashboard (Debian's chromium), into reports/
	$(PY) -m vgg_ablation.commands.dashboard $(or $(ARGS),experiment=sample)

clean:
	rm -rf outputs multirun checkpoints mlruns mlflow.db .pytest_cache
