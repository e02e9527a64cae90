# The two entry points: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU wheel of torch must be installed before anything that depends on torch,
# otherwise pip resolves a CUDA build of several GB.
TORCH_PIN := torch==2.13.0
DEMO_ARGS ?=

.PHONY: venv test demo clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e ".[test,demo,jax]"
	touch $@

venv: $(VENV)/.installed

test: venv
	HYPOTHESIS_PROFILE=ci $(PY) -m pytest -q

demo: venv
	OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE \
		$(PY) -m bench demo --out results/demo $(DEMO_ARGS)

clean:
	rm -rf $(VENV) results .pytest_cache .hypothesis
