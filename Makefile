# Two entry points: `make repro` (install, then run the whole pipeline) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(CURDIR)/$(VENV)/bin
# DVC runs stage commands through the shell: the venv must come first on PATH.
export PATH := $(BIN):$(PATH)

# Pinned versions, verified together on Linux x86_64 / Python 3.11 (see README, "Environment").
TORCH := torch==2.13.0
PINS  := transformers==5.24.0 tokenizers==0.23.3 onnx==1.23.2 onnxscript==0.7.2 onnxruntime==1.32.0 \
         onnxruntime-qnn==2.7.0 dvc==3.67.1 hydra-core==1.3.8 numpy==2.4.6 psutil==7.2.2 \
         fastapi==0.165.0 uvicorn==0.54.0

.PHONY: install repro test clean-venv

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# The CPU build of torch first, pinned: anything unpinned would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q $(PINS)
	$(BIN)/python -m pip install -q -e '.[qnn,serve,dev]'
	touch $@

install: $(VENV)/.installed

repro: install
	$(BIN)/dvc repro

test: install
	$(BIN)/python -m pytest

clean-venv:
	rm -rf $(VENV)
