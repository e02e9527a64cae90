# The two entry points: `make demo` (the main job) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU wheel of torch must be installed before anything that depends on torch,
# otherwise pip resolves a CUDA build of several GB.
TORCH_PIN := torch==2.13.0
DEMO_ARGS ?=

GPU_OUT ?= results/gpu

.PHONY: venv test demo gpu-wheels gpu-site gpu-tests gpu-bench gpu-demo gpu-check clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e ".[test,demo,jax,fast]"
	touch $@

venv: $(VENV)/.installed

# One worker process per core, at most 4: each holds its own torch and JAX.
test: venv
	HYPOTHESIS_PROFILE=ci $(PY) -m pytest -q -n auto --maxprocesses 4

demo: venv
	OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE \
		$(PY) -m bench demo --out results/demo $(DEMO_ARGS)

# On a machine with an NVIDIA GPU, run by a python3 that has CuPy and a CUDA build of torch
# (not the venv: its torch is the CPU wheel). Logs and JSON land in $(GPU_OUT). Each of the three
# parts is a target of its own, so that each can run on its own.
# A GPU machine that reaches no package index may lack what the core needs beyond NumPy:
# `make gpu-wheels`, run where the index is reachable, puts those wheels for that machine's
# Python ($(GPU_PYTHON)) in $(GPU_WHEELS); copied beside the checkout there, the gpu targets
# install them into $(GPU_SITE) and put it on PYTHONPATH.
GPU_WHEELS ?= .whl
GPU_SITE ?= .gpu-site
GPU_PYTHON ?= 3.12
GPU_TEST_WORKERS ?= 8
GPU_DEPS := "array-api-compat>=1.9" "optree>=0.13" "array-api-strict>=2.2"
GPU_WHEEL_FILES = $(wildcard $(GPU_WHEELS)/*.whl)
GPU_RUN = $(if $(GPU_WHEEL_FILES),PYTHONPATH=$(abspath $(GPU_SITE))$(if $(PYTHONPATH),:$(PYTHONPATH)) )$(PYTHON)

gpu-wheels:
	$(PYTHON) -m pip download --no-deps --only-binary=:all: --python-version $(GPU_PYTHON) \
		--implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d $(GPU_WHEELS) $(GPU_DEPS)

gpu-site:
	$(if $(GPU_WHEEL_FILES),$(PYTHON) -m pip install -q --no-index --no-deps --no-compile \
		--upgrade --target $(GPU_SITE) $(GPU_WHEEL_FILES))
	mkdir -p $(GPU_OUT)

# the test suite on the cupy and torch:cuda backends, and the CUDA tests of the adapters and demo
gpu-tests: gpu-site
	set -o pipefail; HYPOTHESIS_PROFILE=ci $(GPU_RUN) -m pytest -q -p no:cacheprovider -n $(GPU_TEST_WORKERS) \
		-k "cupy or cuda" 2>&1 | tee $(GPU_OUT)/tests.log

gpu-bench: gpu-site
	set -o pipefail; $(GPU_RUN) -m bench gpu --out $(GPU_OUT) --save-cost-model $(GPU_OUT)/cost_model.json 2>&1 \
		| tee $(GPU_OUT)/gpu.log

gpu-demo: gpu-site
	set -o pipefail; $(GPU_RUN) -m bench demo --device cuda --lrs 1 --no-progress --out $(GPU_OUT)/demo 2>&1 \
		| tee $(GPU_OUT)/demo.log

gpu-check: gpu-tests gpu-bench gpu-demo

clean:
	rm -rf $(VENV) results .pytest_cache .hypothesis $(GPU_SITE)
