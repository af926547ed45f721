# diffmpm: every target sets up what it needs in .venv (created when missing).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
DEMO_SCENE ?= scenes/sphere_to_snowman.yaml
BIN := $(VENV)/bin
STAMP := $(VENV)/.diffmpm-installed

.PHONY: install demo test lint defaults clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch first, pinned (a bare `torch` requirement would pull the CUDA build), then the project and its dev tools
$(STAMP): $(BIN)/python pyproject.toml setup.py
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# the main job on the default scene: outputs in runs/demo (a previous runs/demo is replaced)
demo: $(STAMP)
	$(BIN)/diffmpm validate $(DEMO_SCENE)
	rm -rf runs/demo
	$(BIN)/diffmpm optimize $(DEMO_SCENE) --out runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check diffmpm_cli kernels tests scenes

# regenerate configs/defaults.yaml from the schema (a test fails when it is stale)
defaults: $(STAMP)
	$(BIN)/python -m diffmpm_cli.config.defaults > configs/defaults.yaml

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis *.egg-info
