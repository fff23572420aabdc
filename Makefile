# tokprune: `make install` once (any target does it for you), then `make train` / `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# On these machines torch==2.13.0 is the CPU build already on disk; on a GPU box set TORCH=torch.
TORCH ?= torch==2.13.0

# GLUE in its original TSV layout; ':' separates folders searched in order.
GLUE_DIR ?= $(abspath ../shared/data/glue):$(abspath ../shared/data/qqp-sample)
export GLUE_DIR
MLFLOW_DB ?= $(abspath mlflow.db)

METHOD ?= none
TASK ?= sst2
BUDGET ?= cpu
MODEL ?= minilm
SEED ?= 42
ARGS ?=
# make sweep: TRIALS = total wanted (empty: sweeps/<method>.yaml's default for the budget),
# WORKERS = processes on this machine, STORAGE = empty (journal file beside mlflow.db) or a
# database URL shared by many machines (postgresql://user@host/db).
TRIALS ?=
WORKERS ?=
STORAGE ?=
# make eval / make predict / make export: CKPT = a checkpoint (checkpoints/<run id>/best.ckpt); predict
# reads INPUT (GLUE TSV or plain text) and writes OUTPUT (TSV); export writes OUT (default <CKPT>.onnx,
# which engine=onnx reuses). ENGINE = torch (default) or onnx (ONNX Runtime) for eval and predict.
# QUANTIZE=int8: export writes <CKPT>.int8.onnx; eval and predict (ENGINE=onnx) run it.
CKPT ?=
INPUT ?=
OUTPUT ?=
OUT ?=
ENGINE ?=
QUANTIZE ?=

.PHONY: install lint format test test-fast train bench sweep repeat compare report eval predict export ui clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[dev,onnx]'
	touch $@

# ruff (lint + format check) and import-linter (the one-way layers in pyproject.toml)
lint: install
	$(VENV)/bin/ruff check tokprune tests
	$(VENV)/bin/ruff format --check tokprune tests
	$(VENV)/bin/lint-imports

format: install
	$(VENV)/bin/ruff format tokprune tests
	$(VENV)/bin/ruff check --fix tokprune tests

# the layers first: an import that runs upward fails the tests
test: install
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q --durations=15

test-fast: install
	$(PY) -m pytest -q -m "not slow"

train: install
	$(PY) -m tokprune train method=$(METHOD) task=$(TASK) budget=$(BUDGET) model=$(MODEL) seed=$(SEED) $(ARGS)

bench: install
	$(PY) -m tokprune bench model=$(MODEL) seed=$(SEED) $(ARGS)

sweep: install
	$(PY) -m tokprune sweep method=$(METHOD) task=$(TASK) budget=$(BUDGET) model=$(MODEL) seed=$(SEED) \
		$(if $(TRIALS),sweep.trials=$(TRIALS)) $(if $(WORKERS),sweep.workers=$(WORKERS)) \
		$(if $(STORAGE),sweep.storage=$(STORAGE)) $(ARGS)

# make repeat TRIAL=3 SEEDS=2: the study's trial 3 again with seeds SEED+1..SEED+2 (same sweep arguments);
# TARGET=0.5 instead of TRIAL: the trial whose protocol.target_flops is nearest 0.5
TRIAL ?=
TARGET ?=
SEEDS ?= 2
repeat: install
	$(PY) -m tokprune repeat $(if $(TRIAL),trial=$(TRIAL)) $(if $(TARGET),target=$(TARGET)) seeds=$(SEEDS) \
		method=$(METHOD) task=$(TASK) budget=$(BUDGET) model=$(MODEL) \
		seed=$(SEED) $(if $(STORAGE),sweep.storage=$(STORAGE)) $(ARGS)

# make compare TASK=mrpc: the comparison under protocol=shared, resumable: each method's sweep over the
# shared grid of FLOPs targets (TRIALS: the first k of the grid; empty: the budget's default), then
# SEEDS more seeds of each method's trial at TARGET (default 0.5), then the task's report.
COMPARE_METHODS ?= static top transkimmer gate
compare: install
	set -e; for m in $(COMPARE_METHODS); do \
		$(MAKE) --no-print-directory sweep METHOD=$$m ARGS="$(ARGS) report.speedup_examples=0"; done; \
	for m in $(COMPARE_METHODS); do \
		$(MAKE) --no-print-directory repeat METHOD=$$m TRIAL= TARGET=$(or $(TARGET),0.5); done; \
	$(MAKE) --no-print-directory report

report: install
	$(PY) -m tokprune report task=$(TASK) budget=$(BUDGET) model=$(MODEL) seed=$(SEED) $(ARGS)

eval: install
	$(PY) -m tokprune eval $(if $(CKPT),checkpoint=$(CKPT)) $(if $(ENGINE),engine=$(ENGINE)) \
		$(if $(QUANTIZE),quantize=$(QUANTIZE)) $(ARGS)

predict: install
	$(PY) -m tokprune predict $(if $(CKPT),checkpoint=$(CKPT)) $(if $(INPUT),input=$(INPUT)) \
		$(if $(OUTPUT),output=$(OUTPUT)) $(if $(ENGINE),engine=$(ENGINE)) $(if $(QUANTIZE),quantize=$(QUANTIZE)) $(ARGS)

export: install
	$(PY) -m tokprune export $(if $(CKPT),checkpoint=$(CKPT)) $(if $(OUT),output=$(OUT)) \
		$(if $(QUANTIZE),quantize=$(QUANTIZE)) $(ARGS)

ui: install
	@$(PY) -c 'from tokprune.training.tracking import runs_view; print(runs_view("sqlite:///$(MLFLOW_DB)"))'
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(MLFLOW_DB) --artifacts-destination $(abspath mlartifacts)

clean:
	rm -rf checkpoints lightning_logs .pytest_cache
