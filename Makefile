# dclip-ray: two set-up commands for a newcomer, `make demo` and `make test`; each creates .venv if needed.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
# torch and torchvision first, pinned to the builds our machines carry (served from local disk there),
# so that no other dependency pulls a different torch.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: venv demo test test-slow test-all lint bench bench-gpu clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/dclip-ray demo --out demo-out

lint: $(STAMP)
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest -m "not slow" -q

# The slow suites only (toy-world edit acceptance at full size, Ray clusters, faults, benchmarks); CI runs
# `make test` and then this (.ci/run).
test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow -q --durations=15

test-all: lint
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m benchmarks --out bench-out

# The GPU check: full-size forwards (bf16/fp32, MFU), restyle and finetune-many on one GPU, under 8
# minutes; without a CUDA GPU it fails at once with one line.
bench-gpu: $(STAMP)
	$(BIN)/python -m benchmarks.gpu_bench --out bench-gpu-out

clean:
	rm -rf $(VENV) demo-out bench-out bench-gpu-out .pytest_cache .ruff_cache
