# One entry point per stage. Every target installs what it needs through `setup`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp

# albumentations (imported by img2dataset) phones PyPI at every import unless this is set.
export NO_ALBUMENTATIONS_UPDATE := 1
# DeepSpeed JIT-compiles its shm comm op once (~45 s); keep the cache in one stable place.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export PYTHONUNBUFFERED := 1

# `make shards` inputs. With no URLS, the embedded Fashion-MNIST demo dataset is built offline.
URLS ?=
OUT ?= data/fmnist
CONFIG ?=
ARGS ?=
FAST ?=

.PHONY: setup setup-system test shards bench clean help cluster-up cluster-down demo pretrain finetune eval study gpu-check gpu-wheels gpu-rehearsal

help:
	@echo "make setup   - create .venv and install the pinned stack (idempotent)"
	@echo "make test    - setup + the whole test suite"
	@echo "make shards  - URL list -> img2dataset -> filtered, deduplicated WebDataset shards"
	@echo "make bench   - run benchmarks/ and rewrite BENCHMARKS.md"
	@echo "make gpu-check - one GPU, ~5 min: ViT-B-32 step vs open_clip_train's, MFU, memory, loss costs, NCCL resume -> BENCHMARKS.md"
	@echo "make gpu-wheels - .whl/: the wheels the device machine's image lacks (benchmarks/gpu_wheels.txt), < 40 MB"
	@echo "make gpu-rehearsal - benchmarks/gpu_device.sh on this CPU in an emulation of the device image (--cpu-dry-run)"
	@echo "make demo    - shards, CLIP/CyCLIP pretraining, plain/m2-Mix fine-tuning, evaluation, demo/REPORT.md (FAST=1: demo/fast/)"
	@echo "make study   - CLIP vs CyCLIP, plain vs m2-Mix: tuned on val, 4 paired seeds, verdicts -> study/REPORT.md (~75 min)"
	@echo "make pretrain / finetune - configs/pretrain_cyclip.yaml / finetune_m2mix.yaml on $(RANKS) local ranks (CONFIG=, ARGS=)"
	@echo "make eval RUN_DIR=runs/X - evaluate a run on the held-out test split (ARGS='max_samples=1000')"

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q --disable-pip-version-check --upgrade pip setuptools wheel
	$(PYTHON) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $@

# System packages the tests use. Installed only when running as root; otherwise the
# tests that need them skip with a reason.
setup-system:
	@bash tests/harness/setup_system.sh

test: setup setup-system
	@set +e; $(PYTHON) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

# No URLS: the embedded Fashion-MNIST demo (needs Debian's dataset-fashion-mnist: setup-system).
shards: setup
ifeq ($(URLS),)
	@$(MAKE) --no-print-directory setup-system
	$(PYTHON) -m pipeline demo --out $(OUT) $(if $(FAST),--fast) $(if $(CONFIG),--config $(CONFIG)) $(ARGS)
else
	$(PYTHON) -m pipeline run --urls $(URLS) --out $(OUT) $(if $(CONFIG),--config $(CONFIG)) $(ARGS)
endif

bench: setup
	$(PYTHON) -m benchmarks.run

# One GPU (benchmarks/gpu_check.py): exits 2 with one line when none is visible. ARGS=--cpu-dry-run runs every
# part at toy sizes on the CPU without touching BENCHMARKS.md.
gpu-check: setup
	$(PYTHON) -m benchmarks.gpu_check $(ARGS)

# The device machine (README.md "GPU"): .whl/ holds what its image lacks, built here (downloads happen only here).
gpu-wheels: setup
	$(PYTHON) -m benchmarks.gpu_wheels wheels

# gpu_device.sh as the device runs it, on the CPU, in a Python 3.12 + torch 2.11 venv fed only from .whl/.
gpu-rehearsal: gpu-wheels
	bash benchmarks/gpu_rehearsal.sh

# Training on local ranks: torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; on CPU every rank uses gloo.
RANKS ?= 2
RUN_DIR ?=
DEMO_OUT ?=
TORCHRUN := OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --standalone --nproc_per_node $(RANKS)

# `python -m train --dry-run` first (one process, seconds, no DeepSpeed): a missing dataset (run `make shards`),
# a missing pretrained export (run `make pretrain`) or a bad key ends in one line, before torchrun starts.
PRETRAIN_CONFIG = $(or $(CONFIG),configs/pretrain_cyclip.yaml)
FINETUNE_CONFIG = $(or $(CONFIG),configs/finetune_m2mix.yaml)

pretrain: setup
	@$(PYTHON) -m train --dry-run --world-size $(RANKS) --config $(PRETRAIN_CONFIG) $(ARGS)
	$(TORCHRUN) -m train --config $(PRETRAIN_CONFIG) $(ARGS)

finetune: setup
	@$(PYTHON) -m train --dry-run --world-size $(RANKS) --config $(FINETUNE_CONFIG) $(ARGS)
	$(TORCHRUN) -m train --config $(FINETUNE_CONFIG) $(ARGS)

eval: setup
	@test -n "$(RUN_DIR)" || { echo "usage: make eval RUN_DIR=runs/pretrain_cyclip [ARGS='max_samples=1000']" >&2; exit 2; }
	$(PYTHON) -m train.evaluate --checkpoint $(RUN_DIR) dataset=data/fmnist_test split=test reference_dataset=data/fmnist $(ARGS)

# Stage 1 of train.experiments.demo.run is `python -m pipeline demo` (what `make shards` runs) with the sizes of
# configs/demo/{full,fast}.yaml, skipped when the data set exists; then training, evaluation, report.
demo: setup
	@$(MAKE) --no-print-directory setup-system
	$(PYTHON) -m train.experiments.demo $(if $(DEMO_OUT),--out $(DEMO_OUT)) $(if $(FAST),--fast) $(ARGS)

# The fair test of the papers' claims (train/experiments/study/run.py, configs/study/cpu.yaml): ~75 min on 2 cores,
# writes study/REPORT.md + plots; finished runs are reused, so an interrupted study continues;
# make study ARGS=--report-only rewrites the report from study/results.json and the saved runs.
# GPU profile: make study STUDY_CONFIG=configs/study/gpu.yaml
STUDY_CONFIG ?= configs/study/cpu.yaml
study: setup
	@$(MAKE) --no-print-directory setup-system
	OMP_NUM_THREADS=2 $(PYTHON) -m train.experiments.study --config $(STUDY_CONFIG) $(ARGS)

clean:
	rm -rf data runs demo .pytest_cache

# A throw-away 2-node SLURM cluster on this machine (root): for trying slurm/*.sh and train.launch.executor.
cluster-up:
	bash slurm/cluster.sh up

cluster-down:
	bash slurm/cluster.sh down
