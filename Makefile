# `make test` and `make quickstart` set up .venv on first use (torch, DeepSpeed, ... from the package index).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test quickstart venv clean

$(STAMP): setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# DeepSpeed JIT-builds a small op; a build folder per checkout keeps two checkouts from rebuilding it in turn.
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions

test: $(STAMP)
	DS_ACCELERATOR=cpu WANDB_MODE=offline $(BIN)/python -m pytest -q tests

quickstart: $(STAMP)
	DS_ACCELERATOR=cpu WANDB_MODE=offline $(BIN)/ldmscale quickstart --out outputs/quickstart

clean:
	rm -rf $(VENV) outputs runs .pytest_cache
