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

.PHONY: venv test demo gpu-check clean

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
# (not the venv: its torch is the CPU wheel). Logs and JSON land in $(GPU_OUT).
gpu-check:
	mkdir -p $(GPU_OUT)
	set -o pipefail; HYPOTHESIS_PROFILE=ci $(PYTHON) -m pytest -q -p no:cacheprovider -k "cupy or cuda" 2>&1 \
		| tee $(GPU_OUT)/tests.log
	set -o pipefail; $(PYTHON) -m bench gpu --out $(GPU_OUT) --save-cost-model $(GPU_OUT)/cost_model.json 2>&1 \
		| tee $(GPU_OUT)/gpu.log
	set -o pipefail; $(PYTHON) -m bench demo --device cuda --lrs 1 --no-progress --out $(GPU_OUT)/demo 2>&1 \
		| tee $(GPU_OUT)/demo.log

clean:
	rm -rf $(VENV) results .pytest_cache .hypothesis
