# The two commands of the README:
#   make run    set up (first time) and run the main job: the `quick` simulation on the built-in phantom
#   make test   set up (first time) and run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup run test bench clean

# Idle OpenMP threads sleep instead of spinning: several torch processes (a federation's sites, a
# simulation's workers) share the cores without stealing them from each other.
export OMP_WAIT_POLICY ?= PASSIVE

setup: $(STAMP)

# torch is pinned first so pip takes the CPU build on this machine's pip path
# instead of a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[test,radiomics]"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/fedsubtype-sim --scenario simulation/scenarios/quick.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra

clean:
	rm -rf runs results cache .pytest_cache
