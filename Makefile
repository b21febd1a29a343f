# fewstep: two commands on a fresh machine.
#   make demo   creates .venv if missing, installs fewstep, runs the solver comparison demo
#   make test   creates .venv if missing, installs fewstep + dev tools, runs the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
CONSTRAINTS := constraints-dev.txt
STAMP_RUN := $(VENV)/.stamp-run
STAMP_DEV := $(VENV)/.stamp-dev
STAMP_BENCH := $(VENV)/.stamp-bench
REPORT ?= reports/demo

.PHONY: demo test bench clean venv

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(STAMP_RUN): pyproject.toml $(CONSTRAINTS) | $(PY)
	$(PIP) install -q -c $(CONSTRAINTS) torch==2.13.0
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[report,digits]"
	touch $@

# k-diffusion (reference in tests/test_edm_churn.py, peers in the benchmarks): its wheel without
# dependencies (torchvision from PyPI does not load beside the CPU torch); only
# k_diffusion/sampling.py is loaded (benchmarks/peers.py), which needs torchsde, torchdiffeq, scipy.
$(STAMP_DEV): pyproject.toml $(CONSTRAINTS) | $(PY)
	$(PIP) install -q -c $(CONSTRAINTS) torch==2.13.0
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[dev]"
	$(PIP) install -q -c $(CONSTRAINTS) --no-deps k-diffusion torchsde torchdiffeq trampoline
	touch $@ $(STAMP_RUN)

$(STAMP_BENCH): $(STAMP_DEV)
	touch $@

venv: $(STAMP_DEV)

demo: $(STAMP_RUN)
	$(VENV)/bin/fewstep demo --out $(REPORT)

test: $(STAMP_DEV)
	$(PY) -m pytest -q -n 2 -m "not slow" tests

bench: $(STAMP_BENCH)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) reports .pytest_cache
