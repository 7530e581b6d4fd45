# detkd: `make repro` (set-up + dvc repro) and `make test` (set-up + the whole suite).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.detkd-installed
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup repro test smoke compare frontier lock

# Create the environment if missing; (re)install when the pins change. Exact versions: constraints.txt.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev,export,cpu,quantize,openvino]'
	@touch $(STAMP)

setup: $(STAMP)

repro: setup
	DETKD_PIPELINE_ID=$${DETKD_PIPELINE_ID:-repro-$$(date +%Y%m%d-%H%M%S)} dvc repro

test: setup
	pytest -q

smoke: setup
	python -m detkd.smoke

# Baseline vs every distillation method on both families: each family's teacher, then every method's loss
# weights swept alike on the dev split (written into params.yaml), then 3 student seeds per method as DVC
# experiments (cmp-*), then reports/kd_compare.{json,md,png}. Resumes finished work. Options:
# make compare COMPARE_ARGS="--seeds 5 --jobs 2"   (python -m detkd.compare --help)
compare: setup
	dvc repro prepare pretrain
	python -m detkd.compare $(COMPARE_ARGS)

# The speed/accuracy frontier with more student sizes (params.yaml: frontier.sizes), each trained as baseline
# and distilled student in a DVC experiment (frontier-<size>), then reports/frontier.{json,md,png}. Runs the
# default pipeline first (its teacher is reused from the run cache). Resumes finished experiments.
frontier: setup
	DETKD_PIPELINE_ID=$${DETKD_PIPELINE_ID:-frontier-$$(date +%Y%m%d-%H%M%S)} dvc repro
	python -m detkd.frontier_sizes $(FRONTIER_ARGS)

# Refresh constraints.txt from the current environment (after changing a dependency on purpose).
lock: setup
	$(BIN)/python -m pip freeze --exclude-editable | grep -v '^detkd' > constraints.txt
